"""Benchmark: perplexity of every decomposition method at uniform parameter cuts (protocol P1).

For each method and each ratio ``R`` the decoder projections lose ``R`` of their parameters:
rank ``int(m·n·(1−R)/(m+n))`` per ``m × n`` weight (``dse.decompose.uniform_plan``); for ``tucker2`` the
largest equal pair ``(r, r)`` with ``m·r + r² + r·n <= m·n·(1−R)``. Perplexity and calibration follow
protocol P1 (``dse.protocols``). Everything is measured in one run; factorization seconds are the
cost of the first ``decompose_`` of each method (later ratios only truncate cached forms).

    python benchmarks/methods.py [--ratios 0.1 0.2 0.4] [--methods svd tucker2 asvd svdllm]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import BENCHMARKS

from dse.decompose import FactorCache, calibrate, decomposed, get_method, uniform_plan
from dse.evaluate import perplexity
from dse.model import find_projections, load_model
from dse.study.protocols import p1_calibration, p1_windows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["svd", "tucker2", "asvd", "svdllm"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    ap.add_argument("--benchmarks-dir", default=str(BENCHMARKS))
    args = ap.parse_args(argv)

    model, tokenizer = load_model(args.model, device=args.device)
    table = find_projections(model)
    windows = p1_windows(tokenizer, args.benchmarks_dir)
    base = perplexity(model, windows)
    spec = p1_calibration(args.benchmarks_dir)
    calibration, calib_s = None, float("nan")
    if any(get_method(m).config_cls.needs_calibration for m in args.methods):
        moments = any(get_method(m).config_cls.needs_grad_moments for m in args.methods)
        calibration = calibrate(model, tokenizer, spec, grad_moments=moments, progress=False)
        calib_s = calibration.seconds
    dense = sum(p.out_features * p.in_features for p in table.values())

    print(
        f"model {args.model}, {len(table)} projections, protocol P1 ({windows.shape[0]} windows of "
        f"{windows.shape[1]} tokens), torch threads {torch.get_num_threads()}"
    )
    print(
        f"base perplexity {base:.2f}; calibration {calib_s:.1f} s ({spec.n_samples} windows of {spec.seq_len} tokens)\n"
    )
    head = " | ".join(f"PPL R={r:g}" for r in args.ratios)
    print(f"| method | {head} | kept params at each R | factorize s |")
    print("|---|" + "---|" * (len(args.ratios) + 2), flush=True)
    for method in args.methods:
        cache, ppls, kept, factor_s = FactorCache(), [], [], None
        for ratio in args.ratios:
            plan = uniform_plan(table, ratio=ratio, method=method)
            start = time.perf_counter()
            with decomposed(model, plan, cache=cache, calibration=calibration):
                factor_s = factor_s if factor_s is not None else time.perf_counter() - start
                kept.append(plan.params(table) / dense)
                ppls.append(perplexity(model, windows))
        print(
            f"| {method} | {' | '.join(f'{p:.4g}' for p in ppls)} | {'/'.join(f'{k:.3f}' for k in kept)}"
            f" | {factor_s:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
