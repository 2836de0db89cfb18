"""Benchmark: what does a decomposed module cost beyond the bytes it reads? The projections alone,
one token (batch 1), in the model's order, eager: the dense modules against each plan's (its ranks
factorized by plain ``svd``), each module on its own input, fastest of ``--rounds`` interleaved
rounds. A least-squares fit over all of them of

    milliseconds = megabytes / bandwidth + products × cost per product

says how much of a plan's shortfall against its bytes ratio is a fixed cost of each extra matrix
product. Two remedies are timed beside each plan: the first factors of the modules that share an
input (q/k/v, gate/up) fused into one product (``fused``), and every second factor stored
column-major with its shape kept (``column-major``).

    python benchmarks/projection_products.py docs/speed/plans/params_-{10,20,30}.json [--rounds 7]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dse.decompose import LowRankLinear, Plan, decompose_, restore_
from dse.model import find_projections, load_model
from dse.model.timing import timed

SHARED_INPUT = ({"q", "k", "v"}, {"gate", "up"})


def separate(model, table) -> list:
    """``(callable, bytes, products)`` per projection: the module as it is on ``model``."""
    steps = []
    for name, p in table.items():
        module = model.get_submodule(name)
        x = torch.randn(1, 1, p.in_features)
        products = len(module.factors) if isinstance(module, LowRankLinear) else 1
        steps.append((lambda m=module, x=x: m(x), tensor_bytes(module.parameters()), products))
    return steps


def fused(model, table) -> list:
    """As :func:`separate`, with the first factors of the low-rank modules that share an input
    (one layer's q/k/v, its gate/up) concatenated into one product."""
    groups = defaultdict(list)
    for name, p in table.items():
        shared = next((i for i, types in enumerate(SHARED_INPUT) if p.type in types), None)
        low_rank = isinstance(model.get_submodule(name), LowRankLinear)
        groups[(p.layer, shared) if shared is not None and low_rank else name].append(name)
    steps = []
    for names in groups.values():
        modules = [model.get_submodule(n) for n in names]
        if len(modules) == 1:
            steps += separate(model, {names[0]: table[names[0]]})
            continue
        first = torch.cat([m.factors[0].data for m in modules])
        seconds = [m.factors[1].data for m in modules]
        x = torch.randn(1, 1, first.shape[1])

        def run(x=x, first=first, seconds=seconds, sizes=[s.shape[1] for s in seconds]):
            for h, second in zip(F.linear(x, first).split(sizes, -1), seconds):
                F.linear(h, second)

        steps.append((run, tensor_bytes([first, *seconds]), 1 + len(seconds)))
    return steps


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def run_all(steps) -> None:
    for call, _, _ in steps:
        call()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    model, _ = load_model(args.model)
    table = find_projections(model)
    variants = {"dense": separate(model, table)}
    for path in args.plans:
        name = Path(path).stem
        decompose_(model, Plan(Plan.load(path).ranks, "svd"))
        variants[name] = separate(model, table)
        variants[f"{name} fused"] = fused(model, table)
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                last = module.factors[-1]
                last.data = last.data.t().contiguous().t()
        variants[f"{name} column-major"] = separate(model, table)
        restore_(model)  # the variants keep their own modules and tensors
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, steps in variants.items():
            times[name].append(timed(lambda: run_all(steps), torch.device("cpu"), repeats=1).low)
    best = {name: min(t) for name, t in times.items()}
    size = {name: sum(s[1] for s in steps) for name, steps in variants.items()}
    products = {name: sum(s[2] for s in steps) for name, steps in variants.items()}
    plain = ["dense"] + [Path(p).stem for p in args.plans]
    a = np.array([[size[n] / 1e6, products[n]] for n in plain])
    (ms_per_mb, ms_per_product), *_ = np.linalg.lstsq(a, np.array([1000 * best[n] for n in plain]), rcond=None)
    print(
        f"{args.model}, {torch.get_num_threads()} threads: the projections alone, batch 1, eager; fastest of "
        f"{args.rounds} rounds\n"
    )
    print("| variant | products | MB | ms | GB/s | speed-up | bytes ratio | speed-up / bytes | fit ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        ratio, speedup = size["dense"] / size[name], best["dense"] / best[name]
        fit = size[name] / 1e6 * ms_per_mb + products[name] * ms_per_product
        print(
            f"| {name} | {products[name]} | {size[name] / 1e6:.1f} | {1000 * best[name]:.2f} | "
            f"{size[name] / best[name] / 1e9:.2f} | {speedup:.3f} | {ratio:.3f} | {speedup / ratio:.3f} | "
            f"{fit:.2f} |"
        )
    how = "fit over" if len(plain) > 2 else "solved exactly (one plan: add more to fit) from"
    print(f"\n{how} dense and the plans: {1 / ms_per_mb:.1f} GB/s and {1000 * ms_per_product:.1f} µs per product")


if __name__ == "__main__":
    main()
