"""Evaluation seconds with and without prefix reuse (``evaluation.reuse_prefix``) for plans that
start at several layers, in one run.

    python benchmarks/prefix_reuse.py [--layers 0 8 16 24] [--repeats 3] [--limit 20] [--tasks arc_easy]

The quick study's evaluation block (``studies/smollm2-quick.yaml``: WikiText-2 perplexity, the
fast engine) with ``--tasks`` at ``--limit`` rows, on its model. Each plan decomposes every
projection of one layer (``--layers``) at a quarter of its full rank, so the layers below it are
dense. Per plan, a first run with reuse keeps the hidden states entering that layer (timed apart:
it costs a full forward), then ``repeats`` runs without and with reuse alternate. Prints the median
seconds of each measure, the ratio, whether the metrics are the same (perplexity to 1e-5
relative, accuracy exactly) and the bytes the store keeps per start layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from dse.decompose import FactorCache, Plan, decomposed
from dse.evaluate import Evaluator
from dse.model import find_projections, load_model
from dse.study.config import load_study_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 8, 16, 24])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--tasks", nargs="+", default=["arc_easy"])
    args = parser.parse_args()
    config = load_study_config(ROOT / "studies/smollm2-quick.yaml")
    evaluation = dataclasses.replace(config.evaluation, tasks=args.tasks, limit=args.limit)
    model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
    table = find_projections(model)
    cache = FactorCache()
    off = Evaluator(model, tokenizer, dataclasses.replace(evaluation, reuse_prefix=False))
    on = Evaluator(model, tokenizer, dataclasses.replace(evaluation, reuse_prefix=True))
    print(f"{config.model}, torch threads {torch.get_num_threads()}, tasks {args.tasks} (limit {args.limit})")
    print(f"{'start layer':<12}{'measure':<20}{'off s':>8}{'on s':>8}{'ratio':>7}{'first on s':>11}  same")
    for k in args.layers:
        plan = Plan({n: p.full_rank // 4 for n, p in table.items() if p.layer == k}, config.method)
        with decomposed(model, plan, cache=cache, table=table):
            before = on.prefix.nbytes
            first = on.run(progress=False)
            kept = on.prefix.nbytes - before
            runs = {"off": [], "on": []}
            for _ in range(args.repeats):
                runs["off"].append(off.run(progress=False))
                runs["on"].append(on.run(progress=False))
        keys = [key for key in first if key.startswith("seconds/")] + ["eval_seconds"]
        for key in keys:
            median = {side: statistics.median(r[key] for r in runs[side]) for side in runs}
            same = all(_same(r, runs["off"][0]) for r in [first, *runs["on"]])
            print(
                f"{k:<12}{key:<20}{median['off']:>8.2f}{median['on']:>8.2f}"
                f"{median['off'] / median['on']:>7.2f}{first[key]:>11.2f}  {same}",
                flush=True,
            )
        metrics = f"perplexity {first['perplexity']:.4f}, accuracy {first['accuracy']:.4f}"
        print(f"{k:<12}kept {kept / 1e6:.1f} MB; {metrics}")


def _same(a, b) -> bool:
    ppl = abs(a["perplexity"] - b["perplexity"]) <= 1e-5 * b["perplexity"]
    return ppl and all(a[k] == b[k] for k in a if k.startswith("acc"))


if __name__ == "__main__":
    main()
