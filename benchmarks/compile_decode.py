"""Benchmark: does ``torch.compile`` of the decode step bring decomposed models closer to their
weight-bytes ratio? In one process: the dense model and each plan (its ranks factorized by plain
``svd``: speed depends on the shapes, not on the factor values), each timed eager (dynamic cache)
and compiled (:class:`dse.model.timing.CompiledDecode`: static cache, the step compiled once per
model); fastest median of ``--rounds`` interleaved rounds of ``--repeats`` × 32 steps after a
128-token prompt. ``dse speed --compile`` times the same decode loop in a fresh process.

``--profile`` splits each step into its matrix products (``aten::mm``/``addmm`` self time under
``torch.profiler``, one profiled run of 32 steps in the last round) and the rest (the timed step
less those), and prints how fast the products read the plan's weights against the dense model's
(``GEMV efficiency``: 1.0 when they take the dense products' time × the weight-bytes share).

    python benchmarks/compile_decode.py docs/speed/plans/params_-20.json [...] [--rounds 2] [--profile]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dse.decompose import Plan, decompose_, restore_
from dse.model import load_model, model_bytes
from dse.model.timing import CompiledDecode, decode, prefill, timed

PROMPT, STEPS = 128, 32


def step_seconds(run, setup, repeats: int, warmup: int) -> float:
    """Median seconds per decode step of ``run(setup())`` (:func:`dse.model.timing.timed`)."""
    return timed(run, torch.device("cpu"), repeats=repeats, warmup=warmup, setup=setup).median / STEPS


def product_seconds(run, setup) -> float:
    """Seconds per decode step spent in matrix products (self time of ``aten::mm`` and
    ``aten::addmm``) in one profiled ``run(setup())``."""
    arg = setup()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(arg)
    return sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key in ("aten::mm", "aten::addmm")) / 1e6 / STEPS


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="split each step into matrix products and the rest")
    args = ap.parse_args(argv)
    model, _ = load_model(args.model)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    plans = {"dense": None, **{Path(p).stem: Plan.load(p) for p in args.plans}}
    times = {name: {"eager": [], "compiled": []} for name in plans}
    sizes, compile_s, products = {}, {}, {}
    for round_ in range(args.rounds):
        for name, plan in plans.items():
            if plan is not None:
                decompose_(model, Plan(plan.ranks, "svd"))
            try:
                sizes[name] = model_bytes(model)
                eager = (lambda out: decode(model, out, STEPS)), (lambda: prefill(model, ids))
                times[name]["eager"].append(step_seconds(*eager, args.repeats, 1))
                compiled = CompiledDecode(model, PROMPT + STEPS)
                run, setup = (lambda out: compiled.decode(out, STEPS)), (lambda: compiled.prefill(ids))
                compile_s[name] = STEPS * step_seconds(run, setup, 1, 0)  # the first run compiles
                times[name]["compiled"].append(step_seconds(run, setup, args.repeats, 0))
                if args.profile and round_ == args.rounds - 1:
                    products[name] = {"eager": product_seconds(*eager), "compiled": product_seconds(run, setup)}
            finally:
                if plan is not None:
                    restore_(model)
    print(f"{args.model}, {next(model.parameters()).dtype}, {torch.get_num_threads()} threads; decode step ms, "
          f"fastest of {args.rounds} rounds\n")
    print("| model | weight MB | bytes ratio | eager ms | compiled ms | compile s | eager speed-up / bytes | "
          "compiled speed-up / bytes |")
    print("|---|---|---|---|---|---|---|---|")
    best = {name: {k: min(v) for k, v in t.items()} for name, t in times.items()}
    for name in plans:
        ratio = sizes["dense"] / sizes[name]
        e, c = best[name]["eager"], best[name]["compiled"]
        print(f"| {name} | {sizes[name] / 1e6:.1f} | {ratio:.3f} | {1000 * e:.1f} | {1000 * c:.1f} | "
              f"{compile_s[name]:.0f} | {best['dense']['eager'] / e / ratio:.3f} | "
              f"{best['dense']['compiled'] / c / ratio:.3f} |")
    if products:
        print("\nmatrix products and the rest of a step (ms; the products from one profiled run, the rest "
              "= the fastest step less them)\n")
        print("| model | mode | step | products | rest | products ideal | GEMV efficiency |")
        print("|---|---|---|---|---|---|---|")
        for name in plans:
            for mode in ("eager", "compiled"):
                mm, step = products[name][mode], best[name][mode]
                ideal = products["dense"][mode] * sizes[name] / sizes["dense"]
                print(f"| {name} | {mode} | {1000 * step:.1f} | {1000 * mm:.1f} | {1000 * (step - mm):.1f} | "
                      f"{1000 * ideal:.1f} | {ideal / mm:.3f} |")


if __name__ == "__main__":
    main()
