"""Plots of a study: the front over all trials, hypervolume, where the front decomposes, per-task accuracy.

Data comes from :mod:`dse.results.front`; each ``plot_*`` function draws on the ``ax`` given (or on a
new figure) and returns the Axes. Figures are built with :class:`matplotlib.figure.Figure`, not
pyplot, so nothing opens a window or touches global state. :func:`save_plots` writes PNG and SVG.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import List, Mapping, Optional

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..core.errors import ResultsError
from ..core.io import atomic_path
from ..decompose import get_method
from ..evaluate import HEALED, OBJECTIVES
from ..model import locate, ordered_types, tensor_types
from ..space import curves, heatmap_frame
from .front import front_rows, front_trials, hypervolume_history, pareto_front, quality, reference_point, trials_frame
from .record import TrialRecord

PARAMS_LABEL = OBJECTIVES.get("params").label


def _axes(ax: Optional[Axes], size=(8, 5.5)) -> Axes:
    return ax if ax is not None else Figure(figsize=size, layout="constrained").add_subplot()


def _millions_axis(ax: Axes, study) -> None:
    """A top x axis in millions of parameters for an x axis in percent of the undecomposed model."""
    base = (study.user_attrs.get("baseline") or {}).get("params")
    if not base:
        return
    scale = base / 1e6 / 100.0
    top = ax.secondary_xaxis("top", functions=(lambda p: p * scale, lambda m: m / scale))
    top.set_xlabel("parameters (millions)")


def plot_front(study, ax: Optional[Axes] = None, x: str = "params") -> Axes:
    """Quality against ``x`` (an objective: ``params`` by default, or ``latency``,
    ``latency_measured`` ...) for every completed trial, the feasible front, and the baselines.

    Against ``params`` the front is the study's; against another measure it is the front in the two
    measures drawn."""
    ax = _axes(ax)
    objective, along = quality(study), OBJECTIVES.get(x, "x")
    metric, column = objective.attribute, "params_pct" if along.size else along.attribute
    df = trials_frame(study)
    done = df[df["state"] == "COMPLETE"]
    if column not in done or done[column].isna().all():
        raise ResultsError(
            f"x: the study's trials record no {column} (for predicted latency, give the study a "
            "latency_table: section; for measured latency, evaluation.latency: true)"
        )
    front = (
        pareto_front(study)
        if along.size
        else front_rows(done[done["feasible"]], [along, objective]).sort_values(column)
    )
    feasible, infeasible = done[done["feasible"]], done[~done["feasible"]]
    ax.scatter(feasible[column], feasible[metric], s=18, color="0.6", label=f"feasible trial ({len(feasible)})")
    if len(infeasible):
        ax.scatter(
            infeasible[column],
            infeasible[metric],
            s=22,
            marker="x",
            color="0.75",
            label=f"trial violating the constraints ({len(infeasible)})",
        )
    ax.step(front[column], front[metric], where="post", color="C0", alpha=0.5)  # attainment curve
    ax.plot(front[column], front[metric], "o", color="C0", ms=7, label=f"Pareto front ({len(front)})")
    marks = iter(["s", "D", "^", "v", "P", "X"])
    for _, row in done[done["baseline"].notna() & (done["baseline"] != "dense")].iterrows():
        ax.plot(
            row[column],
            row[metric],
            next(marks, "s"),
            color="C1",
            ms=8,
            mec="k",
            label=f"{row['baseline']} baseline (trial {row['number']})",
        )
    base = study.user_attrs.get("baseline") or {}
    dense_x = 100.0 if along.size else base.get(column)
    if metric in base and dense_x is not None:
        ax.plot(dense_x, base[metric], "*", color="C3", ms=15, mec="k", label="undecomposed model (dense)")
    ax.set_xlabel(along.label)
    ax.set_ylabel(objective.label)
    if along.size:
        _millions_axis(ax, study)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(
        f"{study.study_name}: {metric} vs. {'size' if along.size else along.name}, {len(done)} completed trials"
    )
    return ax


def plot_hypervolume(study, ax: Optional[Axes] = None, reference=None) -> Axes:
    """Hypervolume of the feasible trials so far, after each trial."""
    ax = _axes(ax, (7, 4))
    hist = hypervolume_history(study, reference)
    ref = reference_point(study, reference)
    ax.step(hist["number"], hist["hypervolume"], where="post", color="C0", label="feasible trials so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"hypervolume ({' × '.join(ref)})")
    ax.set_title(
        "Hypervolume after each trial\nreference point: " + ", ".join(f"{k} {v:g}" for k, v in ref.items()), fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return ax


def _healed_quality(study):
    """``(plain, healed)``: the study's quality objective before and after healing."""
    objective = quality(study)
    plain = OBJECTIVES.get(objective.name.removesuffix(HEALED)) if objective.healed else objective
    healed = OBJECTIVES.get(plain.name + HEALED, "quality")
    return plain, healed


