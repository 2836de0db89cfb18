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

from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from ..decompose import Plan, as_config
from .allocation import AllocationError
from .errormodel import ErrorModel, Observation, fit
from .fields import SpaceContext


def candidate_ranks(p, cost, step: int = 1, slower_from: Optional[int] = None) -> np.ndarray:
    """The ranks module ``p`` may take: multiples of ``step`` below its full rank whose ``cost`` is
    below the dense matrix's, and below ``slower_from`` (the measured break-even rank) if given."""
    ranks = np.arange(step, p.full_rank, step)
    ranks = ranks[cost.curve(p)[ranks] < cost.dense(p)]
    return ranks if slower_from is None else ranks[ranks < slower_from]


def solve(choices: Sequence[Tuple[np.ndarray, np.ndarray]], kept: float) -> List[int]:
    """Per group, the index of its chosen option: ``choices[g] = (costs, losses)``; the summed loss
    is minimal with the summed cost at most ``kept``."""
    sizes = [len(c) for c, _ in choices]
    costs = np.concatenate([np.asarray(c, dtype=np.float64) for c, _ in choices])
    losses = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in choices])
    group = np.repeat(np.arange(len(sizes)), sizes)
    one = csr_array((np.ones(len(costs)), (group, np.arange(len(costs)))), shape=(len(sizes), len(costs)))
    scale = max(float(np.abs(losses).max()), 1e-300)  # HiGHS's tolerances are absolute
    cheapest = sum(float(np.min(c)) for c, _ in choices)
    if cheapest > kept:
        raise AllocationError(f"space.budget: keeps {kept:.6g}, but the cheapest plan needs {cheapest:.6g}")
    rhs = float(kept)
    for _ in range(3):  # an integral solution may overshoot by HiGHS's feasibility tolerance
        result = milp(
            losses / scale,
            integrality=np.ones(len(costs)),
            bounds=Bounds(0, 1),
            constraints=[LinearConstraint(one, 1, 1), LinearConstraint(costs[None, :] / kept, -np.inf, rhs / kept)],
        )
        if result.x is None:
            raise AllocationError(f"space.budget: the solver found no plan within {kept:.6g} ({result.message})")
        x = np.round(result.x).astype(bool)
        over = float(costs[x].sum()) - kept
        if over <= 0:
            starts = np.cumsum([0] + sizes[:-1])
            return [int(np.flatnonzero(x[s : s + n])[0]) for s, n in zip(starts, sizes)]
        rhs -= over
    raise AllocationError(f"space.budget: the solver's plans overshoot {kept:.6g}")


def best_plan(space, context: SpaceContext, model: ErrorModel, coef: Optional[np.ndarray] = None) -> Plan:
    """The plan of allocation ``space`` that minimises ``model``'s predicted loss (under ``coef``,
    default its fitted coefficients) within the space's budget."""
    table, latency = context.table, context.latency
    sel = space.selected(table)
    cost = space.budget.cost(latency, table)
    kept = space.budget.kept(sel, context.model_params, cost)
    names, options, choices = list(sel), [], []
    for name in names:
        p = sel[name]
        step = latency.cost(p).step if space.aligns_ranks else space.align
        slower = latency.cost(p).break_even() if latency is not None else None
        ranks = candidate_ranks(p, cost, step, slower)
        loss = model.weight(name, coef) * model.tail[name][ranks]
        options.append(list(ranks) + [None])
        choices.append((np.append(cost.curve(p)[ranks], cost.dense(p)), np.append(loss, 0.0)))
    chosen = solve(choices, kept)
    ranks = {n: int(options[j][i]) for j, (n, i) in enumerate(zip(names, chosen)) if options[j][i] is not None}
    return Plan(ranks, as_config(context.method))


def errormodel_start(space, table, method, *, model_params: int, measure, latency=None, importances=None) -> Plan:
    """The error model's optimum: the sensitivity probes (:meth:`AllocationSpace.probe_plans`, the
    same as the ``sensitivity`` start's) are measured, the model fitted to them and solved."""
    probes = space.probe_plans(table, method, model_params=model_params, latency=latency)
    model = fit([Observation(plan.ranks, measure(name, plan)) for name, plan in probes.items()], table, importances)
    return best_plan(space, SpaceContext(table, method, model_params, latency, importances), model)
