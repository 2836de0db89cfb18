"""What a study found: the trials as a table, the feasible Pareto front, and its hypervolume.

Everything here reads a finished (or running) study through the part of Optuna's public API that
describes it (``study_name``, ``directions``, ``user_attrs``, ``get_trials()``, and each trial's
``number``, ``state``, ``values``, ``user_attrs``), without importing Optuna. Each trial is read
as its :class:`~dse.results.record.TrialRecord` (sizes and metrics; ``values`` in the order of the
study's ``objectives``). A trial is *feasible* when it completed and every entry of its
record's ``constraints`` is ``<= 0`` (Optuna's convention); the *front* is the set of feasible
complete trials that no other feasible complete trial dominates.

The hypervolume reference point is each objective's own (:class:`dse.evaluate.Objective`):
``accuracy`` 0, ``params`` 1.0 (the size of the undecomposed model), ``perplexity`` and
``latency`` twice the undecomposed model's value. A trial worse than the reference on any
objective adds nothing to the hypervolume.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ..core.errors import ResultsError
from ..evaluate import OBJECTIVES, Objective
from .record import TrialRecord

COMPLETE = "COMPLETE"


def objectives(study) -> List[str]:
    """The study's objective names (``accuracy``, ``params`` ...), in the order of ``trial.values``."""
    meta = study.user_attrs.get("dse")
    if not meta or "objectives" not in meta:
        raise ResultsError(f"study {study.study_name!r}: no dse metadata (was it created by `dse run`?)")
    return list(meta["objectives"])


def quality(study) -> Objective:
    """The study's first objective that is not a size (the y axis of its front), accuracy if none."""
    for name in objectives(study):
        objective = OBJECTIVES.get(name, "objectives")
        if not objective.size:
            return objective
    return OBJECTIVES.get("accuracy")


def completed(study) -> list:
    """The study's completed trials."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == COMPLETE]


def is_feasible(trial) -> bool:
    return trial.state.name == COMPLETE and TrialRecord.of(trial).satisfied


def feasible_trials(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if is_feasible(t)]


def _signs(directions) -> np.ndarray:
    return np.array([-1.0 if d.name == "MAXIMIZE" else 1.0 for d in directions])


def _loss(trials: Sequence, directions) -> np.ndarray:
    """Trial values turned into losses (maximised objectives negated): shape (n, objectives)."""
    values = np.array([t.values for t in trials], dtype=float).reshape(len(trials), len(directions))
    return values * _signs(directions)


def _on_front(loss: np.ndarray) -> np.ndarray:
    """Mask of rows no other row dominates (<= everywhere, < somewhere)."""
    le = (loss[:, None, :] <= loss[None, :, :]).all(-1)
    lt = (loss[:, None, :] < loss[None, :, :]).any(-1)
    dominated = (le & lt).any(0)
    return ~dominated


def front_rows(frame: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """The rows of a trials frame that no other row dominates on ``objectives`` (rows lacking a
    value left out): the front in those measures alone."""
    columns = ["params_pct" if o.size else o.attribute for o in objectives]
    rows = frame.dropna(subset=columns)
    if rows.empty:
        return rows
    loss = rows[columns].to_numpy(dtype=float) * np.array([-1.0 if o.maximize else 1.0 for o in objectives])
    return rows[_on_front(loss)]


def front_trials(study) -> list:
    """Feasible complete trials on the Pareto front, in trial order (Optuna's ``best_trials``
    semantics, with feasibility read from the ``constraints`` user attribute)."""
    trials = feasible_trials(study)
    if not trials:
        return []
    mask = _on_front(_loss(trials, study.directions))
    return [t for t, keep in zip(trials, mask) if keep]


def joins_front(study, values: Sequence[float]) -> bool:
    """Whether a trial with objective ``values`` (in the order of ``study.directions``) would be on
    the front of the study's feasible complete trials: none of them dominates it."""
    trials = feasible_trials(study)
    if not trials:
        return True
    loss = np.vstack([_loss(trials, study.directions), np.asarray(values, dtype=float) * _signs(study.directions)])
    return bool(_on_front(loss)[-1])


COLUMNS = ["number", "state", "baseline", "plan", "n_modules", "params_pct", "params_m", "bytes"]


def metric_columns() -> List[str]:
    """The attributes of the registered objectives that are not sizes, in registration order."""
    return [o.attribute for o in OBJECTIVES.values() if not o.size]


