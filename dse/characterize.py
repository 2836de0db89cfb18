"""Sensitivity characterization: what each module, each layer and each pattern of k layers costs.

The seed thesis did this by hand for Llama-2-7B. :func:`units` lists the plans to measure, all at
one rank (default 1) with the study's method:

- ``module``: one projection alone (``model.layers.3.self_attn.q_proj``), the layer x type heatmap;
- ``layer``: all projections of one layer (``L3``);
- ``first`` / ``last`` / ``spread`` / ``adjacent`` with ``k`` layers: whole layers 0..k-1, the
  last k, k spread evenly over the inner layers (:func:`dse.baselines.spread_layers`), and k
  consecutive layers in the middle of the model.

:func:`characterize` measures each with the study's worker (the factor cache makes each a
truncation plus an evaluation) and appends a row per unit to a CSV as it goes, so an interrupted
run resumes where it stopped. Rows hold the unit, its size and every metric, plus
``accuracy_drop`` (points as a fraction, dense minus decomposed) and ``log_perplexity_ratio``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

from tqdm.auto import tqdm

from .baselines import spread_layers
from .plan import Plan, uniform_plan

if TYPE_CHECKING:
    import pandas as pd

KINDS = ("module", "layer", "first", "last", "spread", "adjacent")
CURVES = ("first", "last", "spread", "adjacent")


@dataclass(frozen=True)
class Unit:
    kind: str
    name: str      # the module, "L3", or "first-3"
    k: int         # layers involved (1 for a module)
    layers: tuple
    plan: Plan


def curve_layers(kind: str, k: int, n_layers: int) -> List[int]:
    if kind == "first":
        return list(range(k))
    if kind == "last":
        return list(range(n_layers - k, n_layers))
    if kind == "spread":
        return spread_layers(n_layers, k)
    start = max(0, (n_layers - k) // 2)
    return list(range(start, start + k))


def units(table: Mapping, rank: int = 1, kinds: Sequence[str] = KINDS, ks: Sequence[int] = (1, 2, 3, 4, 6),
          method: str = "svd", method_options=None) -> List[Unit]:
    """The plans a characterization measures, in the order of ``kinds``."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"characterize.units: unknown {unknown[0]!r}; known: {', '.join(KINDS)}")
    n_layers = 1 + max(p.layer for p in table.values())
    bad = [k for k in ks if not 1 <= k <= n_layers] if set(kinds) & set(CURVES) else []
    if bad:
        raise ValueError(f"characterize.k: {bad[0]} is not between 1 and the model's {n_layers} layers")
    options = dict(method_options or {})

    def at_rank(names):
        return Plan({n: min(rank, table[n].full_rank) for n in names}, method, options)

    out = []
    for kind in kinds:
        if kind == "module":
            out += [Unit(kind, n, 1, (p.layer,), at_rank([n])) for n, p in table.items()]
        elif kind == "layer":
            for layer in range(n_layers):
                names = [n for n, p in table.items() if p.layer == layer]
                out.append(Unit(kind, f"L{layer}", 1, (layer,), at_rank(names)))
        else:
            for k in ks:
                layers = tuple(curve_layers(kind, k, n_layers))
                plan = uniform_plan(table, rank, method=method, method_options=options, layers=set(layers))
                out.append(Unit(kind, f"{kind}-{k}", k, layers, plan))
    return out


