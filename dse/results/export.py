"""Exporting a study's front: :func:`select_trial` picks one feasible front trial by a rule,
:func:`rank_config` makes its :class:`~dse.results.rankconfig.RankConfig`, and :func:`export_front`
writes every front trial's config."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..core.errors import ExportError, ResultsError
from ..core.io import atomic_dir
from ..decompose import Plan
from .front import front_trials, quality, require_completed
from .rankconfig import RankConfig
from .record import TrialRecord


def rank_config(study, trial) -> RankConfig:
    """The rank config of ``trial`` (a FrozenTrial of ``study``)."""
    meta = study.user_attrs.get("dse") or {}
    missing = [k for k in ("model", "fingerprint") if k not in meta]
    if missing:
        raise ResultsError(f"study {study.study_name!r}: metadata lacks {missing[0]!r} (was it run by `dse run`?)")
    record = TrialRecord.of(trial)
    if record.plan is None:
        raise ResultsError(f"trial {trial.number}: no plan recorded")
    return RankConfig(
        meta["model"],
        meta["fingerprint"],
        meta.get("dtype", "float32"),
        Plan.from_dict(record.plan),
        dict(record.metrics),
        {
            "study": study.study_name,
            "trial": trial.number,
            "baseline": record.baseline,
            "objectives": meta.get("objectives"),
            "tasks": meta.get("tasks"),
            "limit": meta.get("limit"),
        },
        calibration=meta.get("calibration"),
        family=meta.get("family"),
    )


def select_trial(
    study, *, max_params: Optional[float] = None, min_accuracy: Optional[float] = None, max_drop: Optional[float] = None
):
    """One trial of the feasible front, by rule.

    Keep the front configs with ``params_ratio <= max_params``, ``accuracy >= min_accuracy`` and
    ``accuracy >= baseline accuracy - max_drop`` (each rule only when given). With an accuracy rule
    the smallest of those is chosen; with only ``max_params``, the best on the study's quality
    objective (highest accuracy, else lowest perplexity or latency). A single-objective study
    (e.g. over an allocation space, where every plan has the same size) needs no rule: its best
    trial is chosen.
    """
    no_rule = max_params is None and min_accuracy is None and max_drop is None
    if no_rule and len(study.directions) > 1:
        raise ExportError(
            "export: no rule given for a study of several objectives: set max_params, "
            "min_accuracy or max_drop (--max-params, --min-accuracy, --max-drop), or export the "
            "whole front (--front)"
        )
    require_completed(study)
    front = front_trials(study)
    if not front:
        raise ResultsError(f"study {study.study_name!r}: no feasible completed trial (all violate the constraints)")
    if no_rule:
        return front[0]
    floor = min_accuracy
    if max_drop is not None:
        base = (study.user_attrs.get("baseline") or {}).get("accuracy")
        if base is None:
            raise ExportError("max_drop: the study has no baseline accuracy")
        floor = max(floor if floor is not None else -1.0, base - max_drop)
    records = {t.number: TrialRecord.of(t) for t in front}
    if floor is not None and any("accuracy" not in records[t.number] for t in front):
        raise ExportError("min_accuracy: the study does not measure accuracy (no evaluation tasks)")
    chosen = [
        t
        for t in front
        if (max_params is None or records[t.number]["params_ratio"] <= max_params)
        and (floor is None or records[t.number]["accuracy"] >= floor)
    ]
    if not chosen:
        ratios = [r["params_ratio"] for r in records.values()]
        acc = [r.get("accuracy", float("nan")) for r in records.values()]
        rule = " and ".join(
            ([f"params_ratio <= {max_params:g}"] if max_params is not None else [])
            + ([f"accuracy >= {floor:.4g}"] if floor is not None else [])
        )
        raise ExportError(
            f"export: no front config has {rule}; the front spans params_ratio "
            f"{min(ratios):.3f}..{max(ratios):.3f}, accuracy {min(acc):.3f}..{max(acc):.3f}"
        )
    if floor is not None:
        return min(chosen, key=lambda t: (records[t.number]["params_ratio"], -records[t.number]["accuracy"]))
    objective = quality(study)
    key = objective.attribute
    return min(
        chosen,
        key=lambda t: (
            -records[t.number][key] if objective.maximize else records[t.number][key],
            records[t.number]["params_ratio"],
        ),
    )


def export_front(study, out_dir) -> List[Path]:
    """Every feasible front config as ``out_dir/trial-<number>.json``, written all or nothing."""
    require_completed(study)
    front = front_trials(study)
    if not front:
        raise ResultsError(f"study {study.study_name!r}: no feasible completed trial (all violate the constraints)")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for trial in front:
            rank_config(study, trial).save(tmp / f"trial-{trial.number:04d}.json")
    return [out_dir / f"trial-{t.number:04d}.json" for t in front]
