"""The exact minimiser of an :class:`~dse.space.errormodel.ErrorModel` under a space's budget.

Each selected module takes one of its candidate choices: dense (no loss, its dense cost) or a rank
``r`` (loss ``weight · tail[r]``, cost ``r·(m+n)`` parameters or the latency table's milliseconds).
Choosing one per module to minimise the summed loss within the budget is a multiple-choice
knapsack, solved as an integer program by HiGHS (``scipy.optimize.milp``): one binary per (module,
choice), one equality per module, one budget row.

Candidate ranks honour the space's alignment and break-even inside the program, not by rounding
afterwards: only multiples of the module's step (``align: N``, or the latency table's measured fast
step under ``align: auto``), and only ranks that cost less than the dense matrix (parameters, or
predicted milliseconds under a latency budget) and, when the study has a latency table, are measured
faster than dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from ..core.errors import SpaceError
from ..decompose import Plan, align_rank, as_config
from .allocation import AllocationError, ParamCost
from .errormodel import ErrorModel, Observation, fit
from .fields import SpaceContext
from .groups import DENSE, GROUPS


def candidate_ranks(p, cost, step: int = 1, slower_from: Optional[int] = None) -> np.ndarray:
    """The ranks module ``p`` may take: multiples of ``step`` below its full rank whose ``cost`` is
    below the dense matrix's, and below ``slower_from`` (the measured break-even rank) if given."""
    ranks = np.arange(step, p.full_rank, step)
    ranks = ranks[cost.curve(p)[ranks] < cost.dense(p)]
    return ranks if slower_from is None else ranks[ranks < slower_from]


@dataclass(frozen=True)
class Program:
    """A 0/1 program: minimise ``losses · x`` with ``base + costs · x <= kept``, exactly one variable
    of each of ``groups`` set, and ``lb <= row · x <= ub`` for each of ``rows``."""

    losses: np.ndarray
    costs: np.ndarray
    groups: Sequence[np.ndarray] = ()
    rows: Sequence[Tuple[np.ndarray, float, float]] = ()
    base: float = 0.0

    def cheapest(self) -> float:
        """The least cost of a feasible point."""
        return self.base + float(self.costs @ self.solve(np.inf, self.costs))

    def solve(self, kept: float, objective: Optional[np.ndarray] = None) -> np.ndarray:
        """The optimal point (a boolean vector) with cost at most ``kept``, minimising ``objective``
        (default ``losses``)."""
        objective = self.losses if objective is None else objective
        n = len(self.costs)
        constraints = [LinearConstraint(np.atleast_2d(row), lb, ub) for row, lb, ub in self.rows]
        if self.groups:
            rows = np.concatenate([np.full(len(g), i) for i, g in enumerate(self.groups)])
            cols = np.concatenate(self.groups)
            one = csr_array((np.ones(len(cols)), (rows, cols)), shape=(len(self.groups), n))
            constraints.append(LinearConstraint(one, 1, 1))
        scale = max(float(np.abs(objective).max(initial=0.0)), 1e-300)  # HiGHS's tolerances are absolute
        room = kept - self.base
        unit = max(abs(room) if np.isfinite(room) else 0.0, float(np.abs(self.costs).max(initial=0.0)), 1e-300)
        rhs = room
        for _ in range(3):  # an integral solution may overshoot by HiGHS's feasibility tolerance
            budget = [] if not np.isfinite(rhs) else [LinearConstraint(self.costs[None, :] / unit, -np.inf, rhs / unit)]
            result = milp(
                objective / scale, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints + budget
            )
            if result.x is None:
                raise AllocationError(f"space.budget: the solver found no plan within {kept:.6g} ({result.message})")
            x = np.round(result.x).astype(bool)
            over = float(self.costs[x].sum()) - room
            if over <= 0:
                return x
            rhs -= over
        raise AllocationError(f"space.budget: the solver's plans overshoot {kept:.6g}")


def solve(choices: Sequence[Tuple[np.ndarray, np.ndarray]], kept: float) -> List[int]:
    """Per group, the index of its chosen option: ``choices[g] = (costs, losses)``; the summed loss
    is minimal with the summed cost at most ``kept``."""
    sizes = [len(c) for c, _ in choices]
    cheapest = sum(float(np.min(c)) for c, _ in choices)
    if cheapest > kept:
        raise AllocationError(f"space.budget: keeps {kept:.6g}, but the cheapest plan needs {cheapest:.6g}")
    starts = np.cumsum([0] + sizes[:-1])
    program = Program(
        losses=np.concatenate([np.asarray(v, dtype=np.float64) for _, v in choices]),
        costs=np.concatenate([np.asarray(c, dtype=np.float64) for c, _ in choices]),
        groups=[np.arange(s, s + n) for s, n in zip(starts, sizes)],
    )
    x = program.solve(kept)
    return [int(np.flatnonzero(x[s : s + n])[0]) for s, n in zip(starts, sizes)]


