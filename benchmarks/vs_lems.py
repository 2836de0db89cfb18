"""Benchmark: ``dse`` against LEMS + KFAC-SVD (Thoma et al., ICML 2026; issue 30) on SmolLM2-135M, P1.

So far its first part: the factorizations at SVD-LLM's uniform ranks (each decoder projection loses
``R`` of its parameters, rank ``int(m·n·(1−R)/(m+n))``, ``dse.decompose.uniform_plan``), ``svdllm``
(with the budget study's ridge, ``jitter 1e-3``, as docs/vs_svdllm.md) beside ``twosided`` (input
and output-gradient second moments, KFAC-SVD's idea), against KFAC-SVD's own uniform figures
(issue 30). Perplexity is P1's (pages 0–5); ``held-out`` is the same measure on pages 6–11. Both
methods use P1's calibration windows (``--samples`` of them, 256 tokens, seed 3, pages 40–61); the
statistics are gathered once, with the output-gradient moments, and every figure comes from one run.

    python benchmarks/vs_lems.py [--ratios 0.1 0.2 0.4] [--samples 32] [--jitter 1e-6]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from common import BENCHMARKS, plan_perplexities

from dse.decompose import FactorCache, calibrate, factor_forms, make_config, uniform_plan
from dse.evaluate import perplexity
from dse.model import find_projections, load_model
from dse.study.protocols import P1_HELD_OUT_PAGES, p1_calibration, p1_windows

KFAC_SVD_UNIFORM = {0.1: 69.12, 0.2: 95.64, 0.4: 230.87}  # KFAC-SVD's own code on SmolLM2 under P1, issue 30
SVDLLM_UNIFORM = {0.1: 74.94, 0.2: 116.44, 0.4: 322.82}  # dse svdllm (jitter 1e-3), docs/vs_svdllm.md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens (P1: 32)")
    ap.add_argument("--jitter", type=float, default=1e-6, help="twosided's ridge")
    ap.add_argument("--benchmarks-dir", default=str(BENCHMARKS))
    args = ap.parse_args(argv)

    model, tokenizer = load_model("smollm2-135m")
    table = find_projections(model)
    windows = {
        "P1": p1_windows(tokenizer, args.benchmarks_dir),
        "held-out": p1_windows(tokenizer, args.benchmarks_dir, P1_HELD_OUT_PAGES),
    }
    base = {k: perplexity(model, w) for k, w in windows.items()}
    spec = dataclasses.replace(p1_calibration(args.benchmarks_dir), n_samples=args.samples)
    start = time.perf_counter()
    calibration = calibrate(model, tokenizer, spec, grad_moments=True, progress=False)
    calib_s = time.perf_counter() - start
    print(
        f"SmolLM2-135M, {len(table)} projections, torch threads {torch.get_num_threads()}; dense perplexity "
        f"P1 {base['P1']:.2f}, held-out {base['held-out']:.2f}"
    )
    print(
        f"calibration with output-gradient moments: {spec.n_samples} windows of {spec.seq_len} tokens, "
        f"{calib_s:.1f} s\n"
    )

    methods = {
        "svdllm": make_config("svdllm", {"jitter": 1e-3}),
        "twosided": make_config("twosided", {"jitter": args.jitter}),
    }
    results = {}
    for name, config in methods.items():
        cache = FactorCache()
        start = time.perf_counter()
        factor_forms(model, table, config, cache=cache, calibration=calibration, table=table)
        factor_s = time.perf_counter() - start
        for ratio in args.ratios:
            plan = uniform_plan(table, ratio=ratio, method=config)
            results[name, ratio] = plan_perplexities(model, plan, windows, cache=cache, calibration=calibration)
            print(
                f"{name} R={ratio:g}: P1 {results[name, ratio]['P1']:.2f}, held-out "
                f"{results[name, ratio]['held-out']:.2f} (factorization {factor_s:.1f} s)",
                flush=True,
            )

    print(
        "\n| R | KFAC-SVD uniform (its code) | svdllm uniform (docs) | dse svdllm | dse twosided | "
        "held-out: svdllm / twosided |"
    )
    print("|---|---|---|---|---|---|")
    for ratio in args.ratios:
        s, t = results["svdllm", ratio], results["twosided", ratio]
        print(
            f"| {ratio:g} | {KFAC_SVD_UNIFORM.get(ratio, '')} | {SVDLLM_UNIFORM.get(ratio, '')} | {s['P1']:.2f} | "
            f"**{t['P1']:.2f}** | {s['held-out']:.2f} / {t['held-out']:.2f} |"
        )


if __name__ == "__main__":
    main()
