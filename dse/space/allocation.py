"""Allocation spaces: spend one budget (parameters, or predicted latency) across modules; the
search picks *where*.

A grid space (:mod:`dse.space`) lets the sampler pick ranks freely, so plans land at any size.
An allocation space fixes the size and searches how to spread it::

    name: smollm2-budget
    model: smollm2-135m
    layers: all                      # as in a grid space
    types: [q, k, v, o, gate, up, down]
    budget: {ratio: 0.2}             # or {params: 0.85}, or {latency: 0.8}
    weights: {low: 0.1, high: 10, layer_knots: 4}
    starts: [flat, sensitivity]     # or errormodel (dse.space.knapsack)

**Budget.** ``ratio: R``: the size of SVD-LLM's uniform rule on the selected modules (each loses
``R`` of its parameters, rank ``int(m·n·(1−R)/(m+n))``); ``params: F``: the whole model keeps the
fraction ``F`` of its parameters. Every plan of the space keeps at most that many parameters.
``latency: F``: the whole model's predicted decode step (the study's latency table,
:mod:`dse.decompose.latency`) is at most ``F`` of the dense model's; ranks are then paid in
predicted milliseconds (:class:`LatencyCost`) instead of parameters (:class:`ParamCost`).

**Importance** (:func:`importance`): dropping component ``i`` of a module changes its output by
``U_i S_i (Vh_i x)``; weighting each output channel ``o`` by ``g_o``, the mean squared gradient of
the loss with respect to it (a diagonal Fisher estimate, from calibration with ``gradients``),
estimates the loss increase as ``S_i² · Σ_o g_o U_oi² · Vh_i C Vh_iᵀ`` (up to a common factor),
with ``C = E[x xᵀ]`` the calibration's second moment of the module's input. For ``svdllm`` the
components are whitened, so the last factor is 1 (less the ridge); for ``svd`` and ``asvd`` it is
what makes a component that the inputs rarely excite cheap to drop.

**Allocation** (:func:`allocate`, pure): every selected module starts at rank 1; then components
are added in decreasing order of ``weight · importance_i / (m + n)`` (estimated loss avoided per
parameter spent; per predicted millisecond under a latency budget) while they fit in the budget.
A module whose next rank costs as much as the dense matrix (``m·n / (m + n)`` parameters, or its
measured break-even rank) is left dense instead (cheaper, and exact).

**Parameters.** The sampler sets the weights: one per tensor type (``type.q`` ...) and, with
``layer_knots: K >= 2``, a profile over layers (``layer.0`` ... ``layer.K-1`` at evenly spaced
layers, interpolated linearly in log space); a module's weight is its type's times its layer's.
All are log-uniform in ``[low, high]`` (default ``[0.1, 10]``: factors around the importance
estimate; on SmolLM2 a range of ``[1e-3, 1e3]`` left TPE unable to beat the starts).

**Alignment.** ``align: N`` rounds every allocated rank of at least ``N`` down to a multiple of
``N``; ``align: auto`` to each shape's measured fast step (the study's latency table), as in a grid
space. The ``errormodel`` start and sampler (:mod:`dse.space.knapsack`) choose among aligned ranks only.

**Starts** (enqueued once per study): ``flat`` (every weight 1: the spectrum alone decides) and
``sensitivity`` (weights from measured sensitivity: each type and each knot's band of layers is
cut alone at the budget's average ratio, and its weight is its loss per removed parameter
relative to the geometric mean; see :meth:`AllocationSpace.sensitivity_params`). With every
weight 1 the allocation is the importance estimate alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from ..core.errors import SpaceError
from ..core.registry import Registry
from ..core.validate import integer, is_int, mapping, number
from ..decompose import MethodConfig, Plan, align_rank, as_config, get_method, uniform_plan
from .fields import ModelSpace, SpaceContext, parse_layers, parse_model, parse_types

if TYPE_CHECKING:
    import torch

Measure = Callable[[str, Plan], float]  # (probe name, plan) -> loss increase (> 0 is worse)


class ParamCost:
    """What an allocation spends: parameters. Rank ``r`` of an ``m × n`` module costs ``r·(m+n)``."""

    what = "parameters"

    def unit(self, p) -> float:
        """The cost of one more component, for ranking components."""
        return p.out_features + p.in_features

    def curve(self, p) -> np.ndarray:
        """The cost at each rank ``0 .. full + 1``."""
        return np.arange(p.full_rank + 2, dtype=np.int64) * (p.out_features + p.in_features)

    def dense(self, p) -> int:
        return p.dense_params


class LatencyCost:
    """What an allocation spends: predicted decode milliseconds (:class:`dse.decompose.latency.LatencyTable`).

    ``table`` is the whole model's projection table; ``total`` its predicted dense decode step."""

    what = "predicted decode ms"

    def __init__(self, latency, table: Mapping):
        self.latency = latency
        self.total = latency.predict(Plan({}), table)["predicted_decode_ms"]

    def unit(self, p) -> float:
        curve = self.curve(p)
        top = max(2, min(self.latency.cost(p).break_even(), p.full_rank))
        return max((curve[top] - curve[1]) / (top - 1), 1e-9)

    def curve(self, p) -> np.ndarray:
        return self.latency.cost(p).at(np.arange(p.full_rank + 2))

    def dense(self, p) -> float:
        return self.latency.module_ms(p, None)


