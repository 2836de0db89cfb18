"""Benchmark: does healing recover the P1 searched plans, beyond what fine-tuning gives any model? (issue 29)

The plans are docs/vs_svdllm.md's searched plans (``docs/vs_svdllm/plans/R*.json``, ``svdllm`` on
P1's calibration). Each is measured before and after a heal by each ``--variants`` recipe, beside
two controls: the dense model, and the dense model tuned by the same recipe and tokens ("tuned
dense": the full-rank ``svd`` plan, which is the dense model to float tolerance, healed as a plan
is; only for ``lm`` variants: the dense model distilled from itself does not change). Every heal
reads WikiText-2 test pages 12–39, disjoint from P1's evaluation (0–5), held-out (6–11) and
calibration (40–61) pages. Measures: P1 perplexity, the held-out pages', another
domain's (LAMBADA's fiction passages, ``lambada_openai/lambada_test.jsonl`` of the shared
benchmarks, first 4096 tokens in windows of 512), and lm-eval accuracy on ``--tasks`` (first
``--limit`` rows each, ``acc_norm`` where reported, by the fast engine, which gives HFLM's
loglikelihoods) with each task's standard error.

    python benchmarks/heal.py [--ratios 0.1 0.2 0.4] [--variants factors-lm factors-distill ...]
                              [--steps 100] [--limit 600] [--no-controls] [--out docs/heal]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import pandas as pd
import torch
from common import BENCHMARKS, HEAL_PAGES, ROOT, heal_training_windows

from dse.decompose import FactorCache, HealConfig, Plan, calibrate, decomposed, temporarily_healed
from dse.evaluate import EvalConfig, Evaluator, perplexity
from dse.model import TextSource, find_projections, load_model, token_windows
from dse.study.protocols import P1_EVAL_TOKENS, P1_HELD_OUT_PAGES, P1_WINDOW, p1_calibration, p1_windows

VARIANTS = {  # name -> the recipe's changes from --steps, batch 4 x 256 tokens, lr 1e-4, factors, lm
    "factors-lm": {},
    "factors-distill": {"loss": "distill"},
    "lora-lm": {"train": "lora"},
    "lora-distill": {"train": "lora", "loss": "distill"},
    "sequential-lm": {"freeze": "sequential"},
}


def measures(model, evaluator: Evaluator, windows: dict) -> dict:
    """Perplexity on each text and accuracy on each task (with its standard error) of ``model`` now."""
    out = {name: perplexity(model, w) for name, w in windows.items()}
    acc = {k: v for k, v in evaluator.run(progress=False).items() if k.startswith("acc/")}
    n = evaluator.config.limit
    out.update(acc)
    out.update({f"se/{k[4:]}": math.sqrt(v * (1 - v) / n) for k, v in acc.items()})
    out["accuracy"] = sum(acc.values()) / len(acc) if acc else float("nan")
    return out


def healed_row(model, plan, recipe, heal_windows, evaluator, windows, **decompose) -> dict:
    """Heal ``plan`` by ``recipe`` (a fresh copy of its factors), measure, restore."""
    with decomposed(model, plan, **decompose), temporarily_healed(model, heal_windows, recipe, progress=False) as r:
        row = measures(model, evaluator, windows)
    peak = f"{r.peak_memory / 2**30:.2f} GiB ({r.peak_memory_of})" if r.peak_memory else "-"
    return {**row, "steps": r.steps, "heal s": r.seconds, "tokens/s": r.tokens_per_s, "peak memory": peak}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["factors-lm", "factors-distill"])
    ap.add_argument("--steps", type=int, default=100, help="heal steps of 4 x 256 tokens")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tasks", nargs="*", default=["piqa", "arc_easy", "hellaswag"])
    ap.add_argument("--limit", type=int, default=600, help="rows per task (600: standard error under 2.1 points)")
    ap.add_argument(
        "--controls", action=argparse.BooleanOptionalAction, default=True, help="measure the dense and tuned dense rows"
    )
    ap.add_argument("--benchmarks-dir", default=str(BENCHMARKS))
    ap.add_argument("--plans", default=str(ROOT / "docs" / "vs_svdllm" / "plans"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "heal"))
    args = ap.parse_args(argv)

    model, tokenizer = load_model("smollm2-135m")
    table = find_projections(model)
    other = TextSource(path=str(Path(args.benchmarks_dir) / "lambada_openai/lambada_test.jsonl"), field="text")
    windows = {
        "P1": p1_windows(tokenizer, args.benchmarks_dir),
        "held-out": p1_windows(tokenizer, args.benchmarks_dir, P1_HELD_OUT_PAGES),
        "LAMBADA": token_windows(tokenizer, other.read(), P1_WINDOW, max_tokens=P1_EVAL_TOKENS),
    }
    recipe = HealConfig(steps=args.steps, lr=args.lr)
    heal_windows = heal_training_windows(tokenizer, args.benchmarks_dir, recipe.seq_len)
    evaluator = Evaluator(
        model, tokenizer, EvalConfig(tasks=args.tasks, limit=args.limit, data_dir=args.benchmarks_dir, engine="fast")
    )
    print(
        f"SmolLM2-135M, torch threads {torch.get_num_threads()}; heal: {args.steps} steps x {recipe.batch} x "
        f"{recipe.seq_len} tokens, lr {args.lr:g}, pages {HEAL_PAGES[0]}-{HEAL_PAGES[1] - 1} "
        f"({len(heal_windows)} windows); tasks {', '.join(args.tasks)} x {args.limit} rows",
        flush=True,
    )
    rows = [{"model": "dense", "variant": "-", **measures(model, evaluator, windows)}] if args.controls else []
    if rows:  # each row as soon as it is measured: a run stopped early keeps what it measured
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    full = Plan({n: p.full_rank for n, p in table.items()}, "svd")
    for variant in args.variants if args.controls else ():
        tuned = dataclasses.replace(recipe, **VARIANTS[variant])
        if tuned.loss == "distill":  # the dense model distilled from itself: its loss is 0 from the start
            continue
        row = healed_row(model, full, tuned, heal_windows, evaluator, windows)
        rows.append({"model": "tuned dense", "variant": variant, **row})
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    calibration = calibrate(model, tokenizer, p1_calibration(args.benchmarks_dir), progress=False)
    cache = FactorCache()
    for ratio in args.ratios:
        plan = Plan.load(Path(args.plans) / f"R{ratio:g}.json")
        kw = {"cache": cache, "calibration": calibration, "table": table}
        with decomposed(model, plan, **kw):
            rows.append({"model": f"R {ratio:g}", "variant": "unhealed", **measures(model, evaluator, windows)})
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
        for variant in args.variants:
            tuned = dataclasses.replace(recipe, **VARIANTS[variant])
            start = time.perf_counter()
            row = healed_row(model, plan, tuned, heal_windows, evaluator, windows, **kw)
            rows.append({"model": f"R {ratio:g}", "variant": variant, **row, "wall s": time.perf_counter() - start})
            print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / f"results-{'-'.join(f'{r:g}' for r in args.ratios)}.csv", index=False)
    print("\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