def healed_trials(frame: pd.DataFrame, study) -> pd.DataFrame:
    """The complete trials of a trials frame that were healed (a healed value of the quality)."""
    _, healed = _healed_quality(study)
    done = frame[frame["state"] == "COMPLETE"]
    return done[done[healed.attribute].notna()] if healed.attribute in done else done.iloc[:0]


def plot_healed(study, ax: Optional[Axes] = None) -> Axes:
    """The study's quality against size before and after healing: every healed trial as an arrow
    from its plain to its healed value, and the two fronts (plain over all trials, healed over the
    healed ones)."""
    ax = _axes(ax)
    plain, healed = _healed_quality(study)
    size = OBJECTIVES.get("params")
    df = trials_frame(study)
    rows = healed_trials(df, study)
    if rows.empty:
        raise ResultsError(f"study {study.study_name!r}: no trial was healed (give the study a heal: section)")
    for _, row in rows.iterrows():
        ax.annotate(
            "",
            (row["params_pct"], row[healed.attribute]),
            (row["params_pct"], row[plain.attribute]),
            arrowprops={"arrowstyle": "->", "color": "0.7"},
        )
    done = df[(df["state"] == "COMPLETE") & df["feasible"]]
    for objective, frame, color, name in ((plain, done, "C0", "plain"), (healed, rows, "C2", "healed")):
        front = front_rows(frame, [size, objective]).sort_values("params_pct")
        ax.step(front["params_pct"], front[objective.attribute], where="post", color=color, alpha=0.5)
        label = f"{name} front ({len(front)})"
        ax.plot(front["params_pct"], front[objective.attribute], "o", color=color, ms=7, label=label)
    base = study.user_attrs.get("baseline") or {}
    if plain.attribute in base:
        ax.plot(100.0, base[plain.attribute], "*", color="C3", ms=15, mec="k", label="undecomposed model (dense)")
    ax.set_xlabel(size.label)
    ax.set_ylabel(plain.label)
    _millions_axis(ax, study)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{study.study_name}: {plain.attribute} before and after healing, {len(rows)} healed trials")
    return ax


