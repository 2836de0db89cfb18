"""Benchmark: LEMS + KFAC-SVD's own code (Thoma et al., ICML 2026; issue 30) on SmolLM2-135M under P1.

The code of a LEMS checkout (``--lems PATH``; imported from there, nothing of it is copied) runs
on P1's data: KFAC-SVD's statistics and factorization on P1's calibration windows (``--samples``
of 256 tokens, seed 3, pages 40–61), then LEMS's search (its configs/search/lems.yaml: sensitivity
probes at 0.1, ILP, 10 Optuna trials over its depth bias) on a search set of ``--search N LEN``
windows from the same pages (seed 1003, LEMS's ``seed + 1000``). Each plan is applied with LEMS's
own factors and low-rank modules, and measured with P1's perplexity (pages 0–5; held-out 6–11).

``R`` is dse's: the fraction of each projection's parameters removed under SVD-LLM's uniform rule
(``dse.decompose.uniform_plan``). "KFAC-SVD uniform" is KFAC-SVD at those ranks. LEMS's ILP budget
is ``ratio · Σ m·n``, above the uniform plan's kept parameters (its per-module ranks are rounded
down); budget ``uniform`` (default) gives it the uniform plan's kept parameters as its target,
``nominal`` its own ``1 − R``. The parameters LEMS's compressed model keeps are counted on it, and
a ``uniform`` plan above the uniform plan's is an error.

What had to change in LEMS to run offline on one CPU (monkeypatched here, see ``cpu_patches``):
  * ``torch.cuda.current_device()`` returns ``"cpu"`` (LEMS puts everything on
    ``torch.device(torch.cuda.current_device())``); ``torch.cuda.device`` is a null context;
    ``torch.cuda.synchronize`` and ``empty_cache`` do nothing;
  * ``Tensor.pin_memory`` returns the tensor (LEMS pins its search set and reference logits);
  * the data: P1's windows in LEMS's batch format (one ``{"input_ids", "attention_mask"}`` window
    a batch) instead of its loaders, which download WikiText-2's train split.
Options only: KFAC-SVD ``fast=True`` (its on-device accumulation of the same sums; the default
mode double-buffers through pinned CUDA memory), ILP solver ``cbc`` (Gurobi needs a licence;
``pulp`` and ``gurobipy`` must be installed, the latter is only imported), ranks in multiples of
16 (``--multiple``; issue 30's run, LEMS's config says 8), ``do_post_calibration False`` (its
``kfac_lems`` preset). LEMS's KL skips the first 256 positions of each search window and walks the
set in chunks of ``N // 8`` windows: the search set needs ``N ≥ 8`` windows of ``LEN > 256``.

    python benchmarks/lems_own.py --lems ../lems [--ratios 0.2 0.1 0.4] [--search 8 320] [--cache DIR]

Writes ``docs/vs_lems/lems.csv`` and LEMS's ranks as dse plans (``twosided``),
``docs/vs_lems/lems/R{ratio}.json`` (``R{ratio}-nominal.json`` for the nominal budget).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import sys
import time
from pathlib import Path

import torch
import yaml
from common import BENCHMARKS, ROOT

from dse.decompose import CalibrationSpec, Plan, uniform_plan
from dse.evaluate import perplexity
from dse.model import find_projections, load_model
from dse.study.protocols import P1_CALIBRATION_PAGES, P1_HELD_OUT_PAGES, p1_calibration, p1_windows, wikitext_pages

OUT = ROOT / "docs" / "vs_lems"


def cpu_patches() -> None:
    """Let LEMS's CUDA-only calls run on the CPU (listed in the module docstring)."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.device = lambda *_: contextlib.nullcontext()
    torch.cuda.synchronize = torch.cuda.empty_cache = lambda *_, **__: None
    torch.Tensor.pin_memory = lambda self, *_, **__: self


def batches(windows: torch.Tensor) -> list:
    """Token windows as LEMS's data loaders yield them: one window a batch."""
    return [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows]


def kept(model, table) -> int:
    """Weights the projections of ``model`` keep: both factors of LEMS's low-rank modules, else dense."""
    mods = [model.get_submodule(n) for n in table]
    return sum(
        m.mod_a.weight.numel() + m.mod_b.weight.numel() if hasattr(m, "mod_a") else m.weight.numel() for m in mods
    )


