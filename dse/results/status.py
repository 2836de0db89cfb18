"""Text summaries of a study for the terminal: ``dse status`` and ``dse pareto``."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Optional, Tuple

import pandas as pd
from scipy.stats import spearmanr

from ..evaluate import OBJECTIVES
from .front import objectives, pareto_front
from .record import TrialRecord

# frame column -> (header, format) of the columns every table shows; objectives add their own
SHOWN = {
    "number": ("trial", "{:d}"),
    "baseline": ("baseline", "{}"),
    "plan": ("plan", "{}"),
    "params_pct": ("params %", "{:.1f}"),
    "params_m": ("params M", "{:.1f}"),
}


def columns_shown() -> dict:
    """Column -> (header, format): the fixed ones, then each registered objective's (not sizes)."""
    return {**SHOWN, **{o.attribute: (o.header, o.fmt) for o in OBJECTIVES.values() if not o.size}}


def format_front(front: pd.DataFrame) -> str:
    """The front as an aligned text table (per-task accuracies included, empty columns left out)."""
    if front.empty:
        return "(empty)"
    shown = columns_shown()
    columns = [c for c in front.columns if (c in shown or c.startswith("acc/")) and front[c].notna().any()]
    cells = {}
    for c in columns:
        header, fmt = shown.get(c, (c, "{:.4f}"))
        cells[header] = [("-" if pd.isna(v) else fmt.format(v)) for v in front[c]]
    return pd.DataFrame(cells).to_string(index=False)


def prediction_agreement(study) -> Optional[Tuple[float, int, str]]:
    """How well the error model's predictions (``predicted_loss``, recorded by the ``errormodel``
    sampler) rank the measured losses: Spearman's rank correlation over the completed trials that
    have both (nan where either is constant), the number of trials and the metric the model fits
    (perplexity when the study optimises it, else accuracy lost); None with fewer than three such
    trials."""
    objectives = (study.user_attrs.get("dse") or {}).get("objectives", ())
    metric, sign = ("perplexity", 1) if "perplexity" in objectives else ("accuracy", -1)
    pairs = []
    for t in study.get_trials(deepcopy=False):
        record = TrialRecord.of(t)
        predicted, value = record.get("predicted_loss"), record.get(metric)
        if t.state.name == "COMPLETE" and predicted is not None and value is not None and math.isfinite(value):
            pairs.append((predicted, sign * value))
    if len(pairs) < 3:
        return None
    predicted, measured = zip(*pairs)
    constant = len(set(predicted)) < 2 or len(set(measured)) < 2
    rho = math.nan if constant else spearmanr(predicted, measured).statistic
    return float(rho), len(predicted), metric


def time_split(trials) -> str:
    """Where a trial's time goes: the median seconds of each step over the completed, decomposed
    trials that recorded it (decompose, each evaluation measure, restore, the whole evaluation)."""
    done = [TrialRecord.of(t).metrics for t in trials if t.state.name == "COMPLETE"]
    done = [a for a in done if a.get("n_modules") and "eval_seconds" in a]
    if not done:
        return ""
    measures = dict.fromkeys(k for a in done for k in a if k.startswith("seconds/"))
    steps = [("decompose", "decompose_seconds"), *((k[len("seconds/") :], k) for k in measures)]
    steps += [("restore", "restore_seconds"), ("evaluation", "eval_seconds")]
    shown = [
        f"{label} {statistics.median(values):.2f}"
        for label, key in steps
        if (values := [a[key] for a in done if key in a])
    ]
    return f"seconds per trial (median of {len(done)}): " + ", ".join(shown)


def format_status(study) -> str:
    """Trial counts per state, the study's setup, the undecomposed baseline and the feasible front."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name.lower() for t in trials)
    meta = study.user_attrs.get("dse") or {}
    by_state = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines = [
        f"study {study.study_name!r}: {len(trials)} trials ({by_state})"
        if trials
        else f"study {study.study_name!r}: no trials yet"
    ]
    if meta:
        lines.append(
            f"model {meta.get('model')} (fingerprint {meta.get('fingerprint')}, {meta.get('dtype')}), "
            f"method {meta.get('method')}, objectives {', '.join(objectives(study))}, "
            + (
                f"tasks {', '.join(meta['tasks'])} (limit {meta.get('limit')})"
                if meta.get("tasks")
                else "no accuracy tasks"
            )
        )
    base = study.user_attrs.get("baseline") or {}
    if base:
        shown = [f"params {base['params'] / 1e6:.2f} M"] if "params" in base else []
        shown += [
            f"{o.attribute} {base[o.attribute]:.4g}" for o in OBJECTIVES.values() if not o.size and o.attribute in base
        ]
        shown += [f"{k} {v:.4g}" for k, v in base.items() if k.startswith("acc/")]
        lines.append("baseline (undecomposed): " + ", ".join(shown))
    agreement = prediction_agreement(study)
    if agreement is not None:
        rho, n, metric = agreement
        lost = "" if metric == "perplexity" else " lost"
        lines.append(f"error model: Spearman {rho:.3f} between predicted loss and measured {metric}{lost} ({n} trials)")
    split = time_split(trials)
    if split:
        lines.append(split)
    if meta:
        front = pareto_front(study)
        lines.append(f"front: {len(front)} feasible configs" + (":" if len(front) else ""))
        if len(front):
            lines.append(format_front(front))
    return "\n".join(lines)
