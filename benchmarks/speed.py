"""Benchmark: is a compressed SmolLM2 actually faster, how good is the latency table, and does a
latency-aware search beat a parameter budget at equal measured latency? In one run.

1. The machine's memory bandwidth (a large copy) and the latency table, measured afresh into
   ``OUT/latency.json`` (its build time), never one cached by an earlier run under other load.
2. Searched ``svdllm`` allocation plans at −10 / −20 / −30 % of the parameters (protocol P1, the
   study ``studies/smollm2-budget.yaml`` with its budget replaced), the −20 % plan with its ranks
   aligned to the measured fast steps and one below them, and the best plan of a latency-budget
   study whose predicted decode step equals the −20 % plan's.
3. Every plan exported (``dse apply``, low-rank folder), then measured by ``dse speed`` in a fresh
   process each, in ``--rounds`` interleaved rounds (medians): weight bytes, decode tokens/s at
   batch 1 and 8, prefill tokens/s, time to first token, peak memory, attained bandwidth; P1 and
   held-out perplexity; decode speed-up against the weight-bytes ratio (the memory-bound ideal).
   With ``--compile`` each round also runs ``dse speed --compile`` (decode compiled over a static
   cache) beside the eager one, and the table gains its columns.
4. Predicted against measured decode latency (in process) for at least 12 plans, each measured in
   ``--rounds`` interleaved rounds and taken at its fastest, the statistic the table keeps.

    python benchmarks/speed.py [--device cpu] [--dtype float32] [--trials 24] [--rounds 3] [--compile]
                               [--reuse-plans] [--out docs/speed]

``--reuse-plans`` measures the plans an earlier run saved in ``OUT/plans`` instead of searching them
again (the latency table is still measured afresh).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from common import BENCHMARKS, ROOT

from dse.decompose import Plan, decomposed, model_fingerprint, plan_size, uniform_plan
from dse.decompose.latency import TableSpec, Workload, measure_table
from dse.evaluate import perplexity
from dse.evaluate.speed import copy_bandwidth
from dse.model import input_device
from dse.model.timing import decode, prefill, timed
from dse.results import TrialRecord
from dse.results.compressed import apply_config
from dse.results.rankconfig import RankConfig
from dse.space import Budget, parse_baseline
from dse.study.config import load_study_config
from dse.study.measure import Measurer
from dse.study.protocols import P1_HELD_OUT_PAGES, p1_windows
from dse.study.runner import run_study


def measured_step_ms(model, prompt: int = 128, steps: int = 8, repeats: int = 5) -> float:
    """Milliseconds of one batch-1 decode step of the model as it is (after a ``prompt``-token
    prefill): the fastest of ``repeats``, as the latency table measures."""
    device = input_device(model)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    timing = timed(lambda out: decode(model, out, steps), device, repeats=repeats, setup=lambda: prefill(model, ids))
    return 1000.0 * timing.low / steps


def searched(measurer, config, name: str, budget: Budget, trials: int, storage: str) -> Plan:
    """The best plan of an allocation study of ``config``'s space under ``budget``."""
    space = dataclasses.replace(config.space, budget=budget)
    study = run_study(
        dataclasses.replace(config, name=name, space=space, baselines=(), n_trials=trials),
        storage=storage,
        measurer=measurer,
        progress=False,
    )
    return Plan.from_dict(TrialRecord.of(study.best_trial).plan)


def file_stem(name: str) -> str:
    """A plan's name as a file or folder name (``params -20%`` -> ``params_-20``)."""
    return name.replace(" ", "_").replace("%", "")


def searched_plans(args, measurer, config, lt, storage: str) -> dict:
    """Dense, the parameter-budget plans, the middle one aligned and one off, and the latency-budget
    plan at the middle one's predicted decode step; each saved in ``OUT/plans``."""
    table, out = measurer.table, Path(args.out)
    plans = {"dense": Plan({}, config.method)}
    for target in args.targets:
        plans[f"params -{target:.0%}"] = searched(
            measurer, config, f"speed-params-{target:g}", Budget(params=round(1 - target, 6)), args.trials, storage
        )
    middle = f"params -{args.targets[len(args.targets) // 2]:.0%}"
    aligned = lt.faster_plan(plans[middle], table, align=True)
    plans[f"{middle} aligned"] = aligned
    plans[f"{middle} one off"] = aligned.with_ranks({n: max(1, r - 1) for n, r in aligned.ranks.items()})
    dense_ms = lt.predict(plans["dense"], table)["predicted_decode_ms"]
    share = lt.predict(plans[middle], table)["predicted_decode_ms"] / dense_ms
    plans[f"latency {share:.3f}"] = searched(
        measurer, config, f"speed-latency-{share:.4f}", Budget(latency=round(share, 4)), args.trials, storage
    )
    for name, plan in plans.items():
        plan.save(out / "plans" / f"{file_stem(name)}.json")
    return plans