@dataclass(frozen=True)
class Budget:
    """What every plan keeps: exactly one of ``ratio``, ``params`` and ``latency`` (see the module doc)."""

    ratio: Optional[float] = None
    params: Optional[float] = None
    latency: Optional[float] = None

    def cost(self, latency=None, table: Optional[Mapping] = None):
        """The cost a plan spends under this budget: :class:`ParamCost`, or :class:`LatencyCost` over
        ``latency`` (a latency table) for ``table`` (the model's projections)."""
        if self.latency is None:
            return ParamCost()
        if latency is None:
            raise SpaceError("space.budget.latency: needs the study's latency table (none was given)")
        return LatencyCost(latency, table)

    def kept(self, selected: Mapping, model_params: int, cost=None):
        """What the ``selected`` projections may keep in total under ``cost`` (default parameters):
        weights, or predicted decode milliseconds."""
        cost = cost or ParamCost()
        if self.ratio is not None:
            return uniform_plan(selected, ratio=self.ratio).params(selected)
        dense = sum(cost.dense(p) for p in selected.values())
        if self.latency is not None:
            return self.latency * cost.total - (cost.total - dense)
        return int(self.params * model_params) - (model_params - dense)

    def label(self) -> str:
        kind = next(k for k in ("ratio", "params", "latency") if getattr(self, k) is not None)
        return f"{kind} {getattr(self, kind):g}"


class AllocationError(SpaceError):
    pass


def importance(form, out_grad: torch.Tensor, xtx: torch.Tensor) -> np.ndarray:
    """``S_i² · Σ_o g_o U_oi² · Vh_i C Vh_iᵀ`` per component of an SVD form, with ``out_grad`` the
    ``g_o`` and ``xtx`` the input second moment ``C`` (see the module doc)."""
    U, S, Vh = form.U.detach().double(), form.S.detach().double(), form.Vh.detach().double()
    excited = ((Vh @ xtx.to(Vh)) * Vh).sum(1)
    return (S.pow(2) * (out_grad.to(U)[:, None] * U.pow(2)).sum(0) * excited).cpu().numpy()


