"""Baseline plans a study enqueues (``baselines:``) or a benchmark compares against.

Each spec is plain data, checked by :func:`parse_baseline` when the study is loaded:

- ``dense``: the undecomposed model;
- ``{uniform: r}``: every projection at rank ``r`` (an int), or at that fraction of its full rank;
- ``{ratio: R}``: every projection loses ``R`` of its parameters (SVD-LLM's rule,
  rank ``int(m·n·(1−R)/(m+n))``);
- ``{layers: N or [l, ...], rank: r}``: whole layers at rank ``r`` (default 1), the seed thesis'
  hand-picked form. ``N`` picks ``N`` layers spread evenly over the inner layers (never the first
  or last, never two adjacent when the model has room), after its finding that early and
  adjacent layers are the sensitive ones;
- ``{sensitivity: F, characterization: CSV, rank: r}``: sensitivity-guided: decompose the modules
  at rank ``r`` (default: the characterization's) in order of least measured loss per removed
  parameter, until ``F`` of the whole model's parameters are removed (see :func:`sensitivity_plan`).
  ``CSV`` is a ``dse characterize`` result with a ``module`` row per projection.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from .config import ConfigError
from .plan import Plan, uniform_plan

_FORMS = ("'dense', {uniform: RANK or FRACTION}, {ratio: R in (0, 1)}, {layers: N or [l, ...], rank: r} "
          "or {sensitivity: F, characterization: CSV}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_baseline(spec, where: str, base: Optional[Path] = None) -> Tuple[str, Any]:
    """``(kind, value)`` of one baseline spec; ``base`` anchors a relative characterization path."""
    if spec == "dense":
        return ("dense", None)
    if isinstance(spec, Mapping) and len(spec) == 1:
        (kind, value), = spec.items()
        if kind == "uniform" and _number(value) and value > 0:
            return (kind, value)
        if kind == "ratio" and _number(value) and 0 < value < 1:
            return (kind, float(value))
    if isinstance(spec, Mapping) and "layers" in spec:
        unknown = sorted(set(spec) - {"layers", "rank"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (a layers baseline has layers, rank)")
        layers, rank = spec["layers"], spec.get("rank", 1)
        ok_layers = _positive_int(layers) or \
            (isinstance(layers, list) and layers and all(isinstance(v, int) and v >= 0 for v in layers))
        if not ok_layers:
            raise ConfigError(f"{where}.layers: expected a count >= 1 or a list of layer indices, got {layers!r}")
        if not _positive_int(rank):
            raise ConfigError(f"{where}.rank: expected an integer >= 1, got {rank!r}")
        return ("layers", {"layers": layers, "rank": rank})
    if isinstance(spec, Mapping) and "sensitivity" in spec:
        unknown = sorted(set(spec) - {"sensitivity", "characterization", "rank"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (a sensitivity baseline has sensitivity, "
                              "characterization, rank)")
        fraction = spec["sensitivity"]
        if not (_number(fraction) and 0 < fraction < 1):
            raise ConfigError(f"{where}.sensitivity: expected the fraction of parameters to remove, in (0, 1), "
                              f"got {fraction!r}")
        path = spec.get("characterization")
        if not isinstance(path, str):
            raise ConfigError(f"{where}.characterization: expected the path of a `dse characterize` CSV")
        path = Path(path).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        if not path.is_file():
            raise ConfigError(f"{where}.characterization: no such file {str(path)!r}")
        rank = spec.get("rank")
        if rank is not None and not _positive_int(rank):
            raise ConfigError(f"{where}.rank: expected an integer >= 1, got {rank!r}")
        return ("sensitivity", {"fraction": float(fraction), "characterization": str(path), "rank": rank})
    raise ConfigError(f"{where}: expected {_FORMS}, got {spec!r}")


def baseline_label(kind: str, value) -> str:
    """A short name: ``dense``, ``uniform-1``, ``ratio-0.2``, ``layers-3-rank1``, ``sensitivity-0.1``."""
    if value is None:
        return kind
    if kind == "layers":
        layers = value["layers"]
        count = layers if isinstance(layers, int) else "-".join(map(str, layers))
        return f"layers-{count}-rank{value['rank']}"
    if kind == "sensitivity":
        return f"sensitivity-{value['fraction']:g}"
    return f"{kind}-{value}"


def spread_layers(n_layers: int, count: int) -> List[int]:
    """``count`` inner layers (not the first or last) spread evenly; no two adjacent when possible."""
    inner = list(range(1, n_layers - 1)) or list(range(n_layers))
    count = min(count, len(inner))
    if count == 1:
        return [inner[len(inner) // 2]]
    step = (len(inner) - 1) / (count - 1)
    return sorted({inner[round(i * step)] for i in range(count)})


def baseline_plan(kind: str, value, table: Mapping, method: str = "svd", method_options=None, *,
                  model_params: int = 0) -> Plan:
    """The plan of a parsed baseline spec over a projection table."""
    from .space import resolve_rank

    options = dict(method_options or {})
    if kind == "dense":
        return Plan({}, method, options)
    if kind == "ratio":
        return uniform_plan(table, ratio=value, method=method, method_options=options)
    if kind == "uniform":
        return Plan({n: resolve_rank(value, p.full_rank) for n, p in table.items()}, method, options)
    if kind == "layers":
        n_layers = 1 + max(p.layer for p in table.values())
        layers = value["layers"]
        chosen = spread_layers(n_layers, layers) if isinstance(layers, int) else layers
        missing = [layer for layer in chosen if layer >= n_layers]
        if missing:
            raise ConfigError(f"baselines.layers: layer {missing[0]} does not exist (the model has {n_layers})")
        return uniform_plan(table, value["rank"], method=method, method_options=options, layers=set(chosen))
    if kind == "sensitivity":
        import pandas as pd

        frame = pd.read_csv(value["characterization"])
        return sensitivity_plan(frame, table, value["fraction"], model_params=model_params, rank=value["rank"],
                                method=method, method_options=options)
    raise ValueError(f"baseline: unknown kind {kind!r}")


def sensitivity_plan(frame, table: Mapping, fraction: float, *, model_params: int, rank: Optional[int] = None,
                     method: str = "svd", method_options=None, metric: Optional[str] = None) -> Plan:
    """Modules at ``rank`` in order of least loss per removed parameter until ``fraction`` of
    ``model_params`` is removed. ``frame``: ``dse characterize`` rows; the loss is the accuracy drop
    when the frame has accuracy, else the log perplexity ratio (``metric`` picks one)."""
    rows = frame[frame["kind"] == "module"]
    if rows.empty:
        raise ConfigError("baselines.characterization: the file has no single-module rows (kind == 'module')")
    rank = int(rows["rank"].iloc[0]) if rank is None else rank
    has_accuracy = "accuracy_drop" in rows and rows["accuracy_drop"].notna().all()
    metric = metric or ("accuracy_drop" if has_accuracy else "log_perplexity_ratio")
    target = fraction * model_params
    order = []
    for _, row in rows.iterrows():
        p = table.get(row["unit"])
        if p is None:
            raise ConfigError(f"baselines.characterization: module {row['unit']!r} is not in this model")
        r = min(rank, p.full_rank)
        saved = p.out_features * p.in_features - r * (p.out_features + p.in_features)
        if saved > 0:
            order.append((max(float(row[metric]), 0.0) / saved, row["unit"], r, saved))
    order.sort(key=lambda item: (item[0], -item[3]))
    ranks, removed = {}, 0
    for _, name, r, saved in order:
        if removed >= target:
            break
        ranks[name] = r
        removed += saved
    if removed < target and not math.isclose(removed, target):
        raise ConfigError(f"baselines.sensitivity: decomposing every module at rank {rank} removes only "
                          f"{removed / model_params:.1%} of the parameters, not {fraction:.1%}")
    return Plan({n: ranks[n] for n in table if n in ranks}, method, dict(method_options or {}))
