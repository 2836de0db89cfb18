"""Benchmark: where the factor cache keeps its full-rank forms (``cache.memory``), per trial.

Each placement runs in a fresh process on SmolLM2-135M: load the model on ``--device``, fill the
in-memory cache from a shared cache folder (``svd`` of all 210 projections, factorized once
before), then run ``--trials`` trials of plans drawn from ``spaces/smollm2-layer-ranks.yaml``
(decompose, P1 perplexity, restore). Printed per placement, medians over the trials: the memory
held between trials, the peak during a trial (host: ``VmHWM`` reset before each trial; CUDA:
``max_memory_allocated``) and the decompose seconds. ``device`` keeps the forms beside the model,
``cpu`` in host memory (only truncated factors go to the device), ``none`` reads them from the
folder each trial. On a CPU host ``device`` and ``cpu`` are the same place.

    python benchmarks/cache_placement.py [--device cpu] [--trials 5] [--memory device cpu none]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

from common import BENCHMARKS, ROOT
from measure import child, mb, reset_peak, vm


class Draw:
    """A stand-in for an Optuna trial: every choice drawn uniformly."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def suggest_categorical(self, name, options):
        return self.rng.choice(list(options))


def measure(memory: str, device: str, folder: str, trials: int) -> dict:
    import torch

    from dse.decompose import FactorCache, SVDConfig, decomposed, factor_forms
    from dse.evaluate import perplexity
    from dse.model import find_projections, load_model
    from dse.space import SpaceContext, load_space
    from dse.study.protocols import p1_windows

    model, tokenizer = load_model("smollm2-135m", device=device)
    table = find_projections(model)
    windows = p1_windows(tokenizer, BENCHMARKS)
    cache = FactorCache(folder, memory)
    factor_forms(model, table, SVDConfig(), cache=cache)  # from the folder: what a warm study holds
    space, rng = load_space(ROOT / "spaces" / "smollm2-layer-ranks.yaml"), random.Random(0)
    cuda = device.startswith("cuda")
    rows = []
    for _ in range(trials):
        plan = space.suggest(Draw(rng), SpaceContext(table))
        held = torch.cuda.memory_allocated() if cuda else vm("VmRSS")
        torch.cuda.reset_peak_memory_stats() if cuda else reset_peak()
        start = time.perf_counter()
        with decomposed(model, plan, cache=cache):
            seconds = time.perf_counter() - start
            perplexity(model, windows)
        rows.append(
            {"held": held, "peak": torch.cuda.max_memory_allocated() if cuda else vm("VmHWM"), "decompose_s": seconds}
        )
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"cache": cache.nbytes()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--memory", nargs="+", default=["device", "cpu", "none"])
    ap.add_argument("--child", nargs=2, metavar=("MEMORY", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.device, args.child[1], args.trials)))
        return
    with tempfile.TemporaryDirectory(prefix="dse-cache-placement-") as folder:
        child(__file__, "none", folder, "--device", args.device, "--trials", "1")  # fills the folder
        runs = {
            m: child(__file__, m, folder, "--device", args.device, "--trials", str(args.trials)) for m in args.memory
        }
    where = "CUDA allocated" if args.device.startswith("cuda") else "process resident"
    print(f"SmolLM2-135M on {args.device}, svd, {args.trials} trials per placement (medians)\n")
    print(f"| cache.memory | forms held | {where}, between trials | peak during a trial | decompose s |")
    print("|---|---|---|---|---|")
    for memory, r in runs.items():
        print(f"| {memory} | {mb(r['cache'])} | {mb(r['held'])} | {mb(r['peak'])} | {r['decompose_s']:.3f} |")


if __name__ == "__main__":
    main()
