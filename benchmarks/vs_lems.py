"""Benchmark: ``dse`` against LEMS + KFAC-SVD (Thoma et al., ICML 2026; issue 30) on SmolLM2-135M, P1.

``benchmarks/lems_own.py`` runs LEMS's own code; this script runs ``dse``'s side. First the
factorizations at SVD-LLM's uniform ranks (each decoder projection loses
``R`` of its parameters, rank ``int(m·n·(1−R)/(m+n))``, ``dse.decompose.uniform_plan``), ``svdllm``
(with the budget study's ridge, ``jitter 1e-3``, as docs/vs_svdllm.md) beside ``twosided`` (input
and output-gradient second moments, KFAC-SVD's idea), against KFAC-SVD's own uniform figures
(issue 30). Perplexity is P1's (pages 0–5); ``held-out`` is the same measure on pages 6–11. Both
methods use P1's calibration windows (``--samples`` of them, 256 tokens, seed 3, pages 40–61); the
statistics are gathered once, with the output-gradient moments, and every figure comes from one run.
Each method is also measured at the ranks of ``--at-plans/R*.json`` (default LEMS's plans, written
by ``benchmarks/lems_own.py``): LEMS's allocation with ``dse``'s factors.

With ``--trials N`` it also searches, for each ratio, where ``twosided``'s parameters go: a study over
``spaces/smollm2-budget.yaml`` (every plan keeps the uniform plan's projection parameters), its
starts ``flat``, ``sensitivity`` and ``errormodel``, then one sampler per ``--samplers`` entry:
``errormodel`` (the error model refitted after every trial, in its trust region),
``errormodel-once`` (fitted to the probes only), ``errormodel-global`` (refitted, no trust region)
and ``tpe``, each from the same seed. It writes ``OUT/results.csv`` (best plan, P1 and
held-out, minutes, the model's Spearman correlation with the measured perplexity),
``OUT/curves.csv`` and ``OUT/curves.png`` (best so far by trial) and ``OUT/plans/R*-<sampler>.json``.

``--model gemma3-270m`` runs the same on Gemma 3 270M (P1's pages and windows in its tokens).

    python benchmarks/vs_lems.py [--model smollm2-135m] [--ratios 0.1 0.2 0.4] [--samples 32] [--jitter 1e-6]
        [--trials 40 --samplers errormodel errormodel-once tpe --out docs/vs_lems]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from common import BENCHMARKS, ROOT, equal_size_study, plan_perplexities

from dse.decompose import FactorCache, Plan, calibrate, factor_forms, make_config, uniform_plan
from dse.evaluate import Evaluator, perplexity
from dse.model import find_projections, load_model
from dse.results.status import prediction_agreement
from dse.study.config import load_study_config
from dse.study.measure import Measurer
from dse.study.protocols import P1_HELD_OUT_PAGES, p1_calibration, p1_windows
from dse.study.samplers import parse_sampler

# The issue's figures, all on SmolLM2-135M (printed beside other models' rows as references only)
KFAC_SVD_UNIFORM = {0.1: 69.12, 0.2: 95.64, 0.4: 230.87}  # KFAC-SVD's own code on SmolLM2 under P1, issue 30
SVDLLM_UNIFORM = {0.1: 74.94, 0.2: 116.44, 0.4: 322.82}  # dse svdllm (jitter 1e-3), docs/vs_svdllm.md
LEMS = {0.1: 33.36, 0.2: 44.74, 0.4: 102.50}  # LEMS + KFAC-SVD's own code on SmolLM2 under P1, issue 30
SAMPLERS = {  # --samplers: the study's sampler after the starts
    "errormodel": {"name": "errormodel"},
    "errormodel-once": {"name": "errormodel", "refit": False},
    "errormodel-global": {"name": "errormodel", "trust": 0.0},  # no trust region: the unbounded optimum
    "tpe": {"name": "tpe"},
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens (P1: 32)")
    ap.add_argument("--jitter", type=float, default=1e-6, help="twosided's ridge")
    ap.add_argument("--trials", type=int, default=0, help="trials per searched study, starts included (0: none)")
    ap.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=["errormodel"])
    ap.add_argument(
        "--at-plans", default=str(ROOT / "docs" / "vs_lems" / "lems"), help="measure each method at R*.json ranks"
    )
    ap.add_argument("--align", type=int, default=16, help="searched ranks: multiples of this (LEMS: 16)")
    ap.add_argument("--cache-dir", help="calibration statistics and factors kept here for a rerun (default: none)")
    ap.add_argument("--model", default="smollm2-135m", help="a dse model name (gemma3-270m: another family)")
    ap.add_argument("--study", default=str(ROOT / "studies" / "smollm2-budget.yaml"))
    ap.add_argument("--storage", help="study storage URL (default: a temporary SQLite file)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "vs_lems"))
    ap.add_argument("--benchmarks-dir", default=str(BENCHMARKS))
    args = ap.parse_args(argv)

    model, tokenizer = load_model(args.model)
    table = find_projections(model)
    windows = {
        "P1": p1_windows(tokenizer, args.benchmarks_dir),
        "held-out": p1_windows(tokenizer, args.benchmarks_dir, P1_HELD_OUT_PAGES),
    }
    base = {k: perplexity(model, w) for k, w in windows.items()}
    spec = dataclasses.replace(p1_calibration(args.benchmarks_dir), n_samples=args.samples)
    start = time.perf_counter()
    calibration = calibrate(model, tokenizer, spec, args.cache_dir, grad_moments=True, progress=False)
    calib_s = time.perf_counter() - start
    print(
        f"{args.model}, {len(table)} projections, torch threads {torch.get_num_threads()}; dense perplexity "
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
        cache = FactorCache(args.cache_dir)
        start = time.perf_counter()
        factor_forms(model, table, config, cache=cache, calibration=calibration, table=table)
        factor_s = time.perf_counter() - start
        for ratio in args.ratios:
            plan = uniform_plan(table, ratio=ratio, method=config)
            kw = {"calibration": calibration}
            results[name, ratio] = plan_perplexities(model, plan, windows, cache=cache, **kw)
            print(
                f"{name} R={ratio:g}: P1 {results[name, ratio]['P1']:.2f}, held-out "
                f"{results[name, ratio]['held-out']:.2f} (factorization {factor_s:.1f} s)",
                flush=True,
            )
            at = Path(args.at_plans) / f"R{ratio:g}.json"
            if at.exists():  # LEMS's allocation, this method's factors
                found = plan_perplexities(model, Plan(Plan.load(at).ranks, config), windows, cache=cache, **kw)
                print(f"{name} at {at}: P1 {found['P1']:.2f}, held-out {found['held-out']:.2f}", flush=True)

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

    if args.trials:
        search(args, model, tokenizer, table, calibration, cache, methods["twosided"], windows)


def search(args, model, tokenizer, table, calibration, cache, method, windows) -> None:
    """For each ratio and sampler, a study of where ``method``'s parameters go (see the module doc)."""
    base = load_study_config(args.study)
    space = dataclasses.replace(base.space, model=args.model)
    base = dataclasses.replace(base, model=args.model, space=space, method=method, name=f"vs-lems-{args.model}")
    storage = args.storage or f"sqlite:///{tempfile.mkdtemp(prefix='dse-vs-lems-')}/studies.db"
    evaluator = Evaluator(model, tokenizer, base.evaluation)
    measurer = Measurer(base, model, tokenizer, evaluator, cache=cache, calibration=calibration, progress=False)
    out = Path(args.out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for ratio in args.ratios:
        uniform = uniform_plan(table, ratio=ratio, method=method)
        for name in args.samplers:
            study, plan, minutes = equal_size_study(
                base,
                ratio,
                measurer,
                storage,
                args.trials,
                space=dataclasses.replace(space, starts=("flat", "sensitivity", "errormodel"), align=args.align),
                name=f"vs-lems-{args.model}-R{ratio:g}-{name}",
                sampler=parse_sampler(dict(SAMPLERS[name])),
            )
            best = study.best_trial
            assert plan.kept_params(table) <= uniform.kept_params(table), "the searched plan is over budget"
            plan.save(out / "plans" / f"R{ratio:g}-{name}.json")
            held = plan_perplexities(model, plan, {"h": windows["held-out"]}, cache=cache, calibration=calibration)
            values = [t.value for t in sorted(study.trials, key=lambda t: t.number)]
            curves[ratio, name] = pd.Series(values).ffill().cummin().tolist()
            agreement = prediction_agreement(study)
            rows.append(
                {
                    "R": ratio,
                    "sampler": name,
                    "P1": best.value,
                    "held-out": held["h"],
                    "LEMS (issue)": LEMS.get(ratio),
                    "best trial": best.number,
                    "trials": len(study.trials),
                    "search minutes": minutes,
                    "decomposed modules": len(plan),
                    "spearman predicted/measured": agreement[0] if agreement else None,
                }
            )
            print(
                f"R={ratio:g} {name}: searched P1 {best.value:.2f}, held-out {held['h']:.2f} (trial {best.number} "
                f"of {len(study.trials)}, {minutes:.1f} min; LEMS {LEMS.get(ratio)})"
                + (f"; error model Spearman {agreement[0]:.3f} over {agreement[1]} trials" if agreement else ""),
                flush=True,
            )
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    frame = pd.DataFrame({f"R{r:g} {n}": pd.Series(v) for (r, n), v in curves.items()})
    frame.index.name = "trial"
    frame.to_csv(out / "curves.csv")
    _plot_curves(frame, out, args.model)


def _plot_curves(frame, out: Path, model: str) -> None:
    import matplotlib.pyplot as plt

    from dse.results.plots import save_figure

    ax = frame.plot(drawstyle="steps-post", logy=True, figsize=(6.4, 4))
    ax.set(xlabel="trial", ylabel="best P1 perplexity so far", title=f"{model}, twosided, equal-size search")
    save_figure(ax.figure, out / "curves", dpi=120)
    plt.close(ax.figure)


if __name__ == "__main__":
    main()