def plot_heal_losses(study, ax: Optional[Axes] = None) -> Axes:
    """The training loss of every healed trial's heal, step by step, coloured by the trial's size."""
    ax = _axes(ax, (7, 4))
    curves = [
        (t.number, record["params_ratio"], record["heal_losses"])
        for t in study.get_trials(deepcopy=False)
        for record in [TrialRecord.of(t)]
        if record.get("heal_losses")
    ]
    if not curves:
        raise ResultsError(f"study {study.study_name!r}: no trial was healed (give the study a heal: section)")
    ratios = [ratio for _, ratio, _ in curves]
    low, high = min(ratios), max(ratios)
    cmap = matplotlib.colormaps["viridis"]
    for number, ratio, losses in curves:
        shade = cmap((ratio - low) / (high - low) if high > low else 0.5)
        ax.plot(range(1, len(losses) + 1), losses, color=shade, alpha=0.8, label=f"trial {number} ({ratio:.1%})")
    ax.set_xlabel("heal step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{study.study_name}: heal loss of {len(curves)} trials (colour: parameters kept)", fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(loc="upper right", fontsize=7)
    return ax


@dataclass
class ModuleUsage:
    """Per layer (rows) and tensor type (columns): the fraction of front configs decomposing the
    module, and its mean rank (first rank of a pair) where decomposed; ``n`` front configs."""

    fraction: pd.DataFrame
    mean_rank: pd.DataFrame
    n: int


def module_usage(study) -> ModuleUsage:
    """How often, and at what rank, the front's plans decompose each module.

    The grid spans every module named in any trial's plan (the uniform baselines name them all).
    """
    names = {n for t in study.get_trials(deepcopy=False) for n in (TrialRecord.of(t).plan or {}).get("ranks", {})}
    cells = {n: locate(n) for n in names}
    layers = sorted({layer for layer, _ in cells.values()})
    types = ordered_types(t for _, t in cells.values())
    count = pd.DataFrame(0.0, index=layers, columns=types)
    rank_sum = count.copy()
    front = front_trials(study)
    for trial in front:
        for name, rank in TrialRecord.of(trial).plan["ranks"].items():
            layer, ttype = cells[name]
            count.loc[layer, ttype] += 1
            rank_sum.loc[layer, ttype] += rank[0] if isinstance(rank, list) else rank
    n = max(len(front), 1)
    return ModuleUsage(count / n, (rank_sum / count.where(count > 0)), len(front))


def plot_module_usage(study, ax: Optional[Axes] = None) -> Axes:
    """Layer x tensor-type heatmap of how often the front decomposes each module; text: mean rank."""
    usage = module_usage(study)
    rows, cols = usage.fraction.shape
    ax = _axes(ax, (1.6 + 0.75 * cols, 1.8 + 0.3 * rows))
    image = ax.imshow(usage.fraction.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(rows):
        for j in range(cols):
            r = usage.mean_rank.iat[i, j]
            if np.isfinite(r):
                dark = usage.fraction.iat[i, j] > 0.6
                ax.text(j, i, f"{r:.0f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.set_xticks(range(cols), usage.fraction.columns)
    ax.set_yticks(range(rows), usage.fraction.index)
    ax.set_xlabel("tensor type")
    ax.set_ylabel("layer")
    ax.set_title(
        f"Modules decomposed by the {usage.n} front configs\n(colour: fraction of configs; "
        "text: mean rank when decomposed)",
        fontsize=10,
    )
    ax.figure.colorbar(image, ax=ax, label="fraction of front configs", shrink=0.8)
    return ax


def plot_plan(plan, table: Mapping, ax: Optional[Axes] = None, title: Optional[str] = None) -> Axes:
    """Layer x tensor-type heatmap of one plan: colour, the fraction of each module's parameters
    kept (dense modules 1); text, the rank (``D``: dense)."""
    layers = sorted({p.layer for p in table.values()})
    types = tensor_types(table)
    kept = pd.DataFrame(np.nan, index=layers, columns=types)
    method = get_method(plan.method)
    ax = _axes(ax, (1.6 + 0.75 * len(types), 1.8 + 0.3 * len(layers)))
    for name, p in table.items():
        rank = plan.ranks.get(name)
        kept.loc[p.layer, p.type] = (
            1.0 if rank is None else method.params(rank, p.out_features, p.in_features) / p.dense_params
        )
        label = "D" if rank is None else str(rank[0] if isinstance(rank, tuple) else rank)
        ax.text(
            types.index(p.type),
            layers.index(p.layer),
            label,
            ha="center",
            va="center",
            fontsize=6,
            color="w" if kept.loc[p.layer, p.type] < 0.35 else "k",
        )
    image = ax.imshow(kept.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(types)), types)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("tensor type")
    ax.set_ylabel("layer")
    ax.set_title(title or f"Plan: {plan.summary()}", fontsize=10)
    ax.figure.colorbar(image, ax=ax, label="fraction of the module's parameters kept", shrink=0.8)
    return ax


def plot_sensitivity(
    frame: pd.DataFrame, table: Mapping, metric: str = "accuracy_drop", ax: Optional[Axes] = None
) -> Axes:
    """Layer x tensor-type heatmap of one module's decomposition cost, from ``dse characterize`` rows."""
    grid = heatmap_frame(frame, metric, table)
    rank = int(frame.loc[frame["kind"] == "module", "rank"].iloc[0])
    ax = _axes(ax, (1.6 + 0.75 * grid.shape[1], 1.8 + 0.3 * grid.shape[0]))
    values = grid.to_numpy()
    bound = np.nanmax(np.abs(values)) or 1.0
    cmap, vmin = ("Reds", 0) if np.nanmin(values) >= 0 else ("RdBu_r", -bound)
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=bound, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("tensor type")
    ax.set_ylabel("layer")
    ax.set_title(f"One module at rank {rank}: {metric.replace('_', ' ')}", fontsize=10)
    ax.figure.colorbar(image, ax=ax, label=metric.replace("_", " "), shrink=0.8)
    return ax


def plot_layer_curves(frame: pd.DataFrame, metric: str = "accuracy", ax: Optional[Axes] = None) -> Axes:
    """``metric`` against the number of whole layers decomposed, per pattern (first, last, spread,
    adjacent), with each single layer's value as grey dots at k = 1 and the dense model dashed."""
    ax = _axes(ax)
    single = frame[frame["kind"] == "layer"]
    if len(single):
        ax.plot(np.ones(len(single)), single[metric], "o", color="0.6", ms=3, label="each single layer")
    for i, kind in enumerate(curves()):
        rows = frame[frame["kind"] == kind].sort_values("k")
        if len(rows):
            ax.plot(rows["k"], rows[metric], "o-", color=f"C{i}", label=f"{kind} k layers")
    dense = frame[frame["kind"] == "dense"]
    if len(dense):
        ax.axhline(float(dense[metric].iloc[0]), color="k", ls="--", lw=1, label="undecomposed")
    rank = int(frame.loc[frame["kind"] != "dense", "rank"].max())
    ax.set_xlabel(f"whole layers decomposed at rank {rank} (k)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric.replace('_', ' ').capitalize()} against decomposed layers")
    return ax


def plot_task_accuracy(study, ax: Optional[Axes] = None) -> Axes:
    """Per-task accuracy of the front's configs against size; dashed: the undecomposed model."""
    ax = _axes(ax)
    front = pareto_front(study)
    base = study.user_attrs.get("baseline") or {}
    task_cols = [c for c in front.columns if c.startswith("acc/")]
    for i, col in enumerate(task_cols):
        color = f"C{i % 10}"
        ax.plot(front["params_pct"], front[col], "o-", color=color, ms=4, label=col[4:])
        if col in base:
            ax.axhline(base[col], color=color, ls="--", lw=1, alpha=0.7)
    ax.plot(front["params_pct"], front["accuracy"], "k-", lw=2.5, label="mean")
    ax.plot([], [], "k--", lw=1, label="undecomposed model (per task)")
    ax.set_xlabel(PARAMS_LABEL)
    ax.set_ylabel("accuracy (fraction correct)")
    _millions_axis(ax, study)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"Per-task accuracy along the Pareto front ({len(front)} configs)")
    return ax


def plot_plans(plans: Mapping[str, object], table: Mapping, *, panel=(5.2, 9.0)) -> List[Axes]:
    """:func:`plot_plan` of each plan side by side on one figure, titled by its key; ``panel`` is
    one panel's size in inches."""
    figure = Figure(figsize=(panel[0] * len(plans), panel[1]), layout="constrained")
    axes = figure.subplots(1, len(plans), squeeze=False)[0]
    for ax, (title, plan) in zip(axes, plans.items()):
        plot_plan(plan, table, ax=ax, title=title)
    return list(axes)


def save_figure(figure: Figure, stem, *, formats=("png", "svg"), dpi: int = 150) -> List[Path]:
    """Write ``figure`` as ``stem.<format>`` for each format (each file atomically); return the paths."""
    written = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=fmt, dpi=dpi)
        written.append(path)
    return written


def save_plots(study, out_dir, *, formats=("png", "svg"), x: str = "params") -> List[Path]:
    """Write every plot that applies to the study as ``out_dir/<name>.<format>``; return the paths.
    ``x``: the measure the front is drawn against (``front.*``; another than params adds ``front-<x>.*``)."""
    plots = {"front": plot_front, "hypervolume": plot_hypervolume, "ranks": plot_module_usage}
    if x != "params":
        plots[f"front-{x}"] = partial(plot_front, x=x)
    if any(k.startswith("acc/") for t in front_trials(study) for k in TrialRecord.of(t).metrics):
        plots["tasks"] = plot_task_accuracy
    if any(TrialRecord.of(t).get("heal_losses") for t in study.get_trials(deepcopy=False)):
        plots.update({"healed": plot_healed, "heal-loss": plot_heal_losses})
    return [
        path
        for name, plot in plots.items()
        for path in save_figure(plot(study).figure, Path(out_dir) / name, formats=formats)
    ]
