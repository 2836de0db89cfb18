"""Benchmark: calibration at once (before) against streamed layer by layer (after), on SmolLM2-135M
with protocol P1 and the svdllm options of ``studies/smollm2-budget.yaml``, in one run.

Each variant runs in a fresh process (``--repeats`` times, medians reported): load the model,
calibrate on P1's 32 windows of 256 tokens and factorize all 210 projections (streamed: inside
the layer loop, from the float64 statistics before they are released), then measure P1
perplexity at SVD-LLM's uniform cuts. The seconds come from one more process that runs both
variants alternately (the same machine load for both; shared machines vary 2-5x). Printed: the
memory the statistics hold at their peak
(counted from the live tensors, the model not counted; streamed: one layer's statistics and two
copies of its cached inputs), the process's peak resident memory (``VmHWM``: model, statistics,
factor cache, everything) and its rise over the loaded model, the statistics on disk (before:
float64 matrices in one file as the previous version wrote them; after: the float32 store), the
calibration + factorization seconds, and the P1 perplexities, also with factors computed again
from the float32 store (what a restarted study gets). Targets: statistics peak <= 1/4, disk <= 1/2,
perplexities within 0.1 %.

    python benchmarks/streamed_calibration.py [--repeats 3] [--ratios 0.1 0.2 0.4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import BENCHMARKS, ROOT
from measure import child, mb, reset_peak, vm

REFERENCE = {0.1: 74.94, 0.2: 116.44, 0.4: 322.82}  # uniform svdllm, P1, before this change (README)


def _setup(benchmarks_dir: str):
    from dse.model import find_projections, load_model
    from dse.study.config import load_study_config
    from dse.study.protocols import p1_calibration

    method = load_study_config(ROOT / "studies" / "smollm2-budget.yaml").method
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer, find_projections(model), method, p1_calibration(benchmarks_dir)


def _calibrate_and_factorize(model, tokenizer, table, method, spec):
    """``(calibration, factor cache)``: calibration, then every projection factorized (streamed:
    each layer inside the loop, from its float64 statistics)."""
    from dse.decompose import FactorCache, calibrate, factor_forms

    cache = FactorCache()
    if spec.streamed:
        calibration = calibrate(
            model,
            tokenizer,
            spec,
            progress=False,
            on_layer=lambda names, cal: factor_forms(model, names, method, cache=cache, calibration=cal),
        )
    else:
        calibration = calibrate(model, tokenizer, spec, progress=False)
        factor_forms(model, table, method, cache=cache, calibration=calibration)
    return calibration, cache


def timings(repeats: int, benchmarks_dir: str) -> dict:
    """Seconds of each variant, alternating in one process (the same machine load for both)."""
    import dataclasses

    from dse.decompose import FactorCache, factor_forms

    model, tokenizer, table, method, spec = _setup(benchmarks_dir)
    out = {"at_once": [], "streamed": [], "from_store": []}
    for _ in range(repeats):
        for variant in ("at_once", "streamed"):
            start = time.perf_counter()
            calibration, _ = _calibrate_and_factorize(
                model, tokenizer, table, method, dataclasses.replace(spec, streamed=variant == "streamed")
            )
            out[variant].append(time.perf_counter() - start)
        start = time.perf_counter()  # the factors again from the float32 store, as after a restart
        factor_forms(model, table, method, cache=FactorCache(), calibration=calibration)
        out["from_store"].append(time.perf_counter() - start)
    return out


def measure(variant: str, ratios, benchmarks_dir: str) -> dict:
    import dataclasses

    import torch

    from dse.decompose import FactorCache, decomposed, uniform_plan
    from dse.evaluate import perplexity
    from dse.study.protocols import p1_windows

    model, tokenizer, table, method, spec = _setup(benchmarks_dir)
    windows = p1_windows(tokenizer, benchmarks_dir)
    spec = dataclasses.replace(spec, streamed=variant == "streamed")
    loaded = vm("VmRSS")
    reset_peak()
    calibration, cache = _calibrate_and_factorize(model, tokenizer, table, method, spec)
    out = {"stats_peak": calibration.peak_bytes, "process_peak": vm("VmHWM"), "process_rise": vm("VmHWM") - loaded}
    if spec.streamed:
        out["disk"] = calibration.store.nbytes()
    else:
        with tempfile.TemporaryDirectory() as tmp:  # the previous version's file: float64, one file
            old = {
                "format": 1,
                "key": calibration.key,
                "aliases": calibration.aliases,
                "grads": {},
                "stats": {
                    n: {"abs_mean": s.abs_mean, "xtx": s.xtx, "tokens": s.tokens} for n, s in calibration.stats.items()
                },
            }
            torch.save(old, Path(tmp) / "calibration.pt")
            out["disk"] = (Path(tmp) / "calibration.pt").stat().st_size
            out["disk_float32_store"] = calibration.save(Path(tmp) / "store").nbytes()

    def p1(forms_cache, cal):
        values = []
        for ratio in ratios:
            with decomposed(model, uniform_plan(table, ratio=ratio, method=method), cache=forms_cache, calibration=cal):
                values.append(perplexity(model, windows))
        return values

    out["p1"] = p1(cache, calibration)
    if spec.streamed:  # factors computed again from the float32 statistics on disk
        out["p1_from_store"] = p1(FactorCache(), calibration)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    ap.add_argument("--benchmarks-dir", default=str(BENCHMARKS))
    ap.add_argument("--child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "timings":
        print(json.dumps(timings(args.repeats, args.benchmarks_dir)))
        return
    if args.child:
        print(json.dumps(measure(args.child, args.ratios, args.benchmarks_dir)))
        return
    runs = {v: [] for v in ("at_once", "streamed")}
    for _ in range(args.repeats):  # alternate, so that machine load falls on both alike
        for variant in runs:
            runs[variant].append(
                child(__file__, variant, "--ratios", *map(str, args.ratios), "--benchmarks-dir", args.benchmarks_dir)
            )
    med = {
        v: {k: statistics.median(r[k] for r in rs) for k in ("stats_peak", "process_peak", "process_rise", "disk")}
        for v, rs in runs.items()
    }
    seconds = child(__file__, "timings", "--repeats", str(args.repeats), "--benchmarks-dir", args.benchmarks_dir)
    for variant in runs:
        med[variant]["seconds"] = statistics.median(seconds[variant])
    before, after = med["at_once"], med["streamed"]
    print(
        f"SmolLM2-135M, P1 calibration (32 x 256 tokens), svdllm; memory: medians of {args.repeats} fresh "
        f"processes each; seconds: median of {args.repeats} alternating runs in one process\n"
    )
    print("| | at once (before) | streamed (after) | after / before |")
    print("|---|---|---|---|")
    for key, label in (
        ("stats_peak", "statistics peak in memory (model not counted)"),
        ("process_peak", "process peak resident memory"),
        ("process_rise", "process peak over the loaded model"),
        ("disk", "statistics on disk"),
        ("seconds", "calibration + factorization of 210 (s)"),
    ):
        show = (lambda v: f"{v:.1f}") if key == "seconds" else mb
        print(f"| {label} | {show(before[key])} | {show(after[key])} | {after[key] / before[key]:.3f} |")
    print(
        "\nseconds, every run: "
        + "; ".join(f"{v}: {', '.join(f'{x:.1f}' for x in xs)}" for v, xs in seconds.items())
        + " (from_store: factorizing all 210 again from the float32 statistics, without calibrating)"
    )
    print(f"\nbefore, stored as the float32 store instead: {mb(runs['at_once'][0]['disk_float32_store'])}")
    print("\nP1 perplexity, uniform svdllm (reference: before this change, README)")
    print("| R | reference | at once | streamed | streamed, factors from the float32 store | worst difference |")
    print("|---|---|---|---|---|---|")
    first, second = runs["at_once"][0], runs["streamed"][0]
    for i, ratio in enumerate(args.ratios):
        values = [first["p1"][i], second["p1"][i], second["p1_from_store"][i]]
        ref = REFERENCE.get(ratio, first["p1"][i])
        worst = max(abs(v / ref - 1) for v in values)
        print(
            f"| {ratio:g} | {REFERENCE.get(ratio, '-')} | "
            + " | ".join(f"{v:.2f}" for v in values)
            + f" | {100 * worst:.3f} % |"
        )


if __name__ == "__main__":
    main()
