"""Benchmark: factorizing every projection once versus applying a plan from the warm factor cache.

    python benchmarks/decompose.py [--model smollm2-135m] [--method svd] [--repeats 5] [--seed 0]

Loads the model and draws random plans over all its projections (210 for SmolLM2), each module
at a random rank. Measured in one run (machine load varies between runs, so compare the ratio):
``decompose_`` with an empty cache (factorize + apply), ``decompose_`` of further random plans of
the same size from the warm cache (median of ``--repeats``), and ``restore_`` (median). A study
factorizes once and then only applies plans, so the cold/warm ratio is what the cache buys.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from dse.decompose import METHODS, FactorCache, Plan, decompose_, restore_
from dse.model import find_projections, load_model

TARGET_RATIO = 20.0


def random_full_plan(table, method: str, rng: random.Random) -> Plan:
    """Every projection in ``table`` at a random rank in ``[1, min(m, n)]``."""
    pair = METHODS[method].pair_ranks
    ranks = {}
    for name, p in table.items():
        r = rng.randint(1, p.full_rank)
        ranks[name] = (r, rng.randint(1, p.full_rank)) if pair else r
    return Plan(ranks, method)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, local folder or .gguf")
    parser.add_argument(
        "--method", default="svd", choices=[n for n in METHODS if not METHODS[n].config_cls.needs_calibration]
    )
    parser.add_argument("--repeats", type=int, default=5, help="warm applications (median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: must be >= 1, got {args.repeats}")

    model, _ = load_model(args.model)
    table = find_projections(model)
    rng = random.Random(args.seed)
    plans = [random_full_plan(table, args.method, rng) for _ in range(1 + args.repeats)]
    cache = FactorCache()

    cold = seconds(lambda: decompose_(model, plans[0], cache=cache))
    cold_misses = cache.misses
    restores = [seconds(lambda: restore_(model))]
    warm = []
    for plan in plans[1:]:
        warm.append(seconds(lambda: decompose_(model, plan, cache=cache)))
        restores.append(seconds(lambda: restore_(model)))
    warm_median, restore_median = statistics.median(warm), statistics.median(restores)
    ratio = cold / warm_median

    print(
        f"model {args.model}: {len(table)} modules, method {args.method}, "
        f"{torch.get_num_threads()} torch threads, {next(model.parameters()).dtype}"
    )
    print(f"cache: {cold_misses} factorizations cold, {cache.misses - cold_misses} afterwards")
    rows = [
        ("factorize + apply (cold cache)", cold),
        (f"apply (warm cache, median of {len(warm)})", warm_median),
        (f"restore (median of {len(restores)})", restore_median),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'step':<{width}}  {'seconds':>9}")
    for label, value in rows:
        print(f"{label:<{width}}  {value:>9.4f}")
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(f"{'cold / warm':<{width}}  {ratio:>8.1f}x  ({verdict} the target of {TARGET_RATIO:.0f}x)")


if __name__ == "__main__":
    main()