def lems_perplexities(lrd, model, ranks, windows, table, name_omit):
    """P1 perplexities and kept weights of a copy of ``model`` compressed by LEMS's own
    ``factorize_model`` (``ranks``: LEMS's per-module ratios, or integer ranks)."""
    compressed = copy.deepcopy(model)
    lrd.factorize_model(compressed, ranks, name_omit, verbose=False)
    ppl = {k: perplexity(compressed, w) for k, w in windows.items()}
    return ppl, kept(compressed, table)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lems", required=True, help="a LEMS checkout (github lems-svd/lems)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.1, 0.4])
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens (P1: 32)")
    ap.add_argument("--search", nargs=2, type=int, default=[8, 320], metavar=("N", "LEN"), help="search windows")
    ap.add_argument("--multiple", type=int, default=16, help="LEMS's enforce_rank_multiples_of")
    ap.add_argument("--budgets", nargs="+", choices=["uniform", "nominal"], default=["uniform"])
    ap.add_argument("--cache", help="LEMS's own cache of factors and sensitivities (off without it)")
    ap.add_argument("--benchmarks-dir", default=str(BENCHMARKS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    lems = Path(args.lems).resolve()
    sys.path.insert(0, str(lems))
    cpu_patches()
    from compression.factorization.kfac_svd import KFAC_SVDFactorization
    from compression.search.lems import LEMSSearch, get_eq_rank

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    table = find_projections(model)
    bdir = args.benchmarks_dir
    windows = {"P1": p1_windows(tokenizer, bdir), "held-out": p1_windows(tokenizer, bdir, P1_HELD_OUT_PAGES)}
    calib = dataclasses.replace(p1_calibration(bdir), n_samples=args.samples).windows(tokenizer)
    n, length = args.search
    search_windows = CalibrationSpec(wikitext_pages(bdir, P1_CALIBRATION_PAGES), n, length, seed=1003).windows(
        tokenizer
    )
    dense = {k: perplexity(model, w) for k, w in windows.items()}
    print(
        f"dense P1 {dense['P1']:.2f}, held-out {dense['held-out']:.2f} "
        f"(load and windows {time.perf_counter() - start:.0f} s)"
    )

    name_omit = yaml.safe_load((lems / "configs" / "config.yaml").read_text())["name_omit"]
    search_cfg = yaml.safe_load((lems / "configs" / "search" / "lems.yaml").read_text())
    search_cfg.pop("method")
    search_cfg.update(solver="cbc", enforce_rank_multiples_of=args.multiple)
    cache = {"use_cache": bool(args.cache), "workspace_dir": args.cache or "/nonexistent"}
    key = f"P1-{args.samples}x256"  # names LEMS's cache files: its factors ...
    lrd = KFAC_SVDFactorization(
        vision=False, fast=True, truncate=True, do_post_calibration="False", calib_dataset_name=key, **cache
    )
    search = LEMSSearch(
        eval_data=batches(search_windows),
        mixup_fn=None,
        name_omit=name_omit,
        sequence_length=length,
        **search_cfg,
        **cache,
    )

    decomposition = Path(args.cache or "/nonexistent") / "cache" / "decomposition"
    cached = any(decomposition.glob(f"*_{lrd.get_cache_name()}.pkl"))  # then statistics_s is a load time
    t0 = time.perf_counter()
    lrd.factorization_computations(model=model, name_omit=name_omit, calib_data=batches(calib), mixup_fn=None)
    model.eval().requires_grad_(False)
    stats_s = time.perf_counter() - t0
    lrd.calib_dataset_name = f"{key}-search{n}x{length}"  # ... and its sensitivities
    t0 = time.perf_counter()
    search.initialize_search(lrd, model)  # LEMS's sensitivity of every projection (shared by all ratios)
    sens_s = time.perf_counter() - t0
    print(f"KFAC-SVD statistics and factors {stats_s:.0f} s, LEMS sensitivities {sens_s:.0f} s", flush=True)

    dense_total = sum(p.dense_params for p in table.values())
    rows, out = [], Path(args.out)
    (out / "lems").mkdir(parents=True, exist_ok=True)
    for ratio in args.ratios:
        uniform = uniform_plan(table, ratio=ratio, method="twosided")
        cap = uniform.kept_params(table)
        base, base_kept = lems_perplexities(lrd, model, uniform.ranks, windows, table, name_omit)
        assert base_kept == cap, (base_kept, cap)
        for budget in args.budgets:
            search.ratio_target = cap / dense_total if budget == "uniform" else 1 - ratio
            t0 = time.perf_counter()
            found = search.search(model)  # {module: kept ratio of its equivalent rank, 1.0 = dense}
            search_s = time.perf_counter() - t0
            ppl, lems_kept = lems_perplexities(lrd, model, found, windows, table, name_omit)
            ranks = {
                k: int(get_eq_rank(table[k].out_features, table[k].in_features) * v)
                for k, v in found.items()
                if v != 1.0
            }
            plan = Plan(ranks, "twosided")
            assert plan.kept_params(table) == lems_kept, (plan.kept_params(table), lems_kept)
            if budget == "uniform" and lems_kept > cap:
                raise SystemExit(f"R={ratio}: LEMS's plan keeps {lems_kept} weights, the uniform plan {cap}")
            plan.save(out / "lems" / f"R{ratio:g}{'' if budget == 'uniform' else '-nominal'}.json")
            rows.append(
                {
                    "R": ratio,
                    "budget": budget,
                    "ilp_budget": round(search.ratio_target * dense_total),
                    "search_set": f"{n}x{length}",
                    "kfac_uniform_P1": round(base["P1"], 2),
                    "kfac_uniform_held_out": round(base["held-out"], 2),
                    "lems_P1": round(ppl["P1"], 2),
                    "lems_held_out": round(ppl["held-out"], 2),
                    "uniform_kept": cap,
                    "lems_kept": lems_kept,
                    "kept_vs_uniform_pct": round(100 * (lems_kept / cap - 1), 3),
                    "modules_dense": sum(int(v == 1.0) for v in found.values()),
                    "statistics_s": round(stats_s),
                    "factors": "LEMS cache" if cached else "computed",
                    "sensitivity_s": round(sens_s),
                    "search_s": round(search_s),
                    "total_s": round(stats_s + sens_s + search_s),
                }
            )
            print(rows[-1], flush=True)
            with open(out / "lems.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

    print("\n| R | budget | KFAC-SVD uniform (held-out) | LEMS (held-out) | kept vs uniform |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['R']:g} | {r['budget']} | {r['kfac_uniform_P1']} ({r['kfac_uniform_held_out']}) | "
            f"{r['lems_P1']} ({r['lems_held_out']}) | {r['kept_vs_uniform_pct']:+.2f} % |"
        )


if __name__ == "__main__":
    main()
