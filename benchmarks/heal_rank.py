"""Benchmark: does a heal keep the order of equal-size plans? (issue 29)

A study ranks plans by their plain measures and heals only the front (``heal: {trials: front}``);
that is sound only if the plain order predicts the healed one. This draws ``--plans`` plans of
exactly equal size (every projection of ``--layers`` layers drawn at random, all at ``--rank`` of
their full rank, ``--method`` on P1's calibration), measures each one's P1 perplexity before and after a heal of
``--steps`` steps (WikiText-2 pages 12–39, as benchmarks/heal.py), and prints both orders'
Spearman rank correlation.

    python benchmarks/heal_rank.py [--plans 10] [--layers 4] [--rank 0.25] [--method svdllm] [--steps 10]
                                   [--out docs/heal]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import pandas as pd
import torch
from common import BENCHMARKS, ROOT, heal_training_windows
from scipy.stats import spearmanr

from dse.decompose import FactorCache, HealConfig, Plan, calibrate, decomposed, temporarily_healed
from dse.evaluate import perplexity
from dse.model import find_projections, load_model
from dse.study.protocols import p1_calibration, p1_windows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=int, default=10)
    ap.add_argument("--layers", type=int, default=4, help="layers per plan (all seven projections of each)")
    ap.add_argument("--rank", type=float, default=0.25, help="rank as a share of each projection's full rank")
    ap.add_argument("--method", default="svdllm")
    ap.add_argument("--steps", type=int, default=10, help="heal steps of 4 x 256 tokens")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--benchmarks-dir", default=str(BENCHMARKS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "heal"))
    args = ap.parse_args(argv)

    model, tokenizer = load_model("smollm2-135m")
    table = find_projections(model)
    windows = p1_windows(tokenizer, args.benchmarks_dir)
    recipe = HealConfig(steps=args.steps, lr=args.lr)
    heal_windows = heal_training_windows(tokenizer, args.benchmarks_dir, recipe.seq_len)
    kw = {"table": table, "cache": FactorCache()}
    if args.method != "svd":
        kw["calibration"] = calibrate(model, tokenizer, p1_calibration(args.benchmarks_dir), progress=False)
    layers = sorted({p.layer for p in table.values()})
    draw = random.Random(args.seed)
    print(
        f"SmolLM2-135M, torch threads {torch.get_num_threads()}; {args.plans} plans of {args.layers} layers x 7 "
        f"projections at {args.rank:g} of full rank ({args.method}); heal {args.steps} steps x {recipe.batch} x "
        f"{recipe.seq_len} tokens, lr {args.lr:g}; P1 perplexity",
        flush=True,
    )
    rows = []
    for i in range(args.plans):
        chosen = sorted(draw.sample(layers, args.layers))
        ranks = {n: max(1, int(args.rank * p.full_rank)) for n, p in table.items() if p.layer in chosen}
        plan = Plan(ranks, args.method)
        start = time.perf_counter()
        with decomposed(model, plan, **kw):
            plain = perplexity(model, windows)
            with temporarily_healed(model, heal_windows, recipe, progress=False) as report:
                healed = perplexity(model, windows)
        rows.append(
            {
                "plan": i,
                "layers": " ".join(map(str, chosen)),
                "perplexity": plain,
                "healed": healed,
                "tokens/s": report.tokens_per_s,
                "wall s": time.perf_counter() - start,
            }
        )
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=i == 0), flush=True)
    frame = pd.DataFrame(rows)
    rho, p = spearmanr(frame["perplexity"], frame["healed"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "rank_correlation.csv", index=False)
    print(f"\nSpearman rank correlation of plain and healed P1 perplexity, {len(frame)} plans: {rho:.3f} (p {p:.2g})")


if __name__ == "__main__":
    main()