def allocate(
    selected: Mapping, importances: Mapping[str, np.ndarray], kept, weights: Mapping[str, float], cost=None
) -> Dict[str, int]:
    """Ranks of the modules that stay decomposed, spending at most ``kept`` in total.

    ``selected``: projection table entries; ``importances``: each module's per-component
    :func:`importance` (in component order); ``weights``: each module's multiplier; ``cost``: what a
    rank costs (:class:`ParamCost`, the default, or :class:`LatencyCost`).
    """
    cost = cost or ParamCost()
    names = list(selected)
    units = np.array([cost.unit(selected[n]) for n in names])
    curves = [cost.curve(selected[n]) for n in names]
    dense = [cost.dense(selected[n]) for n in names]
    used = sum(curve[1] for curve in curves)
    if used > kept:
        raise AllocationError(
            f"space.budget: keeps {kept:.6g} {cost.what}, but rank 1 on all {len(names)} "
            f"selected modules needs {used:.6g}"
        )
    score, owner = [], []
    for j, n in enumerate(names):
        gain = np.asarray(importances[n])[1 : selected[n].full_rank]
        score.append(weights[n] * gain / units[j])
        owner.append(np.full(len(gain), j))
    score, owner = np.concatenate(score), np.concatenate(owner)
    rank = np.ones(len(names), dtype=np.int64)
    is_dense = np.zeros(len(names), dtype=bool)
    cheapest = min(curve[2] - curve[1] for curve in curves)
    for j in owner[np.argsort(-score, kind="stable")]:
        if kept - used < cheapest:
            break
        if is_dense[j]:
            continue
        curve, r = curves[j], rank[j]
        grows = curve[r + 1] < dense[j]
        step = curve[r + 1] - curve[r] if grows else dense[j] - curve[r]
        if used + step <= kept:
            used += step
            if grows:
                rank[j] += 1
            else:
                is_dense[j] = True
    return {n: int(rank[j]) for j, n in enumerate(names) if not is_dense[j]}


