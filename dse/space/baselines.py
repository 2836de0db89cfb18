"""Baseline plans a study enqueues (``baselines:``) or a benchmark compares against.

Each spec is plain data, parsed once into a :class:`Baseline` when the study is loaded
(:func:`parse_baseline`). A spec is the name of a kind (``dense``) or a mapping with exactly one
key that names a kind, plus that kind's options. The kinds are units of :data:`BASELINES`
(registered in :mod:`dse.space`):

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

from ..core.errors import ConfigError
from ..core.registry import Registry
from ..core.validate import check_keys, integer, is_int, is_number, number, resolve_path
from ..decompose import MethodConfig, Plan, uniform_plan
from ..model import n_layers


@dataclass(frozen=True)
class BaselineKind:
    """One kind of baseline: ``parse(spec, where, base)`` checks a spec mapping and returns its
    value (plain JSON data); ``plan(value, table, method, model_params)`` builds its plan;
    ``label(value)`` names it; ``form`` shows how a spec is written, ``options`` its keys besides
    the kind's own."""

    parse: Callable[[Mapping, str, Optional[Path]], Any]
    plan: Callable[..., Plan]
    label: Callable[[Any], str]
    form: str
    options: tuple = ()
    help: str = ""


BASELINES: Registry[BaselineKind] = Registry("baseline")


@dataclass(frozen=True)
class Baseline:
    """A parsed baseline spec: its kind, its value (JSON data, stored with the enqueued trial) and label."""

    kind: str
    value: Any

    @property
    def label(self) -> str:
        return BASELINES.get(self.kind).label(self.value)

    def plan(self, table: Mapping, method: MethodConfig, *, model_params: int = 0) -> Plan:
        return BASELINES.get(self.kind).plan(self.value, table, method, model_params=model_params)


def parse_baseline(spec, where: str, base: Optional[Path] = None) -> Baseline:
    """The :class:`Baseline` of one spec; ``base`` anchors a relative characterization path."""
    if isinstance(spec, str):
        kind = BASELINES.get(spec, where)
        return Baseline(spec, kind.parse({}, where, base))
    if isinstance(spec, Mapping):
        kinds = [k for k in spec if k in BASELINES]
        if len(kinds) == 1:
            kind = BASELINES.get(kinds[0])
            check_keys(spec, (kinds[0],) + kind.options, where)
            return Baseline(kinds[0], kind.parse(spec, where, base))
    forms = ", ".join(kind.form for kind in BASELINES.values())
    raise ConfigError(f"{where}: expected one of {forms}, got {spec!r}")


# --- the built-in kinds ------------------------------------------------------------------------


def parse_dense(spec, where, base):
    return None


def dense_plan(value, table, method, *, model_params=0) -> Plan:
    return Plan({}, method)


def parse_uniform(spec, where, base):
    value = spec["uniform"]
    if not is_number(value) or value <= 0:
        raise ConfigError(f"{where}.uniform: expected a rank >= 1 or a fraction of full rank in (0, 1), got {value!r}")
    return value


def uniform_rank_plan(value, table, method, *, model_params=0) -> Plan:
    from .grid import resolve_rank

    return Plan({n: resolve_rank(value, p.full_rank) for n, p in table.items()}, method)


def parse_ratio(spec, where, base):
    return number(spec["ratio"], f"{where}.ratio", 0, 1, open_low=True, open_high=True)


def ratio_plan(value, table, method, *, model_params=0) -> Plan:
    return uniform_plan(table, ratio=value, method=method)


def parse_layers(spec, where, base):
    layers, rank = spec["layers"], spec.get("rank", 1)
    ok = (is_int(layers) and layers >= 1) or (
        isinstance(layers, list) and layers and all(is_int(v) and v >= 0 for v in layers)
    )
    if not ok:
        raise ConfigError(f"{where}.layers: expected a count >= 1 or a list of layer indices, got {layers!r}")
    return {"layers": layers, "rank": integer(rank, f"{where}.rank", 1)}


def layers_plan(value, table, method, *, model_params=0) -> Plan:
    count = n_layers(table)
    layers = value["layers"]
    chosen = spread_layers(count, layers) if isinstance(layers, int) else layers
    missing = [layer for layer in chosen if layer >= count]
    if missing:
        raise ConfigError(f"baselines.layers: layer {missing[0]} does not exist (the model has {count})")
    return uniform_plan(table, value["rank"], method=method, layers=set(chosen))


def layers_label(value) -> str:
    layers = value["layers"]
    count = layers if isinstance(layers, int) else "-".join(map(str, layers))
    return f"layers-{count}-rank{value['rank']}"


def parse_sensitivity(spec, where, base):
    fraction = number(spec["sensitivity"], f"{where}.sensitivity", 0, 1, open_low=True, open_high=True)
    path = spec.get("characterization")
    if not isinstance(path, str):
        raise ConfigError(f"{where}.characterization: expected the path of a `dse characterize` CSV")
    path = resolve_path(base, path, f"{where}.characterization")
    if not path.is_file():
        raise ConfigError(f"{where}.characterization: no such file {str(path)!r}")
    rank = spec.get("rank")
    if rank is not None:
        integer(rank, f"{where}.rank", 1)
    return {"fraction": fraction, "characterization": str(path), "rank": rank}


def sensitivity_baseline_plan(value, table, method, *, model_params=0) -> Plan:
    import pandas as pd

    frame = pd.read_csv(value["characterization"])
    return sensitivity_plan(
        frame, table, value["fraction"], model_params=model_params, rank=value["rank"], method=method
    )


def spread_layers(count: int, k: int) -> List[int]:
    """``k`` inner layers (not the first or last) of ``count`` spread evenly; no two adjacent when possible."""
    inner = list(range(1, count - 1)) or list(range(count))
    k = min(k, len(inner))
    if k == 1:
        return [inner[len(inner) // 2]]
    step = (len(inner) - 1) / (k - 1)
    return sorted({inner[round(i * step)] for i in range(k)})


def sensitivity_plan(
    frame,
    table: Mapping,
    fraction: float,
    *,
    model_params: int,
    rank: Optional[int] = None,
    method="svd",
    metric: Optional[str] = None,
) -> Plan:
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
        saved = p.dense_params - r * (p.out_features + p.in_features)
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
        raise ConfigError(
            f"baselines.sensitivity: decomposing every module at rank {rank} removes only "
            f"{removed / model_params:.1%} of the parameters, not {fraction:.1%}"
        )
    return Plan({n: ranks[n] for n in table if n in ranks}, method)