def best_plan(
    space,
    context: SpaceContext,
    model: ErrorModel,
    coef: Optional[np.ndarray] = None,
    near: Optional[Mapping[str, int]] = None,
    radius: float = np.inf,
) -> Plan:
    """The plan of allocation ``space`` that minimises ``model``'s predicted loss (under ``coef``,
    default its fitted coefficients) within the space's budget; with ``near`` (a plan's ranks), only
    among plans whose every module's cost is within ``radius`` (relative) of its cost in ``near``
    (a trust region; ``near`` is one of them if the space allows its ranks)."""
    table, latency = context.table, context.latency
    sel = space.selected(table)
    cost = space.budget.cost(latency, table)
    kept = space.budget.kept(sel, context.model_params, cost)
    names, options, choices = list(sel), [], []
    for name in names:
        p = sel[name]
        step = latency.cost(p).step if space.aligns_ranks else space.align
        slower = latency.cost(p).break_even() if latency is not None else None
        ranks = [int(r) for r in candidate_ranks(p, cost, step, slower)] + [None]

        def spent(r, p=p):  # a choice's cost (None: dense)
            return float(cost.dense(p) if r is None else cost.curve(p)[r])

        if near is not None:
            here = spent(near.get(name))
            ranks = [r for r in ranks if abs(spent(r) - here) <= radius * here]
        options.append(ranks)
        weight = model.weight(name, coef)
        loss = [0.0 if r is None else weight * model.tail[name][r] for r in ranks]
        choices.append((np.array([spent(r) for r in ranks]), np.array(loss)))
    chosen = solve(choices, kept)
    ranks = {n: int(options[j][i]) for j, (n, i) in enumerate(zip(names, chosen)) if options[j][i] is not None}
    return Plan(ranks, as_config(context.method))


def grid_programs(space, context: SpaceContext, model: ErrorModel, coef: Optional[np.ndarray] = None):
    """Programs whose optima are the plans of grid ``space`` minimising ``model``'s predicted loss
    (under ``coef``), each with the function that reads a plan's ranks from its point: one program
    for a group that asks one label per parameter (:meth:`~dse.space.groups.Group.units`), the layer
    rules as rows; one per rank label under switches (``layer_x_type``: a cell is cut iff its layer
    and its type are on, ``z = x_l ∧ y_t`` written as three rows)."""
    layout = space.layout(context.table)
    table, latency, cost = context.table, context.latency, ParamCost()
    labels, layers, cells = space.labels, list(layout.layers), list(layout.cells)

    def rank(name: str, j: int) -> Optional[int]:  # what the study makes of label j (align: auto, break-even)
        r = layout.resolved[name][j]
        if r is None or latency is None:
            return r
        shape = latency.cost(table[name])
        r = align_rank(r, shape.step) if space.aligns_ranks else r
        return r if r < shape.break_even("decode") else None

    def cost_loss(cell, j) -> Tuple[float, float]:
        c = v = 0.0
        for name in layout.cells[cell]:
            r = rank(name, j)
            c += cost.dense(table[name]) if r is None else float(cost.curve(table[name])[r])
            v += 0.0 if r is None else model.weight(name, coef) * model.tail[name][r]
        return c, v

    def reader(picks):  # picks(x) -> {cell: label index}
        def read(x) -> Dict[str, int]:
            out = {n: rank(n, j) for cell, j in picks(x).items() for n in layout.cells[cell]}
            return {n: r for n, r in out.items() if r is not None}

        return read

    group = GROUPS.get(space.group)
    units = group.units(layout)
    if units is not None:
        names, k = list(units), len(labels)
        pairs = np.array([[np.sum([cost_loss(c, j) for c in units[u]], axis=0) for j in range(k)] for u in names])
        extra, rows = _layer_rules(space.rules, layers, len(names) * k)
        if extra:  # a unit cut in layer l marks l cut: x[unit, dense] + d_l >= 1
            for i, u in enumerate(names):
                row = np.zeros(len(names) * k + extra)
                row[i * k + labels.index(DENSE)] = row[len(names) * k + layers.index(units[u][0][0])] = 1
                rows.append((row, 1, np.inf))
        program = Program(
            np.append(pairs[..., 1].ravel(), np.zeros(extra)),
            np.append(pairs[..., 0].ravel(), np.zeros(extra)),
            [np.arange(i * k, (i + 1) * k) for i in range(len(names))],
            rows,
        )
        chosen = reader(
            lambda x: {c: j for i, u in enumerate(names) for j in range(k) if x[i * k + j] for c in units[u]}
        )
        return [(program, chosen)]
    if not group.switches:
        raise SpaceError(f"sampler: errormodel cannot write group {space.group!r} as an integer program")
    n_x, n_y = len(layers), len(layout.types)
    n = n_x + n_y + len(cells)
    out = []
    for j in range(len(labels)):
        _, rows = _layer_rules(space.rules, layers, 0)  # the layer switches are the d_l
        rows = [(np.append(row, np.zeros(n - n_x)), lb, ub) for row, lb, ub in rows]
        delta, losses, base = np.zeros(n), np.zeros(n), 0.0
        for i, cell in enumerate(cells):
            z, x, y = n_x + n_y + i, layers.index(cell[0]), n_x + layout.types.index(cell[1])
            dense = sum(cost.dense(table[name]) for name in layout.cells[cell])
            c, losses[z] = cost_loss(cell, j)
            delta[z], base = c - dense, base + dense
            for coefs, ub in (({z: 1, x: -1}, 0), ({z: 1, y: -1}, 0), ({x: 1, y: 1, z: -1}, 1)):
                row = np.zeros(n)
                row[list(coefs)] = list(coefs.values())
                rows.append((row, -np.inf, ub))
        picks = reader(lambda x, j=j: {cell: j for i, cell in enumerate(cells) if x[n_x + n_y + i]})
        out.append((Program(losses, delta, (), rows, base), picks))
    return out