@dataclass(frozen=True)
class AllocationSpace(ModelSpace):
    name: str
    budget: Budget
    model: Optional[str] = None
    model_config: Optional[Mapping[str, Any]] = None
    family: Optional[str] = None
    layers: Any = "all"
    types: Optional[Tuple[str, ...]] = None
    low: float = 0.1
    high: float = 10.0
    layer_knots: int = 4
    starts: Tuple[str, ...] = ("flat", "sensitivity")
    align: Union[int, str] = 1  # or "auto": each shape's measured fast step (a latency table)
    description: str = ""

    needs_importance = True  # suggest() takes the components' importance (:func:`importance`)

    # --- construction (files: dse.space.load_space) ---------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AllocationSpace":
        return _parse(data)

    def selected(self, table: Mapping) -> Dict[str, Any]:
        """The entries of ``table`` this space allocates over (table order)."""
        layers, types = set(self.selected_layers(table)), set(self.selected_types(table))
        return {n: p for n, p in table.items() if p.layer in layers and p.type in types}

    def describe(self, table: Mapping) -> str:
        """What ``dse space FILE`` prints."""
        sel = self.selected(table)
        types = sorted({p.type for p in sel.values()})
        layers = sorted({p.layer for p in sel.values()})
        dense = sum(p.dense_params for p in sel.values())
        n_params = len(self.param_names(table))
        lines = [
            f"space {self.name}: allocation over {len(layers)} layers x {len(types)} types "
            f"({len(sel)} modules), budget {self.budget.label()}"
        ]
        if self.budget.ratio is not None:
            kept = self.budget.kept(sel, 0)
            lines.append(
                f"every plan keeps at most {kept} of the selected modules' {dense} parameters ({kept / dense:.1%})"
            )
        lines.append(
            f"{n_params} continuous parameters ({len(types)} type weights, "
            f"{self.layer_knots} layer knots), log-uniform in "
            f"[{self.low:g}, {self.high:g}]; starts: {', '.join(self.starts) or 'none'}"
            + ("" if self.align == 1 else f"; ranks aligned to {self.align}")
        )
        return "\n".join(lines)

    # --- plans ---------------------------------------------------------------------------------
    def _weights(self, sel: Mapping, value) -> Dict[str, float]:
        """Each module's weight; ``value(param name)`` gives a parameter's value."""
        types = {t: value(f"type.{t}") for t in dict.fromkeys(p.type for p in sel.values())}
        layers = sorted({p.layer for p in sel.values()})
        profile = dict.fromkeys(layers, 1.0)
        if self.layer_knots:  # 0 (no profile) or >= 2, checked when parsed
            knots = np.log([value(f"layer.{k}") for k in range(self.layer_knots)])
            at = np.linspace(layers[0], layers[-1], self.layer_knots)
            profile = {layer: float(np.exp(np.interp(layer, at, knots))) for layer in layers}
        return {n: types[p.type] * profile[p.layer] for n, p in sel.items()}

    def plan_from_params(self, params: Mapping[str, float], context: SpaceContext) -> Plan:
        """The plan of ``params`` (a trial's): :func:`allocate` under the budget (a latency budget
        spends the predicted milliseconds of ``context.latency``, the study's latency table)."""
        table, importances, latency = context.table, context.importances, context.latency
        method = as_config(context.method)
        if get_method(method.name).pair_ranks:
            raise SpaceError(f"space.budget: allocation needs a one-rank method, not {method.name}")
        sel = self.selected(table)

        def value(name):
            if name not in params:
                raise SpaceError(f"params: {name!r} is missing (space {self.name})")
            return float(params[name])

        cost = self.budget.cost(latency, table)
        kept = self.budget.kept(sel, context.model_params, cost)
        ranks = allocate(sel, importances, kept, self._weights(sel, value), cost)
        if self.align != "auto":  # auto: the study rounds to the latency table's steps
            ranks = {n: align_rank(r, self.align) for n, r in ranks.items()}
        return Plan(ranks, method)

    @property
    def spends_latency(self) -> bool:
        return self.budget.latency is not None

    @property
    def aligns_ranks(self) -> bool:
        return self.align == "auto"

    def suggest(self, trial, context: SpaceContext) -> Plan:
        """Sample the weights with ``trial.suggest_float`` (log scale) and allocate."""
        names = self.param_names(context.table)
        return self.plan_from_params({n: trial.suggest_float(n, self.low, self.high, log=True) for n in names}, context)

    def param_names(self, table: Mapping) -> Tuple[str, ...]:
        sel = self.selected(table)
        names = [f"type.{t}" for t in dict.fromkeys(p.type for p in sel.values())]
        return tuple(names + [f"layer.{k}" for k in range(self.layer_knots)])

    # --- starts --------------------------------------------------------------------------------
    def flat_params(self, table: Mapping) -> Dict[str, float]:
        return dict.fromkeys(self.param_names(table), 1.0)

    def probe_plans(self, table: Mapping, method: MethodConfig, *, model_params: int, latency=None) -> Dict[str, Plan]:
        """One plan per parameter: its type (or its knot's band of layers) alone, cut at the budget's
        average ratio ``1 − kept / dense`` (of parameters, or of predicted milliseconds under a
        latency budget) by SVD-LLM's uniform rule."""
        sel = self.selected(table)
        cost = self.budget.cost(latency, table)
        ratio = 1 - self.budget.kept(sel, model_params, cost) / sum(cost.dense(p) for p in sel.values())
        layers = sorted({p.layer for p in sel.values()})
        at = np.linspace(layers[0], layers[-1], max(self.layer_knots, 2))
        band = {layer: int(np.argmin(np.abs(at - layer))) for layer in layers}
        plans = {}
        for name in self.param_names(table):
            kind, _, key = name.partition(".")
            group = {n: p for n, p in sel.items() if (p.type == key if kind == "type" else band[p.layer] == int(key))}
            plans[name] = uniform_plan(group, ratio=ratio, method=method)
        return plans

    def sensitivity_params(self, losses: Mapping[str, float], removed: Mapping[str, int]) -> Dict[str, float]:
        """Weights from probe results: ``losses[name]`` is the probe's loss increase (> 0 is worse;
        e.g. ``log(ppl / base)``), ``removed[name]`` the parameters it removed. A parameter's weight
        is its loss per removed parameter over the geometric mean of its kind (types, layers),
        clipped to ``[low, high]``."""
        out = {}
        for kind in ("type", "layer"):
            names = [n for n in losses if n.startswith(kind + ".")]
            if not names:
                continue
            per = {n: max(losses[n], 1e-9) / max(removed[n], 1) for n in names}
            mean = math.exp(sum(math.log(v) for v in per.values()) / len(per))
            out.update({n: min(max(v / mean, self.low), self.high) for n, v in per.items()})
        return out