SPEED_KEYS = (
    "weight_bytes",
    "decode_tokens_per_s",
    "decode_batch_tokens_per_s",
    "prefill_tokens_per_s",
    "ttft_ms",
    "host_peak_bytes",
    "attained_bandwidth",
    "device_peak_bytes",
    "compile_seconds",
)


def speed_rows(folders: dict, rounds: int, device: str, dtype: str, out: Path, modes: dict) -> pd.DataFrame:
    """``dse speed`` of every folder in a fresh process, in each of ``modes`` (column prefix -> extra
    arguments), ``rounds`` times interleaved; medians."""
    runs = {(prefix, name): [] for name in folders for prefix in modes}
    for r in range(rounds):
        for name, folder in folders.items():
            for prefix, extra in modes.items():
                path = out / f"speed-{name}-{r}.json"
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "dse.cli",
                        "speed",
                        str(folder),
                        "--device",
                        device,
                        "--dtype",
                        dtype,
                        *extra,
                        "--json",
                        str(path),
                    ],
                    check=True,
                    capture_output=True,
                )
                runs[prefix, name].append(json.loads(path.read_text())[0])
                path.unlink()
    rows = {name: {"plan": name} for name in folders}
    for (prefix, name), reports in runs.items():
        rows[name].update({prefix + key: statistics.median(rep[key] for rep in reports) for key in SPEED_KEYS})
        rows[name]["threads"], rows[name]["device"] = reports[0]["threads"], reports[0]["device"]
    return pd.DataFrame(list(rows.values()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default=str(ROOT / "studies" / "smollm2-budget.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--trials", type=int, default=24, help="trials of each allocation study (starts included)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of dse speed per plan")
    ap.add_argument("--compile", action="store_true", help="also time decode compiled (dse speed --compile)")
    ap.add_argument("--reuse-plans", action="store_true", help="measure the plans saved in OUT/plans, not new searches")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.2, 0.3], help="fractions of parameters removed")
    ap.add_argument("--benchmarks-dir", default=str(BENCHMARKS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "speed"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("speed: --device cuda asked for, but no CUDA device is available here (skipped)")
    out = Path(args.out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dse-speed-"))
    storage = f"sqlite:///{out / 'studies.db'}"

    config = dataclasses.replace(
        load_study_config(args.study),
        device=args.device,
        dtype=args.dtype,
        latency_table=TableSpec(path=str(out / "latency.json")),
    )  # trials predict latency
    measurer = Measurer.from_config(config, progress=False)
    model, table = measurer.model, measurer.table
    bandwidth = copy_bandwidth(input_device(model))
    measure_table(model, table, Workload()).save(out / "latency.json")
    lt = measurer.latency()
    print(
        f"{config.model} on {lt.environment['device']}, {lt.environment['dtype']}, {lt.environment['threads']} "
        f"threads; copy bandwidth {bandwidth / 1e9:.2f} GB/s; latency table of {len(lt.shapes)} shapes built in "
        f"{lt.seconds:.1f} s",
        flush=True,
    )

    # 2. the plans
    if args.reuse_plans:
        saved = sorted((out / "plans").glob("*.json"), key=lambda p: (p.stem != "dense", p.stem))
        if not saved or saved[0].stem != "dense":
            sys.exit(f"speed: --reuse-plans: no saved plans with a dense.json in {out / 'plans'}")
        plans = {p.stem: Plan.load(p) for p in saved}
    else:
        plans = searched_plans(args, measurer, config, lt, storage)

    # 3. quality and speed of every plan
    windows = {
        "P1": p1_windows(measurer.tokenizer, args.benchmarks_dir),
        "held-out": p1_windows(measurer.tokenizer, args.benchmarks_dir, P1_HELD_OUT_PAGES),
    }
    quality, folders = [], {}
    fingerprint = model_fingerprint(model, table)
    for name, plan in plans.items():
        row = {
            "plan": name,
            "params_ratio": plan_size(model, plan, table).params_ratio,
            "decomposed": len(plan),
            "predicted_decode_ms": lt.predict(plan, table)["predicted_decode_ms"],
        }
        with decomposed(model, plan, cache=measurer.cache, calibration=measurer.calibration, table=table):
            row.update({f"ppl {k}": perplexity(model, w) for k, w in windows.items()})
        quality.append(row)
        rank_config = RankConfig(config.model, fingerprint, args.dtype, plan, calibration=config.calibration.to_dict())
        folders[name] = apply_config(
            rank_config,
            work / file_stem(name),
            model=model,
            tokenizer=measurer.tokenizer,
            cache=measurer.cache,
            calibration=measurer.calibration,
        )
    del measurer, model
    modes = {"": [], **({"compiled ": ["--compile"]} if args.compile else {})}
    frame = pd.DataFrame(quality).merge(
        speed_rows(folders, args.rounds, args.device, args.dtype, work, modes), on="plan"
    )
    dense = frame.iloc[0]
    frame["bytes ratio"] = dense["weight_bytes"] / frame["weight_bytes"]
    for prefix in modes:
        frame[prefix + "decode speed-up"] = (
            frame[prefix + "decode_tokens_per_s"] / dense[prefix + "decode_tokens_per_s"]
        )
        frame[prefix + "speed-up / bytes ratio"] = frame[prefix + "decode speed-up"] / frame["bytes ratio"]
        frame[prefix + "bandwidth share"] = frame[prefix + "attained_bandwidth"] / bandwidth
    frame.to_csv(out / "results.csv", index=False)
    print(
        "\n| plan | params | weight MB | decode tok/s b1 | b8 | prefill tok/s | TTFT ms | peak MB | PPL P1 | "
        "held-out | speed-up | bytes ratio | speed-up/bytes | GB/s (share) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for _, r in frame.iterrows():
        print(
            f"| {r['plan']} | {r['params_ratio']:.3f} | {r['weight_bytes'] / 1e6:.1f} | "
            f"{r['decode_tokens_per_s']:.2f} | "
            f"{r['decode_batch_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | {r['ttft_ms']:.0f} | "
            f"{r['host_peak_bytes'] / 1e6:.0f} | {r['ppl P1']:.2f} | {r['ppl held-out']:.2f} | "
            f"{r['decode speed-up']:.3f} | {r['bytes ratio']:.3f} | {r['speed-up / bytes ratio']:.3f} | "
            f"{r['attained_bandwidth'] / 1e9:.2f} ({r['bandwidth share']:.0%}) |"
        )
    if args.compile:
        print("\ndecode compiled over a static cache (dse speed --compile):\n")
        print("| plan | bytes ratio | decode tok/s b1 | b8 | compile s | speed-up | speed-up/bytes | GB/s (share) |")
        print("|---|---|---|---|---|---|---|---|")
        for _, r in frame.iterrows():
            print(
                f"| {r['plan']} | {r['bytes ratio']:.3f} | {r['compiled decode_tokens_per_s']:.2f} | "
                f"{r['compiled decode_batch_tokens_per_s']:.1f} | {r['compiled compile_seconds']:.0f} | "
                f"{r['compiled decode speed-up']:.3f} | {r['compiled speed-up / bytes ratio']:.3f} | "
                f"{r['compiled attained_bandwidth'] / 1e9:.2f} ({r['compiled bandwidth share']:.0%}) |"
            )
    predicted_vs_measured(args, config, out)


def predicted_vs_measured(args, config, out: Path) -> None:
    """Predicted against measured decode step for the saved plans and more, in one process."""
    measurer = Measurer.from_config(config, progress=False)
    model, table, lt = measurer.model, measurer.table, measurer.latency()
    plans = {p.stem: Plan.load(p) for p in sorted((out / "plans").glob("*.json"))}
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5):
        plans[f"uniform ratio {ratio:g}"] = uniform_plan(table, ratio=ratio, method=config.method)
    plans["3 layers at rank 1"] = parse_baseline({"layers": 3, "rank": 1}, "layers").plan(table, config.method)
    plans["MLPs at rank 64"] = uniform_plan(table, 64, method=config.method, types={"gate", "up", "down"})
    plans["attention at rank 32"] = uniform_plan(table, 32, method=config.method, types={"q", "k", "v", "o"})
    measured = {name: [] for name in plans}
    for _ in range(args.rounds):
        for name, plan in plans.items():
            with decomposed(model, plan, cache=measurer.cache, calibration=measurer.calibration, table=table):
                measured[name].append(measured_step_ms(model))
    rows = []
    for name, plan in plans.items():
        predicted = lt.predict(plan, table)["predicted_decode_ms"]
        rows.append(
            {
                "plan": name,
                "predicted_ms": predicted,
                "measured_ms": min(measured[name]),
                "spread": max(measured[name]) / min(measured[name]),
                "error": predicted / min(measured[name]) - 1,
            }
        )
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "predicted.csv", index=False)
    print(
        f"\npredicted vs measured decode step, {len(frame)} plans: median absolute error "
        f"{frame['error'].abs().median():.1%} (max {frame['error'].abs().max():.1%})"
    )
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
