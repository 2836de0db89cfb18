"""Benchmark: does ``torch.compile`` of the decode step bring decomposed models closer to their
weight-bytes ratio? In one process: the dense model and each plan (its ranks factorized by plain
``svd``: speed depends on the shapes, not on the factor values), each timed eager (dynamic cache)
and compiled (static cache, the decode step compiled once per model, ``dynamic=False``); fastest
median of ``--rounds`` interleaved rounds of ``--repeats`` × 32 steps after a 128-token prompt.

    python benchmarks/compile_decode.py docs/speed/plans/params_-20.json [...] [--rounds 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dse.decompose import Plan, decompose_, restore_
from dse.model import load_model, model_bytes
from dse.model.timing import decode, prefill, timed

PROMPT, STEPS = 128, 32


def step_seconds(run, setup, repeats: int, warmup: int) -> float:
    """Median seconds per decode step of ``run(setup())`` (:func:`dse.model.timing.timed`)."""
    return timed(run, torch.device("cpu"), repeats=repeats, warmup=warmup, setup=setup).median / STEPS


@torch.no_grad()
def static_prefill(model, ids, cache) -> torch.Tensor:
    """Fill the static ``cache`` with ``ids``; the first greedy token."""
    cache.reset()
    out = model(ids, past_key_values=cache, cache_position=torch.arange(PROMPT), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def compiled_decode(step, cache, token) -> None:
    """``STEPS`` greedy steps of the compiled ``step`` over the static ``cache``."""
    for i in range(STEPS):
        out = step(token, past_key_values=cache, cache_position=torch.tensor([PROMPT + i]), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)


def main(argv=None) -> None:
    from transformers import StaticCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    model, _ = load_model(args.model)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    plans = {"dense": None, **{Path(p).stem: Plan.load(p) for p in args.plans}}
    times = {name: {"eager": [], "compiled": []} for name in plans}
    sizes, compile_s = {}, {}
    for _ in range(args.rounds):
        for name, plan in plans.items():
            if plan is not None:
                decompose_(model, Plan(plan.ranks, "svd"))
            try:
                sizes[name] = model_bytes(model)
                times[name]["eager"].append(step_seconds(lambda out: decode(model, out, STEPS),
                                                         lambda: prefill(model, ids), args.repeats, 1))
                torch._dynamo.reset()
                cache = StaticCache(config=model.config, max_cache_len=PROMPT + STEPS)
                step = torch.compile(model.forward, dynamic=False)
                run, setup = (lambda token: compiled_decode(step, cache, token)), (lambda: static_prefill(model, ids, cache))
                compile_s[name] = STEPS * step_seconds(run, setup, 1, 0)  # the first run compiles
                times[name]["compiled"].append(step_seconds(run, setup, args.repeats, 0))
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


if __name__ == "__main__":
    main()