# --- starts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """A starting point enqueued once per study: ``params(space, table, method, model_params,
    measure, latency, importances)`` gives its weights, or its :class:`Plan` itself; ``measures``:
    it calls ``measure`` (so the study needs a perplexity or accuracy objective to measure with)."""

    params: Callable[..., Dict[str, float]]
    measures: bool = False
    help: str = ""


def flat_start(
    space: AllocationSpace,
    table: Mapping,
    method: MethodConfig,
    *,
    model_params: int,
    measure: Measure,
    latency=None,
    importances=None,
) -> Dict[str, float]:
    """Every weight 1: the spectrum and the importance estimate alone decide."""
    return space.flat_params(table)


def sensitivity_start(
    space: AllocationSpace,
    table: Mapping,
    method: MethodConfig,
    *,
    model_params: int,
    measure: Measure,
    latency=None,
    importances=None,
) -> Dict[str, float]:
    """Weights from measured sensitivity: each probe of :meth:`AllocationSpace.probe_plans` is
    measured, and its loss per removed parameter sets its weight."""
    probes = space.probe_plans(table, method, model_params=model_params, latency=latency)
    losses = {name: measure(name, plan) for name, plan in probes.items()}
    removed = {
        name: sum(table[n].dense_params for n in plan.ranks) - plan.params(table) for name, plan in probes.items()
    }
    return space.sensitivity_params(losses, removed)


STARTS: Registry[Start] = Registry("start")


_KEYS = (
    "name",
    "description",
    "model",
    "model_config",
    "family",
    "layers",
    "types",
    "budget",
    "weights",
    "starts",
    "align",
)


def _parse(data) -> AllocationSpace:
    fields = parse_model(data, _KEYS)
    budget = data.get("budget")
    if not isinstance(budget, Mapping) or len(budget) != 1 or next(iter(budget)) not in ("ratio", "params", "latency"):
        raise SpaceError(f"space.budget: expected {{ratio: R}}, {{params: F}} or {{latency: F}}, got {budget!r}")
    ((key, value),) = budget.items()
    budget = Budget(
        **{key: number(value, f"space.budget.{key}", 0, 1, open_low=True, open_high=True, error=SpaceError)}
    )
    weights = mapping(data.get("weights") or {}, "space.weights", SpaceError, ("low", "high", "layer_knots"))
    low = number(
        weights.get("low", AllocationSpace.low), "space.weights.low", 0, math.inf, open_low=True, error=SpaceError
    )
    high = number(
        weights.get("high", AllocationSpace.high), "space.weights.high", low, math.inf, open_low=True, error=SpaceError
    )
    knots = integer(weights.get("layer_knots", AllocationSpace.layer_knots), "space.weights.layer_knots", 0, SpaceError)
    if knots == 1:
        raise SpaceError("space.weights.layer_knots: expected 0 (no layer profile) or an integer >= 2, got 1")
    starts = data.get("starts", list(AllocationSpace.starts))  # the built-in starts, not whatever is registered
    if not isinstance(starts, list):
        raise SpaceError(f"space.starts: expected a list of {', '.join(STARTS)}, got {starts!r}")
    for i, start in enumerate(starts):
        STARTS.get(start, f"space.starts[{i}]", SpaceError)
    align = data.get("align", 1)
    if align != "auto" and not (is_int(align) and align >= 1):
        raise SpaceError(f"space.align: expected an integer >= 1 or 'auto', got {align!r}")
    return AllocationSpace(
        **fields,
        budget=budget,
        layers=parse_layers(data.get("layers", "all")),
        types=parse_types(data.get("types")),
        low=low,
        high=high,
        layer_knots=knots,
        starts=tuple(starts),
        align=align,
    )
