"""Sensitivity probes: the plans a characterization measures, one registered kind at a time.

The seed thesis measured by hand what each module, each layer and each pattern of k layers costs
Llama-2-7B. :func:`units` lists those plans, all at one rank (default 1) with one method; the
kinds are units of :data:`PROBE_KINDS` (registered in :mod:`dse.space`):

- ``module``: one projection alone (``model.layers.3.self_attn.q_proj``), the layer x type heatmap;
- ``layer``: all projections of one layer (``L3``);
- ``first`` / ``last`` / ``spread`` / ``adjacent`` with ``k`` layers (*curves*): whole layers
  0..k-1, the last k, k spread evenly over the inner layers
  (:func:`dse.space.baselines.spread_layers`), and k consecutive layers in the middle of the model.

:func:`heatmap_frame` reads the ``module`` rows of a characterization back into a layer x type
table. Measuring is the study's business (:mod:`dse.study.characterize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Mapping, Sequence

from ..core.errors import ConfigError
from ..core.registry import Registry
from ..decompose import MethodConfig, Plan, uniform_plan
from ..model import n_layers, tensor_types
from .baselines import spread_layers

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Unit:
    kind: str
    name: str  # the module, "L3", or "first-3"
    k: int  # layers involved (1 for a module)
    layers: tuple
    plan: Plan


@dataclass(frozen=True)
class ProbeKind:
    """A kind of probe. A *curve* kind picks ``k`` whole layers of ``count`` with
    ``layers(k, count)``, one unit per ``k``; other kinds list their units with
    ``units(table, at_rank)`` (``at_rank(names)``: those modules at the probe rank)."""

    layers: Callable[[int, int], List[int]] = None
    units: Callable[[Mapping, Callable[[Sequence[str]], Plan]], List[Unit]] = None
    help: str = ""

    @property
    def curve(self) -> bool:
        return self.layers is not None


PROBE_KINDS: Registry[ProbeKind] = Registry("probe kind")


def module_units(table, at_rank) -> List[Unit]:
    return [Unit("module", n, 1, (p.layer,), at_rank([n])) for n, p in table.items()]


def layer_units(table, at_rank) -> List[Unit]:
    return [
        Unit("layer", f"L{layer}", 1, (layer,), at_rank([n for n, p in table.items() if p.layer == layer]))
        for layer in range(n_layers(table))
    ]


def first_layers(k: int, count: int) -> List[int]:
    return list(range(k))


def last_layers(k: int, count: int) -> List[int]:
    return list(range(count - k, count))


def spread_curve(k: int, count: int) -> List[int]:
    return spread_layers(count, k)


def adjacent_layers(k: int, count: int) -> List[int]:
    start = max(0, (count - k) // 2)
    return list(range(start, start + k))


def curves() -> List[str]:
    """The names of the curve kinds, in registration order."""
    return PROBE_KINDS.where(lambda kind: kind.curve)


def curve_layers(kind: str, k: int, count: int) -> List[int]:
    return PROBE_KINDS.get(kind, "kinds").layers(k, count)


def units(
    table: Mapping,
    rank: int = 1,
    kinds: Sequence[str] = None,
    ks: Sequence[int] = (1, 2, 3, 4, 6),
    method: MethodConfig = "svd",
) -> List[Unit]:
    """The plans a characterization measures, in the order of ``kinds`` (default: every kind)."""
    kinds = list(PROBE_KINDS) if kinds is None else kinds
    units_of = {kind: PROBE_KINDS.get(kind, "kinds") for kind in kinds}
    count = n_layers(table)
    bad = [k for k in ks if not 1 <= k <= count] if any(u.curve for u in units_of.values()) else []
    if bad:
        raise ConfigError(f"k: {bad[0]} is not between 1 and the model's {count} layers")

    def at_rank(names):
        return Plan({n: min(rank, table[n].full_rank) for n in names}, method)

    out: List[Unit] = []
    for kind, unit in units_of.items():
        if not unit.curve:
            out += unit.units(table, at_rank)
            continue
        for k in ks:
            layers = tuple(unit.layers(k, count))
            out.append(
                Unit(kind, f"{kind}-{k}", k, layers, uniform_plan(table, rank, method=method, layers=set(layers)))
            )
    return out


def heatmap_frame(frame: "pd.DataFrame", metric: str, table: Mapping) -> "pd.DataFrame":
    """Layer x tensor-type table of ``metric`` from the ``module`` rows of a characterization."""
    import pandas as pd

    rows = frame[frame["kind"] == "module"]
    out = pd.DataFrame(float("nan"), index=sorted({p.layer for p in table.values()}), columns=tensor_types(table))
    for _, row in rows.iterrows():
        p = table[row["unit"]]
        out.loc[p.layer, p.type] = row[metric]
    return out
