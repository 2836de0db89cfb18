"""Benchmark: does the search beat simple choices? (issue 8), all measured in one run.

1. ``dse characterize`` of the study's model at rank 1 (each module on perplexity, each layer and
   k-layer patterns on accuracy and perplexity), resumed from ``OUT/characterization.csv``.
2. At each target size (default −10 % and −20 % of the whole model's parameters), three plans
   with the study's method: ``uniform`` (every projection loses the same share, SVD-LLM's rule,
   sized to the target), ``sensitivity`` (modules at rank 1 in order of least perplexity cost per
   removed parameter, from the characterization) and ``layers`` (the seed thesis' form: N whole
   layers at rank 1, spread over the inner layers).
3. The free-rank study (``--study``) with TPE (``--trials``) and with random sampling
   (``--random-trials``), both with its multi-fidelity rule: hypervolume (accuracy x params,
   reference accuracy 0 and params 100 %) after 100 TPE trials and after 100 and 200 random
   trials, and its most accurate completed trial at or under each target size.
4. The fixed-size search (``--budget-study``, an allocation space): one study per target whose
   every plan keeps ``1 - target`` of the parameters (``--budget-trials`` TPE trials, selected on
   its objective, perplexity); its best trial is "the searched plan" at that size.
5. The share of evaluation time multi-fidelity saved: for each pruned trial, a full evaluation's
   mean seconds minus what it spent, over what all trials would have cost in full.
6. Confirmation: every plan of step 2 and 4, and the undecomposed model, measured again on six
   lm-eval tasks (``--confirm-tasks``, first ``--confirm-limit`` rows each: the seed thesis'
   unit, mean accuracy over six benchmarks) and on held-out WikiText-2 pages (``--confirm-pages``),
   resumed from ``OUT/confirm.csv``.

Writes ``OUT/characterization.csv`` and its plots, ``OUT/results.csv``, ``OUT/front.{png,svg}`` and
``OUT/plans-smallest.{png,svg}`` (the plans compared at the smallest target).

    python benchmarks/search_vs_baselines.py [--device cuda] [--trials 100] [--random-trials 200]
        [--budget-trials 24] [--out docs/search]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import optuna
import pandas as pd
from common import ROOT
from optuna.trial import TrialState

from dse.decompose import Plan, uniform_plan
from dse.model import n_layers as count_layers
from dse.results import TrialRecord
from dse.results.front import hypervolume_history
from dse.space import PROBE_KINDS, Budget, parse_baseline, sensitivity_plan
from dse.study.characterize import run_characterization
from dse.study.config import load_study_config
from dse.study.measure import Measurer
from dse.study.runner import run_study
from dse.study.samplers import SamplerConfig

CONFIRM_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "winogrande")


def searched(study: optuna.Study, max_ratio: float):
    """The most accurate completed trial at or under ``max_ratio`` of the parameters."""
    fits = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if TrialRecord.of(t)["params_ratio"] <= max_ratio + 1e-12
    ]
    return max(fits, key=lambda t: TrialRecord.of(t)["accuracy"]) if fits else None


def describe(plan: Plan, table) -> str:
    """Which layers a plan decomposes and how: ``L3:1`` (every type at rank 1), ``L5:29-58`` (every
    type, ranks from 29 to 58), ``L4:2mod`` (2 of its modules)."""
    layers = {}
    for name, rank in plan.ranks.items():
        layers.setdefault(table[name].layer, []).append(rank)
    per_layer = sum(1 for p in table.values() if p.layer == 0)
    parts = []
    for layer, ranks in sorted(layers.items()):
        if len(ranks) == per_layer:
            low, high = min(ranks), max(ranks)
            parts.append(f"L{layer}:{low}" if low == high else f"L{layer}:{low}-{high}")
        else:
            parts.append(f"L{layer}:{len(ranks)}mod")
    return " ".join(parts)


def time_saved(study: optuna.Study) -> tuple:
    """(share of evaluation time saved, pruned trials, trials) by multi-fidelity in ``study``."""
    records = [(t, TrialRecord.of(t)) for t in study.trials]
    done = [
        r for t, r in records if t.state == TrialState.COMPLETE and r.get("n_modules") and r.duplicate_of is None
    ]  # dense and repeated plans were not evaluated
    pruned = [r for t, r in records if t.state == TrialState.PRUNED]
    full = statistics.fmean(r["eval_seconds"] for r in done)
    spent = sum(r["eval_seconds"] for r in done + pruned)
    saved = sum(max(full - r["eval_seconds"], 0.0) for r in pruned)
    return saved / (spent + saved), len(pruned), len(done) + len(pruned)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default=str(ROOT / "studies" / "smollm2-search.yaml"))
    ap.add_argument("--device", help="override the study's device (e.g. cuda)")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--random-trials", type=int, default=200)
    ap.add_argument(
        "--budget-study",
        default=str(ROOT / "studies" / "smollm2-search-budget.yaml"),
        help="a study over an allocation space; its budget is replaced by each target",
    )
    ap.add_argument("--budget-trials", type=int, default=24)
    ap.add_argument(
        "--targets",
        nargs="+",
        type=float,
        default=[0.08, 0.10, 0.20],
        help="whole-model shares removed (0.08: the thesis' 3 layers at rank 1)",
    )
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--confirm-tasks", nargs="+", default=list(CONFIRM_TASKS))
    ap.add_argument("--confirm-limit", type=int, default=100)
    ap.add_argument(
        "--confirm-pages",
        nargs=2,
        type=int,
        default=[6, 12],
        help="WikiText-2 pages [start, stop) for held-out perplexity (the search used 0-5)",
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "search"))
    ap.add_argument(
        "--storage",
        help="study storage URL (default: OUT/studies.db); journal:///FILE lets other "
        "processes run the same studies alongside",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config = load_study_config(args.study)
    config = dataclasses.replace(
        config,
        device=args.device or config.device,
        storage=args.storage or f"sqlite:///{(out / 'studies.db').resolve()}",
    )
    t0 = time.perf_counter()
    measurer = Measurer.from_config(config, progress=False)
    table, total = measurer.table, measurer.model_params
    dense_proj = sum(p.dense_params for p in table.values())
    print(
        f"{config.model}: {total} parameters, {len(table)} projections, method {config.method}, "
        f"tasks {', '.join(config.evaluation.tasks)} (limit {config.evaluation.limit}), device {config.device}"
    )

    # 1. characterization
    start = time.perf_counter()
    frame = run_characterization(
        config,
        out,
        rank=1,
        kinds=list(PROBE_KINDS),
        ks=args.ks,
        modules_by_perplexity=True,
        measurer=measurer,
        progress=False,
    )
    base = frame[frame["kind"] == "dense"].iloc[0]
    print(
        f"characterization: {len(frame)} rows in {time.perf_counter() - start:.0f} s; dense accuracy "
        f"{base['accuracy']:.4f}, perplexity {base['perplexity']:.2f}"
    )

    # 3. the searches
    start = time.perf_counter()
    tpe = run_study(
        dataclasses.replace(config, name="search-tpe", n_trials=args.trials), measurer=measurer, progress=False
    )
    tpe_s = time.perf_counter() - start
    start = time.perf_counter()
    rnd = run_study(
        dataclasses.replace(config, name="search-random", sampler=SamplerConfig("random"), n_trials=args.random_trials),
        measurer=measurer,
        progress=False,
    )
    rnd_s = time.perf_counter() - start
    fixed, fixed_s, fixed_measurer = _fixed_size_searches(args, out, config.storage)

    # 2. baselines at each target, and the searched plans
    rows = []
    for target in args.targets:
        n_layers = max(1, round(target * total / (dense_proj / count_layers(table))))
        plans = {
            "uniform": uniform_plan(table, ratio=target * total / dense_proj, method=config.method),
            "sensitivity": sensitivity_plan(
                frame, table, target, model_params=total, rank=1, method=config.method, metric="log_perplexity_ratio"
            ),
            f"layers ({n_layers} at rank 1)": parse_baseline({"layers": n_layers, "rank": 1}, "layers").plan(
                table, config.method
            ),
        }
        for name, plan in plans.items():
            m = measurer.measure(plan)
            rows.append(
                {
                    "target": target,
                    "plan": name,
                    "params_ratio": m["params_ratio"],
                    "accuracy": m["accuracy"],
                    "perplexity": m["perplexity"],
                    "trial": None,
                    "detail": describe(plan, table),
                    "ranks": json.dumps(plan.to_dict()),
                }
            )
        found = [
            ("free-rank TPE", searched(tpe, 1 - target)),
            ("free-rank random", searched(rnd, 1 - target)),
            ("fixed-size search", fixed[target].best_trial),
        ]
        for name, best in found:
            if best is not None:
                a = TrialRecord.of(best)
                rows.append(
                    {
                        "target": target,
                        "plan": name,
                        "params_ratio": a["params_ratio"],
                        "accuracy": a["accuracy"],
                        "perplexity": a["perplexity"],
                        "trial": best.number,
                        "detail": describe(Plan.from_dict(a.plan), table),
                        "ranks": json.dumps(a.plan),
                    }
                )
    dense = Plan({}, config.method)
    rows.insert(
        0,
        {
            "target": 0.0,
            "plan": "undecomposed",
            "params_ratio": 1.0,
            "accuracy": base["accuracy"],
            "perplexity": base["perplexity"],
            "trial": None,
            "detail": "",
            "ranks": json.dumps(dense.to_dict()),
        },
    )
    results = pd.DataFrame(rows)
    start = time.perf_counter()
    results = _confirm(results, measurer, fixed_measurer.calibration, args, out)
    confirm_s = time.perf_counter() - start
    results.to_csv(out / "results.csv", index=False)

    hv_tpe = hypervolume_history(tpe)["hypervolume"]
    hv_rnd = hypervolume_history(rnd)["hypervolume"]
    n = min(100, len(hv_rnd))
    print(
        f"\nfree-rank search: TPE {len(tpe.trials)} trials in {tpe_s / 60:.1f} min, random {len(rnd.trials)} in "
        f"{rnd_s / 60:.1f} min; fixed-size search: {sum(len(f.trials) for f in fixed.values())} trials at "
        f"{len(fixed)} sizes in {fixed_s / 60:.1f} min"
    )
    print(
        f"hypervolume: TPE after {len(hv_tpe)} trials {hv_tpe.iloc[-1]:.4f}; random after {n} "
        f"{hv_rnd.iloc[n - 1]:.4f}, after {len(hv_rnd)} {hv_rnd.iloc[-1]:.4f}"
    )
    for name, study in (("TPE", tpe), ("random", rnd)):
        share, pruned, trials = time_saved(study)
        print(f"multi-fidelity ({name}): {pruned} of {trials} trials pruned, {share:.1%} of evaluation time saved")
    print(
        f"confirmation on {len(args.confirm_tasks)} tasks (limit {args.confirm_limit}) and held-out "
        f"WikiText-2 pages {args.confirm_pages[0]}-{args.confirm_pages[1] - 1}: {confirm_s / 60:.1f} min"
    )
    print(
        "\n| target | plan | params kept | search: accuracy | search: PPL | confirmation: accuracy | "
        "held-out PPL | layers decomposed (rank) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results.itertuples():
        detail = r.detail if len(r.detail) < 60 else f"{len(r.detail.split())} layers"
        confirm = "" if pd.isna(r.confirm_accuracy) else f"{r.confirm_accuracy:.4f} | {r.confirm_perplexity:.4g}"
        print(
            f"| -{r.target:.0%} | {r.plan} | {r.params_ratio:.1%} | {r.accuracy:.4f} | {r.perplexity:.4g} | "
            f"{confirm or ' | '} | {detail} |"
        )
    _plot(tpe, rnd, results, base, out)
    _plot_plans(results[results["target"] == min(args.targets)], table, out)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def _fixed_size_searches(args, out: Path, storage: str) -> tuple:
    """One allocation study per target size (``--budget-study`` with its budget replaced), and the
    seconds they took; the model is loaded once more, with the calibration they need."""
    config = load_study_config(args.budget_study)
    config = dataclasses.replace(
        config, device=args.device or config.device, storage=storage, baselines=(), n_trials=args.budget_trials
    )
    start = time.perf_counter()
    measurer = Measurer.from_config(config, progress=False)
    studies = {}
    for target in args.targets:
        space = dataclasses.replace(config.space, budget=Budget(params=round(1 - target, 6)))
        studies[target] = run_study(
            dataclasses.replace(config, space=space, name=f"search-size-{target:g}"), measurer=measurer, progress=False
        )
    return studies, time.perf_counter() - start, measurer


def _confirm(results: pd.DataFrame, measurer: Measurer, calibration, args, out: Path) -> pd.DataFrame:
    """Every plan but the free-rank ones, measured again on ``--confirm-tasks`` (first
    ``--confirm-limit`` rows each) and on held-out perplexity pages (``--confirm-pages``, 4096
    tokens): columns ``confirm_accuracy``, ``confirm_perplexity`` and ``confirm_acc/<task>``.
    Each plan's result is appended to ``OUT/confirm.csv`` as soon as it is measured, and reused."""
    from dse.evaluate import Evaluator

    config = measurer.config
    ppl = config.evaluation.perplexity
    evaluation = dataclasses.replace(
        config.evaluation,
        tasks=list(args.confirm_tasks),
        limit=args.confirm_limit,
        perplexity=dataclasses.replace(
            ppl, text=dataclasses.replace(ppl.text, rows=tuple(args.confirm_pages)), max_tokens=4096
        ),
    )
    spec = json.dumps([evaluation.tasks, evaluation.limit, list(args.confirm_pages)])
    path = out / "confirm.csv"
    done = {r.pop("key"): r for r in pd.read_csv(path).to_dict("records")} if path.is_file() else {}
    confirm = Measurer(
        dataclasses.replace(config, evaluation=evaluation),
        measurer.model,
        measurer.tokenizer,
        Evaluator(measurer.model, measurer.tokenizer, evaluation),
        cache=measurer.cache,
        calibration=calibration,
        progress=False,
    )
    measured = {}
    for r in results.itertuples():
        if r.plan.startswith("free-rank"):
            continue
        key = spec + r.ranks
        if key in done:
            measured[r.Index] = done[key]
            continue
        m = confirm.measure(Plan.from_dict(json.loads(r.ranks)))
        measured[r.Index] = {
            "confirm_accuracy": m["accuracy"],
            "confirm_perplexity": m["perplexity"],
            **{f"confirm_{k}": v for k, v in m.items() if k.startswith("acc/")},
        }
        row = pd.DataFrame([{"key": key, **measured[r.Index]}])
        row.to_csv(path, mode="a", header=not path.is_file(), index=False)
    return results.join(pd.DataFrame.from_dict(measured, orient="index"))


