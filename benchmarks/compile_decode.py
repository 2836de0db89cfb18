"""Benchmark: does ``torch.compile`` of the decode step bring decomposed models closer to their
weight-bytes ratio? In one process: the dense model and each plan (its ranks factorized by plain
``svd``: speed depends on the shapes, not on the factor values), each timed eager (dynamic cache)
and compiled (:class:`dse.model.timing.CompiledDecode`: static cache, the step compiled once per
model; CUDA graphs on a GPU); fastest median of ``--rounds`` interleaved rounds of ``--repeats`` ×
32 steps after a 128-token prompt. ``dse speed --compile`` times the same decode loop in a fresh
process.

``--model-config FILE`` times a model of that architecture (a YAML or JSON mapping with its
``model_type``, or a space file's ``model_config:``, e.g. ``spaces/llama2-7b-layer-ranks.yaml``)
built on ``--device`` with random weights and random factors of the plans' ranks: what a GPU run
needs when the weights cannot travel, or for a model too large to have here. ``--uniform R ...``
adds SVD-LLM's uniform plans (``R`` of each module's parameters removed) to the plan files, with
their ranks rounded down to multiples of ``--align N`` if given.

``--profile`` (CPU) splits each step into its matrix products (``aten::mm``/``addmm`` self time
under ``torch.profiler``, one profiled run of 32 steps in the last round) and the rest (the timed
step less those), and prints how fast the products read the plan's weights against the dense
model's (``GEMV efficiency``: 1.0 when they take the dense products' time × the weight-bytes share).

    python benchmarks/compile_decode.py docs/speed/plans/params_-20.json [...] [--rounds 2] [--profile]
    python benchmarks/compile_decode.py --model-config spaces/llama2-7b-layer-ranks.yaml --uniform 0.1 0.2 0.3 \\
        --device cuda --dtype bfloat16 --rounds 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from dse.decompose import LowRankLinear, Plan, align_rank, decompose_, restore_, swap_module, uniform_plan
from dse.model import auto_class, find_projections, input_device, load_model, model_bytes
from dse.model.shapes import config_from_dict
from dse.model.timing import CompiledDecode, decode, prefill, timed

PROMPT, STEPS = 128, 32


def step_seconds(run, setup, device, repeats: int, warmup: int) -> float:
    """Median seconds per decode step of ``run(setup())`` (:func:`dse.model.timing.timed`)."""
    return timed(run, device, repeats=repeats, warmup=warmup, setup=setup).median / STEPS


def product_seconds(run, setup) -> float:
    """Seconds per decode step spent in matrix products (self time of ``aten::mm`` and
    ``aten::addmm``) in one profiled ``run(setup())``."""
    arg = setup()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(arg)
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm")) / 1e6 / STEPS


def random_model(path: str, device: str, dtype: torch.dtype):
    """A model of the architecture in ``path`` (a mapping, or a space file's ``model_config``),
    built on ``device`` with random weights."""
    data = yaml.safe_load(Path(path).read_text())
    config = config_from_dict(data.get("model_config", data), where=f"{path}: model_config")
    with torch.device(device):
        model = auto_class(config).from_config(config, dtype=dtype)
    return model.eval()


def random_factors_(model, plan: Plan) -> None:
    """Each planned module swapped for two random factors of its rank, keeping its original as
    ``decompose_`` does, so ``restore_`` puts it back (speed depends on the factors' shapes, not
    their values)."""
    for name, rank in plan.ranks.items():
        module = model.get_submodule(name)
        out_f, in_f = module.weight.shape
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        factors = [torch.randn(rank, in_f, **kw) / in_f**0.5, torch.randn(out_f, rank, **kw) * 0.02 / rank**0.5]
        low_rank = LowRankLinear.from_linear(module, factors)
        low_rank.keep_original(swap_module(model, name, low_rank))


def aligned(plan: Plan, step) -> Plan:
    """``plan`` with its ranks rounded down to multiples of ``step`` if given, as ``align: auto``
    rounds them (:func:`dse.decompose.align_rank`)."""
    return plan.with_ranks({n: align_rank(r, step) for n, r in plan.ranks.items()}) if step else plan


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plans", nargs="*")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-config", help="time a model of this architecture with random weights and factors")
    ap.add_argument("--uniform", nargs="+", type=float, default=[], help="also SVD-LLM's uniform plans at these ratios")
    ap.add_argument("--align", type=int, help="round the uniform plans' ranks down to multiples of this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eager-only", action="store_true", help="do not compile")
    ap.add_argument("--profile", action="store_true", help="split each step into matrix products and the rest (CPU)")
    ap.add_argument("--json", help="write the measurements to this file")
    args = ap.parse_args(argv)
    if args.profile and args.device != "cpu":
        ap.error("--profile: CPU only (it reads aten::mm self times)")
    dtype = getattr(torch, args.dtype)
    if args.model_config:
        model, name = random_model(args.model_config, args.device, dtype), Path(args.model_config).stem
    else:
        (model, _), name = load_model(args.model, device=args.device, dtype=args.dtype), args.model
    device = input_device(model)
    table = find_projections(model)
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, PROMPT), generator=torch.Generator().manual_seed(0)
    ).to(device)
    suffix = f" @{args.align}" if args.align else ""
    plans = {
        "dense": None,
        **{Path(p).stem: Plan.load(p) for p in args.plans},
        **{f"uniform {r:g}{suffix}": aligned(uniform_plan(table, ratio=r), args.align) for r in args.uniform},
    }
    modes = ("eager",) if args.eager_only else ("eager", "compiled")
    times = {plan_name: {mode: [] for mode in modes} for plan_name in plans}
    sizes, compile_s, products = {}, {}, {}
    for round_ in range(args.rounds):
        for plan_name, plan in plans.items():
            if plan is not None and args.model_config:
                random_factors_(model, plan)
            elif plan is not None:
                decompose_(model, Plan(plan.ranks, "svd"))
            try:
                sizes[plan_name] = model_bytes(model)
                eager = (lambda out: decode(model, out, STEPS)), (lambda: prefill(model, ids))
                times[plan_name]["eager"].append(step_seconds(*eager, device, args.repeats, 1))
                if "compiled" in modes:
                    compiled = CompiledDecode(model, PROMPT + STEPS)
                    run, setup = (lambda out: compiled.decode(out, STEPS)), (lambda: compiled.prefill(ids))
                    compile_s[plan_name] = STEPS * step_seconds(run, setup, device, 1, 0)  # the first run compiles
                    times[plan_name]["compiled"].append(step_seconds(run, setup, device, args.repeats, 0))
                if args.profile and round_ == args.rounds - 1:
                    products[plan_name] = {"eager": product_seconds(*eager)}
                    if "compiled" in modes:
                        products[plan_name]["compiled"] = product_seconds(run, setup)
            finally:
                restore_(model)  # a no-op where nothing was decomposed
            print(
                f"round {round_}: {plan_name}: {sizes[plan_name] / 1e6:.1f} MB, "
                + ", ".join(f"{mode} {1000 * times[plan_name][mode][-1]:.3f} ms" for mode in modes),
                flush=True,
            )
    best = {plan_name: {mode: min(v) for mode, v in t.items()} for plan_name, t in times.items()}
    print(
        f"\n{name}, {args.dtype} on {device.type}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"{torch.get_num_threads()} threads, batch {args.batch}; decode step ms, fastest of {args.rounds} rounds\n"
    )
    print(
        "| model | weight MB | bytes ratio | "
        + " | ".join(f"{m} ms" for m in modes)
        + (" | compile s" if "compiled" in modes else "")
        + " | "
        + " | ".join(f"{m} speed-up / bytes" for m in modes)
        + " |"
    )
    print("|---" * (3 + 2 * len(modes) + ("compiled" in modes)) + "|")
    rows = []
    for plan_name in plans:
        ratio = sizes["dense"] / sizes[plan_name]
        row = {
            "plan": plan_name,
            "weight_bytes": sizes[plan_name],
            "bytes_ratio": ratio,
            **{f"{m}_step_s": best[plan_name][m] for m in modes},
            **{f"{m}_speedup_over_bytes": best["dense"][m] / best[plan_name][m] / ratio for m in modes},
            **({"compile_s": compile_s[plan_name]} if "compiled" in modes else {}),
        }
        rows.append(row)
        print(
            f"| {plan_name} | {sizes[plan_name] / 1e6:.1f} | {ratio:.3f} | "
            + " | ".join(f"{1000 * best[plan_name][m]:.3f}" for m in modes)
            + (f" | {compile_s[plan_name]:.0f}" if "compiled" in modes else "")
            + " | "
            + " | ".join(f"{row[f'{m}_speedup_over_bytes']:.3f}" for m in modes)
            + " |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"model": name, "device": str(device), "dtype": args.dtype, "batch": args.batch, "rows": rows}, indent=1
            )
        )
    if products:
        print(
            "\nmatrix products and the rest of a step (ms; the products from one profiled run, the rest "
            "= the fastest step less them)\n"
        )
        print("| model | mode | step | products | rest | products ideal | GEMV efficiency |")
        print("|---|---|---|---|---|---|---|")
        for plan_name in plans:
            for mode in modes:
                mm, step = products[plan_name][mode], best[plan_name][mode]
                ideal = products["dense"][mode] * sizes[plan_name] / sizes["dense"]
                print(
                    f"| {plan_name} | {mode} | {1000 * step:.1f} | {1000 * mm:.1f} | {1000 * (step - mm):.1f} | "
                    f"{1000 * ideal:.1f} | {ideal / mm:.3f} |"
                )


if __name__ == "__main__":
    main()