def _layer_rules(rules, layers: List[int], offset: int) -> Tuple[int, list]:
    """Extra binaries ``d_l`` (layer ``l`` is cut), placed after ``offset`` variables, and the rows of
    ``max_layers`` (``Σ d_l <= k``) and ``no_adjacent`` (``d_l + d_{l+1} <= 1``); none without rules."""
    if rules.max_layers is None and not rules.no_adjacent:
        return 0, []
    n = offset + len(layers)
    rows = []
    if rules.max_layers is not None:
        row = np.zeros(n)
        row[offset:] = 1
        rows.append((row, -np.inf, rules.max_layers))
    if rules.no_adjacent:
        for i in range(len(layers) - 1):
            if layers[i + 1] == layers[i] + 1:
                row = np.zeros(n)
                row[offset + i] = row[offset + i + 1] = 1
                rows.append((row, -np.inf, 1))
    return len(layers), rows


def grid_plan(space, context: SpaceContext, model: ErrorModel, size: float, coef: Optional[np.ndarray] = None) -> Plan:
    """The plan of grid ``space`` that minimises ``model``'s predicted loss (under ``coef``) with at
    most ``low + size · (high − low)`` parameters in its selected modules, ``low`` and ``high`` the
    grid's smallest plan's and dense (:func:`grid_sizes`; ``size`` in [0, 1]); see :func:`grid_programs`."""
    programs = grid_programs(space, context, model, coef)
    low, high = _sizes(space, context, programs)
    kept = low + size * (high - low)
    best = None
    for program, read in programs:
        try:
            x = program.solve(kept)
        except AllocationError:
            continue
        loss = float(program.losses @ x)
        if best is None or loss < best[0]:
            best = (loss, read(x))
    if best is None:
        raise AllocationError(f"space: no plan of {space.name} keeps at most {kept:.6g} parameters")
    return Plan(best[1], as_config(context.method))


def grid_sizes(space, context: SpaceContext, model: ErrorModel) -> Tuple[float, float]:
    """The fewest and the most parameters the selected modules of grid ``space``'s plans keep."""
    return _sizes(space, context, grid_programs(space, context, model))


def _sizes(space, context: SpaceContext, programs) -> Tuple[float, float]:
    dense = float(sum(context.table[n].dense_params for n in space.layout(context.table).resolved))
    return min(program.cheapest() for program, _ in programs), dense


def errormodel_start(space, table, method, *, model_params: int, measure, latency=None, importances=None) -> Plan:
    """The error model's optimum: the sensitivity probes (:meth:`AllocationSpace.probe_plans`, the
    same as the ``sensitivity`` start's) are measured, the model fitted to them and solved."""
    probes = space.probe_plans(table, method, model_params=model_params, latency=latency)
    model = fit([Observation(plan.ranks, measure(name, plan)) for name, plan in probes.items()], table, importances)
    return best_plan(space, SpaceContext(table, method, model_params, latency, importances), model)
