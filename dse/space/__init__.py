"""Search spaces: grid spaces (layers x tensor types x ranks, grouped, with pruning rules),
allocation spaces (a fixed budget spread by importance), baseline plans, sensitivity probes and
the error model of a plan with its exact minimiser (:mod:`~dse.space.errormodel`, :mod:`~dse.space.knapsack`).

:func:`load_space` reads a space file: an allocation space when it has ``budget:``, else a grid
space. The built-in groups, allocation starts, baseline kinds and probe kinds register here; each
is one unit of its registry (:data:`GROUPS`, :data:`STARTS`, :data:`BASELINES`, :data:`PROBE_KINDS`).
"""

from typing import Mapping, Union

from ..core.errors import SpaceError
from ..core.validate import read_yaml
from .allocation import (
    STARTS,
    AllocationError,
    AllocationSpace,
    Budget,
    Start,
    allocate,
    flat_start,
    importance,
    sensitivity_start,
)
from .baselines import (
    BASELINES,
    Baseline,
    BaselineKind,
    dense_plan,
    layers_label,
    layers_plan,
    parse_baseline,
    parse_dense,
    parse_layers,
    parse_ratio,
    parse_sensitivity,
    parse_uniform,
    ratio_plan,
    sensitivity_baseline_plan,
    sensitivity_plan,
    spread_layers,
    uniform_rank_plan,
)
from .errormodel import ErrorModel, Observation, fit
from .fields import SpaceContext
from .grid import Layout, Rules, Space, format_counts, label, resolve_rank
from .groups import DENSE, GROUPS, Group, LayerGroup, LayerXTypeGroup, ModuleGroup, SharedGroup, TypeGroup
from .knapsack import Program, best_plan, candidate_ranks, errormodel_start, grid_plan, grid_sizes, solve
from .probes import (
    PROBE_KINDS,
    ProbeKind,
    Unit,
    adjacent_layers,
    curve_layers,
    curves,
    first_layers,
    heatmap_frame,
    last_layers,
    layer_units,
    module_units,
    spread_curve,
    units,
)

GROUPS.register("module", ModuleGroup())
GROUPS.register("layer", LayerGroup())
GROUPS.register("type", TypeGroup())
GROUPS.register("shared", SharedGroup())
GROUPS.register("layer_x_type", LayerXTypeGroup())

STARTS.register("flat", Start(flat_start, help="every weight 1: the importance estimate alone decides"))
STARTS.register(
    "sensitivity",
    Start(sensitivity_start, measures=True, help="weights from each probe's measured loss per removed parameter"),
)
STARTS.register(
    "errormodel",
    Start(errormodel_start, measures=True, help="the error model's optimum, fitted to the sensitivity probes"),
)

BASELINES.register(
    "dense", BaselineKind(parse_dense, dense_plan, lambda value: "dense", "'dense'", help="the undecomposed model")
)
BASELINES.register(
    "uniform",
    BaselineKind(
        parse_uniform,
        uniform_rank_plan,
        lambda value: f"uniform-{value}",
        "{uniform: RANK or FRACTION}",
        help="every projection at one rank, or one fraction of its full rank",
    ),
)
BASELINES.register(
    "ratio",
    BaselineKind(
        parse_ratio,
        ratio_plan,
        lambda value: f"ratio-{value}",
        "{ratio: R in (0, 1)}",
        help="every projection loses R of its parameters (SVD-LLM's rule)",
    ),
)
BASELINES.register(
    "layers",
    BaselineKind(
        parse_layers,
        layers_plan,
        layers_label,
        "{layers: N or [l, ...], rank: r}",
        options=("rank",),
        help="whole layers at one rank (the seed thesis' form)",
    ),
)
BASELINES.register(
    "sensitivity",
    BaselineKind(
        parse_sensitivity,
        sensitivity_baseline_plan,
        lambda value: f"sensitivity-{value['fraction']:g}",
        "{sensitivity: F, characterization: CSV}",
        options=("characterization", "rank"),
        help="the least sensitive modules first, from a characterization",
    ),
)

PROBE_KINDS.register("module", ProbeKind(units=module_units, help="one projection alone"))
PROBE_KINDS.register("layer", ProbeKind(units=layer_units, help="all projections of one layer"))
PROBE_KINDS.register("first", ProbeKind(layers=first_layers, help="the first k layers"))
PROBE_KINDS.register("last", ProbeKind(layers=last_layers, help="the last k layers"))
PROBE_KINDS.register("spread", ProbeKind(layers=spread_curve, help="k inner layers spread evenly"))
PROBE_KINDS.register("adjacent", ProbeKind(layers=adjacent_layers, help="k consecutive layers in the middle"))

AnySpace = Union[Space, AllocationSpace]


def space_from_dict(data: Mapping) -> AnySpace:
    """A grid :class:`Space`, or an :class:`AllocationSpace` when ``data`` has ``budget``."""
    if isinstance(data, Mapping) and "budget" in data:
        return AllocationSpace.from_dict(data)
    return Space.from_dict(data)


def load_space(path) -> AnySpace:
    """The space in a YAML file: see :func:`space_from_dict`."""
    return space_from_dict(read_yaml(path, "space", SpaceError))


__all__ = [
    "SpaceContext",
    "BASELINES",
    "DENSE",
    "GROUPS",
    "PROBE_KINDS",
    "STARTS",
    "AllocationError",
    "AllocationSpace",
    "AnySpace",
    "Baseline",
    "BaselineKind",
    "Budget",
    "ErrorModel",
    "Observation",
    "Group",
    "Layout",
    "ProbeKind",
    "Program",
    "Rules",
    "Space",
    "SpaceError",
    "Start",
    "Unit",
    "allocate",
    "best_plan",
    "grid_plan",
    "grid_sizes",
    "candidate_ranks",
    "fit",
    "solve",
    "curve_layers",
    "curves",
    "format_counts",
    "heatmap_frame",
    "importance",
    "label",
    "load_space",
    "parse_baseline",
    "resolve_rank",
    "sensitivity_plan",
    "space_from_dict",
    "spread_layers",
    "units",
]
