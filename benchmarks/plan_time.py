"""Time to plan one trial on Llama-2-7B from its config alone: a grid plan made faster by a latency
table (``LatencyTable.faster_plan``, what a latency-optimising or ``align: auto`` trial runs) and
a latency-budget allocation, over a latency table of the 7B shapes with modelled costs.

    python benchmarks/plan_time.py [--repeats 5]

Prints the median seconds of each step (no weights are loaded: the projection table comes from
``spaces/llama2-7b-layer-ranks.yaml``'s ``model_config``).
"""

from __future__ import annotations

import argparse

import numpy as np
import optuna
import torch
from common import ROOT

from dse.decompose import Plan, uniform_plan
from dse.decompose.latency import PHASES, LatencyTable, ShapeCost, Workload, rank_grid
from dse.model.shapes import projection_table
from dse.model.timing import timed
from dse.space import AllocationSpace, Budget, SpaceContext, load_space


def modelled_table(table) -> LatencyTable:
    """GEMV costs of every shape: bytes over 25 GB/s plus 13.5 us per product (the CPU fit of
    docs/speed.md), measured at the latency table's usual rank grid."""
    shapes = {}
    for p in table.values():
        m, n = p.out_features, p.in_features
        ranks = rank_grid(p.full_rank)
        dense = m * n * 4 / 25e6 + 0.0135
        low = [r * (m + n) * 4 / 25e6 + 0.027 for r in ranks]
        shapes[f"{m}x{n}"] = ShapeCost(m, n, ranks, dict.fromkeys(PHASES, dense), dict.fromkeys(PHASES, low), 64)
    return LatencyTable({}, Workload(), "llama2-7b", dict.fromkeys(PHASES, 5.0), shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    space = load_space(ROOT / "spaces/llama2-7b-layer-ranks.yaml")
    table = projection_table(space.model, space.model_config)
    latency = modelled_table(table)
    plan = uniform_plan(table, ratio=0.2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    grid_plan = space.suggest(study.ask(), SpaceContext(table))
    rng = np.random.default_rng(0)
    importances = {name: np.sort(rng.random(p.full_rank))[::-1] for name, p in table.items()}
    allocation = AllocationSpace("7b-latency", Budget(latency=0.8), model=space.model, model_config=space.model_config)
    flat = allocation.flat_params(table)
    rows = {
        "faster_plan, uniform -20 % (224 modules)": lambda: latency.faster_plan(plan, table, align=True),
        "faster_plan, a grid trial": lambda: latency.faster_plan(grid_plan, table, align=True),
        "predict, uniform -20 %": lambda: latency.predict(plan, table),
        "latency-budget allocation (0.8)": lambda: allocation.plan_from_params(
            flat, SpaceContext(table, Plan({}).config, int(6.7e9), latency, importances)
        ),
    }
    print(f"{len(table)} projections; median of {args.repeats}")
    for label, run in rows.items():
        print(f"{label:45s} {timed(run, torch.device('cpu'), repeats=args.repeats, warmup=0).median:8.4f} s")


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()