def characterize(worker, todo: Sequence[Unit], csv: Optional[Path] = None, *, progress: bool = True) -> pd.DataFrame:
    """Measure the dense model once (a ``dense`` row), then every unit with ``worker`` (a
    :class:`dse.worker.Worker`). Rows already in ``csv`` are kept and not measured again; every
    new row is written to it at once (atomically)."""
    import pandas as pd

    from .io import atomic_write_text

    done = pd.read_csv(csv) if csv is not None and Path(csv).is_file() else pd.DataFrame()
    seen = set(zip(done["kind"], done["unit"])) if len(done) else set()
    rows: List[Dict] = done.to_dict("records")
    rank = max((r for u in todo for r in u.plan.ranks.values()), default=1)
    dense = Unit("dense", "dense", 0, (), Plan({}, worker.config.method, worker.config.method_options))
    pending = [u for u in [dense, *todo] if (u.kind, u.name) not in seen]
    base = next((r for r in rows if r["kind"] == "dense"), None)
    for unit in tqdm(pending, desc="characterize", disable=not progress):
        metrics = worker.measure(unit.plan)
        base = base or metrics
        row = {"kind": unit.kind, "unit": unit.name, "k": unit.k, "layers": " ".join(map(str, unit.layers)),
               "rank": rank if unit.plan.ranks else 0,
               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        if "accuracy" in base and "accuracy" in metrics:
            row["accuracy_drop"] = base["accuracy"] - metrics["accuracy"]
        if "perplexity" in base and "perplexity" in metrics:
            row["log_perplexity_ratio"] = math.log(metrics["perplexity"] / base["perplexity"])
        rows.append(row)
        if csv is not None:
            atomic_write_text(Path(csv), pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows)


def heatmap_frame(frame: pd.DataFrame, metric: str, table: Mapping) -> pd.DataFrame:
    """Layer x tensor-type table of ``metric`` from the ``module`` rows."""
    import pandas as pd

    from .arch import CANONICAL_TYPES

    rows = frame[frame["kind"] == "module"]
    cells = {n: (p.layer, p.type) for n, p in table.items()}
    types = [t for t in CANONICAL_TYPES if any(c[1] == t for c in cells.values())]
    layers = sorted({c[0] for c in cells.values()})
    out = pd.DataFrame(float("nan"), index=layers, columns=types)
    for _, row in rows.iterrows():
        layer, ttype = cells[row["unit"]]
        out.loc[layer, ttype] = row[metric]
    return out


def model_study(model: str, *, tasks: Sequence[str] = ("piqa", "arc_easy"), limit: int = 100,
                data_dir: Optional[str] = None, method: str = "svd", device: str = "cpu", dtype: str = "float32"):
    """A study config to characterize ``model`` alone: its tasks, rank-1 ``method`` and no search."""
    from .config import study_config_from_dict

    return study_config_from_dict({
        "name": "characterize", "model": model, "method": method, "device": device, "dtype": dtype,
        "space": {"name": "all", "model": model, "ranks": [1], "group": "shared"},
        "evaluation": {"tasks": list(tasks), "limit": limit, "data_dir": data_dir},
        "objectives": ["accuracy", "params"]})


def run_characterization(config, out, *, rank: int = 1, kinds: Sequence[str] = KINDS,
                         ks: Sequence[int] = (1, 2, 3, 4, 6), modules_by_perplexity: bool = False,
                         worker=None, progress: bool = True) -> pd.DataFrame:
    """Characterize the model of a study ``config`` into ``out``: ``characterization.csv`` (resumed
    if present), ``heatmap.{png,svg}`` and ``layers.{png,svg}`` for each measured metric.

    ``modules_by_perplexity``: single modules are measured on the study's perplexity alone (one
    module at rank 1 moves accuracy on a few hundred questions by less than its noise, and
    perplexity is much cheaper); layers and k-layer patterns get the full evaluation.
    ``worker`` reuses a loaded :class:`dse.worker.Worker` of the same model.
    """
    from .evaluate import EvalConfig, Evaluator
    from .worker import Worker

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    worker = worker or Worker.from_config(config, progress=progress)
    todo = units(worker.table, rank, kinds, ks, config.method, config.method_options)
    csv = out / "characterization.csv"
    if modules_by_perplexity:
        if config.evaluation.perplexity is None:
            raise ValueError("characterize: modules_by_perplexity needs evaluation.perplexity in the study")
        frame = characterize(worker, [u for u in todo if u.kind != "module"], csv, progress=progress)  # and dense
        full = worker.evaluator
        worker.evaluator = Evaluator(worker.model, worker.tokenizer,
                                     EvalConfig(tasks=[], perplexity=config.evaluation.perplexity))
        try:
            frame = characterize(worker, todo, csv, progress=progress)
        finally:
            worker.evaluator = full
    else:
        frame = characterize(worker, todo, csv, progress=progress)
    save_characterization_plots(frame, worker.table, out)
    return frame


def save_characterization_plots(frame: pd.DataFrame, table: Mapping, out: Path) -> List[Path]:
    from .plots import plot_layer_curves, plot_sensitivity, save_figure

    figures = {}
    for metric, curve in (("accuracy_drop", "accuracy"), ("log_perplexity_ratio", "perplexity")):
        if metric not in frame or frame[metric].isna().all():
            continue
        suffix = "" if metric == "accuracy_drop" else "-perplexity"
        if frame.loc[frame["kind"] == "module", metric].notna().any():
            figures[f"heatmap{suffix}"] = plot_sensitivity(frame, table, metric).figure
        if frame["kind"].isin(("layer",) + CURVES).any():
            figures[f"layers{suffix}"] = plot_layer_curves(frame, curve).figure
    return [path for name, figure in figures.items() for path in save_figure(figure, out / name)]