def _row(trial, task_names: Sequence[str], metrics: Sequence[str]) -> dict:
    record = TrialRecord.of(trial)
    a = record.metrics
    row = {
        "number": trial.number,
        "state": trial.state.name,
        "baseline": record.baseline,
        "plan": record.plan_summary,
        "n_modules": a.get("n_modules"),
        "params_pct": 100.0 * a["params_ratio"] if "params_ratio" in a else np.nan,
        "params_m": a["params"] / 1e6 if "params" in a else np.nan,
        "bytes": a.get("bytes"),
    }
    row.update({f"acc/{t}": a.get(f"acc/{t}", np.nan) for t in task_names})
    for key in (*metrics, "eval_seconds"):
        row[key] = a.get(key, np.nan)
    row["feasible"] = is_feasible(trial)
    row["error"] = record.error
    return row


def tasks(study) -> List[str]:
    """The evaluation tasks recorded for the study (from its metadata, else from trial attributes)."""
    meta = study.user_attrs.get("dse") or {}
    if meta.get("tasks"):
        return list(meta["tasks"])
    seen = dict.fromkeys(
        k[4:] for t in study.get_trials(deepcopy=False) for k in TrialRecord.of(t).metrics if k.startswith("acc/")
    )
    return list(seen)


def _frame(trials: Sequence, task_names: Sequence[str]) -> pd.DataFrame:
    metrics = metric_columns()
    columns = COLUMNS + [f"acc/{t}" for t in task_names] + metrics + ["eval_seconds", "feasible", "error"]
    return pd.DataFrame([_row(t, task_names, metrics) for t in trials], columns=columns)


def trials_frame(study) -> pd.DataFrame:
    """One row per trial: state, baseline label, plan summary, size (``params_pct`` of the
    undecomposed model, ``params_m`` in millions, ``bytes``), per-task accuracy, the value of every
    registered objective, evaluation seconds, feasibility and error."""
    return _frame(study.get_trials(deepcopy=False), tasks(study))


def pareto_front(study) -> pd.DataFrame:
    """The rows of :func:`trials_frame` on the feasible front, smallest model first."""
    front = front_trials(study)
    return _frame(front, tasks(study)).sort_values(["params_pct", "number"], ignore_index=True)


def require_completed(study) -> None:
    """Raise :class:`ResultsError` if the study has no completed trial."""
    if not completed(study):
        counts = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts().to_dict()
        raise ResultsError(
            f"study {study.study_name!r}: no completed trials yet "
            f"({', '.join(f'{v} {k.lower()}' for k, v in counts.items()) or 'no trials'})"
        )


def reference_point(study, reference: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """The hypervolume reference per objective: ``reference`` entries, else each objective's own."""
    baseline = study.user_attrs.get("baseline") or {}
    out = {}
    for name in objectives(study):
        objective = OBJECTIVES.get(name, "objectives")
        value = (reference or {}).get(name, objective.reference)
        if value is None:
            base = baseline.get(objective.attribute)
            if base is None:
                raise ResultsError(f"reference.{name}: the study has no baseline {objective.attribute}; give one")
            value = objective.reference_factor * base
        out[name] = float(value)
    unknown = sorted(set(reference or {}) - set(out))
    if unknown:
        raise ResultsError(f"reference.{unknown[0]}: not an objective of this study ({', '.join(out)})")
    return out


def hypervolume(loss: np.ndarray, ref_loss: np.ndarray) -> float:
    """Hypervolume dominated by ``loss`` rows up to ``ref_loss`` (all minimised), exactly: a sweep
    in two dimensions, slices along the last objective above."""
    inside = np.asarray(loss, dtype=float)
    inside = inside[(inside < ref_loss).all(axis=1)]
    return _slices(inside, np.asarray(ref_loss, dtype=float)) if len(inside) else 0.0


def _slices(points: np.ndarray, ref: np.ndarray) -> float:
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    points = points[np.argsort(points[:, -1], kind="stable")]
    tops = np.append(points[1:, -1], ref[-1])
    if points.shape[1] == 2:
        best = np.minimum.accumulate(points[:, 0])
        return float(((ref[0] - best) * (tops - points[:, -1])).sum())
    return sum(
        float(top - z) * _slices(points[: i + 1, :-1], ref[:-1])
        for i, (z, top) in enumerate(zip(points[:, -1], tops))
        if top > z
    )


def hypervolume_history(study, reference: Optional[Mapping[str, float]] = None) -> pd.DataFrame:
    """Hypervolume of the feasible trials among the first ``number + 1`` trials, per trial.

    Columns ``number``, ``state``, ``hypervolume``. The reference point is documented in the
    module docstring; ``reference`` overrides it per objective (e.g. ``{"accuracy": 0.25}``).
    """
    ref = reference_point(study, reference)
    directions = study.directions
    ref_loss = np.array(list(ref.values())) * _signs(directions)
    rows, kept = [], []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if is_feasible(t):
            kept.append(t)
        hv = hypervolume(_loss(kept, directions), ref_loss) if kept else 0.0
        rows.append({"number": t.number, "state": t.state.name, "hypervolume": hv})
    return pd.DataFrame(rows, columns=["number", "state", "hypervolume"])