def _plot(tpe, rnd, results, base, out: Path) -> None:
    from matplotlib.figure import Figure

    from dse.results.front import front_trials
    from dse.results.plots import save_figure

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    axes = fig.subplots(1, 2)
    markers = {"uniform": "s", "sensitivity": "^", "fixed-size search": "*"}
    simple = results[~results["plan"].str.startswith("free-rank") & (results["plan"] != "undecomposed")]
    for ax, metric, label in (
        (axes[0], "accuracy", "mean accuracy (piqa, arc_easy)"),
        (axes[1], "perplexity", "WikiText-2 perplexity (log scale)"),
    ):
        for study, color, name in ((rnd, "0.6", "free-rank random"), (tpe, "C0", "free-rank TPE")):
            done = [TrialRecord.of(t) for t in study.trials if t.state == TrialState.COMPLETE]
            ax.plot(
                [100 * r["params_ratio"] for r in done],
                [r[metric] for r in done],
                ".",
                color=color,
                alpha=0.5,
                label=f"{name} trials ({len(done)} complete)",
            )
            if metric == "accuracy":
                front = sorted((TrialRecord.of(t) for t in front_trials(study)), key=lambda r: r["params_ratio"])
                ax.plot(
                    [100 * r["params_ratio"] for r in front],
                    [r["accuracy"] for r in front],
                    "-",
                    color=color,
                    lw=2,
                    label=f"{name} front",
                )
        for i, (name, rows) in enumerate(simple.groupby("plan", sort=False)):
            ax.plot(
                100 * rows["params_ratio"],
                rows[metric],
                markers.get(name, "D"),
                color=f"C{i + 1}",
                ms=12 if name == "fixed-size search" else 8,
                label=name,
            )
        ax.axhline(base[metric], color="k", ls="--", lw=1, label="undecomposed")
        ax.set_xlabel("parameters kept (% of the undecomposed model)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[1].set_xlim(70, 101)
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper right")  # an empty corner
    fig.suptitle("Search against uniform, sensitivity-guided and hand-picked plans")
    save_figure(fig, out / "front")


def _plot_plans(rows: pd.DataFrame, table, out: Path) -> None:
    """The plans of ``rows`` (one target) but uniform and the free-rank ones, side by side
    (``plans-smallest.{png,svg}``)."""
    from dse.results.plots import plot_plans, save_figure

    shown = rows[(rows["plan"] != "uniform") & ~rows["plan"].str.startswith("free-rank")]
    titled = {
        f"{r.plan}: {r.params_ratio:.1%} kept\naccuracy {r.accuracy:.4f}, PPL {r.perplexity:.4g}": Plan.from_dict(
            json.loads(r.ranks)
        )
        for r in shown.itertuples()
    }
    save_figure(plot_plans(titled, table)[0].figure, out / "plans-smallest", dpi=110)


if __name__ == "__main__":
    main()
