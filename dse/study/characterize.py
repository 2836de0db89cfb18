"""Sensitivity characterization: measure what each module, each layer and each pattern of k layers
costs, with a study's worker.

The plans are the probes of :mod:`dse.space.probes` (module, layer, and the k-layer curves first,
last, spread, adjacent), all at one rank with the study's method. :func:`characterize` measures
each with the study's worker (the factor cache makes each a truncation plus an evaluation) and
appends a row per probe to a CSV as it goes, so an interrupted run resumes where it stopped. Rows
hold the probe, its size and every metric, plus ``accuracy_drop`` (points as a fraction, dense
minus decomposed) and ``log_perplexity_ratio``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

from tqdm.auto import tqdm

from ..core.errors import ConfigError
from ..core.io import atomic_write_text
from ..decompose import Plan
from ..evaluate import EvalConfig
from ..results.plots import plot_layer_curves, plot_sensitivity, save_figure
from ..space import Unit, curves, units
from .config import study_config_from_dict
from .measure import Measurer

if TYPE_CHECKING:
    import pandas as pd


def characterize(measurer, todo: Sequence[Unit], csv: Optional[Path] = None, *, progress: bool = True) -> pd.DataFrame:
    """Measure the dense model once (a ``dense`` row), then every unit with ``measurer`` (a
    :class:`dse.study.measure.Measurer`). Rows already in ``csv`` are kept and not measured again; every
    new row is written to it at once (atomically)."""
    import pandas as pd

    done = pd.read_csv(csv) if csv is not None and Path(csv).is_file() else pd.DataFrame()
    seen = set(zip(done["kind"], done["unit"])) if len(done) else set()
    rows: List[Dict] = done.to_dict("records")
    rank = max((r for u in todo for r in u.plan.ranks.values()), default=1)
    dense = Unit("dense", "dense", 0, (), Plan({}, measurer.config.method))
    pending = [u for u in [dense, *todo] if (u.kind, u.name) not in seen]
    base = next((r for r in rows if r["kind"] == "dense"), None)
    for unit in tqdm(pending, desc="characterize", disable=not progress):
        metrics = measurer.measure(unit.plan)
        base = base or metrics
        row = {
            "kind": unit.kind,
            "unit": unit.name,
            "k": unit.k,
            "layers": " ".join(map(str, unit.layers)),
            "rank": rank if unit.plan.ranks else 0,
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        if "accuracy" in base and "accuracy" in metrics:
            row["accuracy_drop"] = base["accuracy"] - metrics["accuracy"]
        if "perplexity" in base and "perplexity" in metrics:
            row["log_perplexity_ratio"] = math.log(metrics["perplexity"] / base["perplexity"])
        rows.append(row)
        if csv is not None:
            atomic_write_text(Path(csv), pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows)


def model_study(
    model: str,
    *,
    tasks: Sequence[str] = ("piqa", "arc_easy"),
    limit: int = 100,
    data_dir: Optional[str] = None,
    method: str = "svd",
    device: str = "cpu",
    dtype: str = "float32",
    family: Optional[str] = None,
):
    """A study config to characterize ``model`` (of ``family``, default: the one recognised) alone:
    its tasks, rank-1 ``method`` and no search."""
    return study_config_from_dict(
        {
            "name": "characterize",
            "model": model,
            "family": family,
            "method": method,
            "device": device,
            "dtype": dtype,
            "space": {"name": "all", "model": model, "ranks": [1], "group": "shared"},
            "evaluation": {"tasks": list(tasks), "limit": limit, "data_dir": data_dir},
            "objectives": ["accuracy", "params"],
        }
    )


def run_characterization(
    config,
    out,
    *,
    rank: int = 1,
    kinds: Optional[Sequence[str]] = None,
    ks: Sequence[int] = (1, 2, 3, 4, 6),
    modules_by_perplexity: bool = False,
    measurer=None,
    progress: bool = True,
) -> pd.DataFrame:
    """Characterize the model of a study ``config`` into ``out``: ``characterization.csv`` (resumed
    if present), ``heatmap.{png,svg}`` and ``layers.{png,svg}`` for each measured metric.

    ``modules_by_perplexity``: single modules are measured on the study's perplexity alone (one
    module at rank 1 moves accuracy on a few hundred questions by less than its noise, and
    perplexity is much cheaper); layers and k-layer patterns get the full evaluation.
    ``kinds`` default to every registered probe kind. ``measurer`` reuses a loaded
    :class:`dse.study.measure.Measurer` of the same model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    measurer = measurer.for_study(config) if measurer is not None else Measurer.from_config(config, progress)
    todo = units(measurer.table, rank, kinds, ks, config.method)
    csv = out / "characterization.csv"
    if modules_by_perplexity:
        if config.evaluation.perplexity is None:
            raise ConfigError("evaluation.perplexity: --modules-by-perplexity needs it in the study")
        frame = characterize(measurer, [u for u in todo if u.kind != "module"], csv, progress=progress)  # and dense
        by_perplexity = measurer.with_evaluation(EvalConfig(tasks=[], perplexity=config.evaluation.perplexity))
        frame = characterize(by_perplexity, todo, csv, progress=progress)
    else:
        frame = characterize(measurer, todo, csv, progress=progress)
    save_characterization_plots(frame, measurer.table, out)
    return frame


def save_characterization_plots(frame: pd.DataFrame, table: Mapping, out: Path) -> List[Path]:
    figures = {}
    for metric, curve in (("accuracy_drop", "accuracy"), ("log_perplexity_ratio", "perplexity")):
        if metric not in frame or frame[metric].isna().all():
            continue
        suffix = "" if metric == "accuracy_drop" else "-perplexity"
        if frame.loc[frame["kind"] == "module", metric].notna().any():
            figures[f"heatmap{suffix}"] = plot_sensitivity(frame, table, metric).figure
        if frame["kind"].isin(["layer", *curves()]).any():
            figures[f"layers{suffix}"] = plot_layer_curves(frame, curve).figure
    return [path for name, figure in figures.items() for path in save_figure(figure, out / name)]
