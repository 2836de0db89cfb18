"""Latency tables: measured on a tiny model, cached and refused when foreign; break-even ranks, fast
steps and plan predictions on hand-made tables; latency budgets and the latency objective in studies."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import BENCHMARKS, make_tiny
from helpers import write_study

from dse.core.errors import ConfigError, PlanError
from dse.decompose import Plan
from dse.decompose.latency import (
    PHASES,
    LatencyTable,
    ShapeCost,
    TableSpec,
    Workload,
    environment,
    latency_table,
    measure_table,
    rank_grid,
    shape_key,
)
from dse.model import find_projections
from dse.results.record import TrialRecord
from dse.space import AllocationSpace, Budget, SpaceContext, allocate


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny("llama")
    return model, find_projections(model)


@pytest.fixture(scope="module")
def measured(tiny):
    model, table = tiny
    return measure_table(model, table, Workload(batch=1, prompt=16), repeats=2, cold_bytes=2**20)


def synthetic(table, *, slope=0.01, dense=1.0, step=8, rest=5.0) -> LatencyTable:
    """A table whose two factors cost ``slope`` ms per rank on every shape, dense ``dense`` ms."""
    shapes = {}
    for p in table.values():
        ranks = rank_grid(p.full_rank)
        shapes[f"{p.out_features}x{p.in_features}"] = ShapeCost(
            p.out_features,
            p.in_features,
            ranks,
            {phase: dense for phase in PHASES},
            {phase: [slope * r for r in ranks] for phase in PHASES},
            step,
        )
    return LatencyTable({"device": "test"}, Workload(), "k", {phase: rest for phase in PHASES}, shapes)


def test_rank_grid_covers_one_to_full():
    assert rank_grid(16) == [1, 8, 16] and rank_grid(100)[-1] == 100 and rank_grid(100)[:4] == [1, 8, 16, 32]


def test_measured_table_has_every_shape_and_sums_to_the_whole_model(tiny, measured):
    model, table = tiny
    assert set(measured.shapes) == {f"{p.out_features}x{p.in_features}" for p in table.values()}
    for cost in measured.shapes.values():
        assert cost.ranks == rank_grid(min(cost.out_features, cost.in_features))
        assert all(cost.dense[ph] > 0 and len(cost.lowrank[ph]) == len(cost.ranks) for ph in PHASES)
        assert cost.step in (1, 8, 16, 32, 64)
    dense = measured.predict(Plan({}), table)
    whole = {ph: measured.rest[ph] + sum(measured.module_ms(p, None, ph) for p in table.values()) for ph in PHASES}
    assert dense == pytest.approx({"predicted_decode_ms": whole["decode"], "predicted_prefill_ms": whole["prefill"]})
    assert measured.environment == environment(torch.device("cpu"), torch.float32)
    assert measured.seconds > 0


def test_interpolation_is_monotone_and_break_even_is_where_dense_wins():
    cost = ShapeCost(
        64,
        32,
        [1, 8, 16, 32],
        {"decode": 0.15, "prefill": 1.0},
        {"decode": [0.01, 0.08, 0.07, 0.32], "prefill": [0.1, 0.2, 0.4, 0.8]},
    )
    assert cost.at(8) == pytest.approx(0.07)  # lower envelope: the larger rank measured faster
    assert cost.at(24) == pytest.approx(0.07 + (0.32 - 0.07) / 2)
    assert cost.break_even("decode") == 22  # first rank whose interpolated cost reaches 0.15: 0.07 + 6 * 0.015625
    assert cost.break_even("prefill") == 33  # faster at every rank
    spiked = ShapeCost(64, 32, [1, 8, 16, 32], {"decode": 0.15}, {"decode": [0.01, 20.0, 0.07, 0.32]})
    assert spiked.at(8) == pytest.approx(0.07) and spiked.at(32) == pytest.approx(0.32)  # a load spike is dropped
    assert [spiked.at(r) for r in range(1, 33)] == sorted(spiked.at(r) for r in range(1, 33))


def test_break_even_is_the_first_rank_no_faster_than_dense_and_is_not_saved():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ranks = rank_grid(96)
        times = list(np.cumsum(rng.random(len(ranks))))
        cost = ShapeCost(96, 128, ranks, {"decode": float(rng.uniform(0, times[-1] * 1.2))}, {"decode": times})
        scan = next((r for r in range(1, 97) if cost.at(r) >= cost.dense["decode"]), 97)
        assert cost.break_even() == scan and cost.break_even() == scan  # memoised: same answer again
    assert set(asdict(cost)) == {"out_features", "in_features", "ranks", "dense", "lowrank", "step"}


def test_a_table_measured_on_a_busy_machine_is_measured_again_and_not_cached(tiny, tmp_path, monkeypatch):
    model, table = tiny
    import dse.decompose.latency as latency

    busy = synthetic(table, rest=-1.0)
    calls = []
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: calls.append(1) or busy)
    with pytest.warns(UserWarning, match="^latency table: measured 3 times, the projections alone were slower"):
        assert latency_table(model, table, TableSpec(), tmp_path) is busy
    assert len(calls) == latency.MEASURE_ATTEMPTS and not list(tmp_path.glob("latency-*.json"))
    quiet = [busy, synthetic(table)]
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: quiet.pop(0))
    assert latency_table(model, table, TableSpec(), tmp_path).consistent()
    assert len(list(tmp_path.glob("latency-*.json"))) == 1


def test_faster_plan_aligns_and_drops_ranks_slower_than_dense(tiny):
    _, table = tiny
    lt = synthetic(table, slope=0.05, dense=1.0, step=8)  # break-even rank 20 everywhere
    names = list(table)
    plan = Plan({names[0]: 13, names[1]: 5, names[2]: 24})
    faster = lt.faster_plan(plan, table, align=True)
    assert faster.ranks == {names[0]: 8, names[1]: 5}  # 13 -> 8; 5 below one step stays; 24 >= 20: dense
    assert lt.faster_plan(plan, table).ranks == {names[0]: 13, names[1]: 5}
    with pytest.raises(PlanError, match="^plan.method: latency tables model two factors"):
        lt.predict(Plan({names[0]: (2, 2)}, "tucker2"), table)


def test_a_table_is_cached_and_a_foreign_one_is_refused(tiny, tmp_path, monkeypatch):
    model, table = tiny
    import dse.decompose.latency as latency

    spec = TableSpec(Workload(prompt=8))

    def consistent(model, table, workload, **kw):  # a real measurement on a busy machine is rightly not cached
        lt = synthetic(table)
        lt.environment, lt.workload, lt.model = (
            environment(torch.device("cpu"), torch.float32),
            workload,
            shape_key(model, table),
        )
        return lt

    monkeypatch.setattr(latency, "measure_table", consistent)
    first = latency_table(model, table, spec, tmp_path)
    files = list(tmp_path.glob("latency-*.json"))
    assert len(files) == 1
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: pytest.fail("measured again"))
    assert latency_table(model, table, spec, tmp_path).to_dict() == first.to_dict()
    data = json.loads(files[0].read_text())
    data["environment"]["device"] = "NVIDIA H100"
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"^latency_table\.device: the table was measured with device 'NVIDIA H100'"):
        latency_table(model, table, TableSpec(Workload(prompt=8), str(foreign)))
    with pytest.raises(ConfigError, match=r"^latency_table\.workload: the table times"):
        latency_table(model, table, TableSpec(Workload(prompt=9), str(files[0])))
    with pytest.raises(ConfigError, match=r"^latency_table\.model: "):
        first.check(first.environment, first.workload, shape_key(make_tiny("mistral"), table))
    (tmp_path / "junk.json").write_text("[1]")
    with pytest.raises(ConfigError, match=r"^latency_table\.path: .* is not a dse latency table"):
        LatencyTable.load(tmp_path / "junk.json")


def test_latency_budget_keeps_the_predicted_step_within_budget(tiny):
    _, table = tiny
    lt = synthetic(table, slope=0.01, dense=0.3, rest=2.0)
    rng = np.random.default_rng(0)
    importances = {n: np.sort(np.abs(rng.standard_normal(p.full_rank)))[::-1] for n, p in table.items()}
    space = AllocationSpace.from_dict(
        {
            "name": "a",
            "model_config": {"model_type": "llama"},
            "budget": {"latency": 0.8},
            "weights": {"layer_knots": 0},
        }
    )
    total = lt.predict(Plan({}), table)["predicted_decode_ms"]
    plan = space.plan_from_params(space.flat_params(table), SpaceContext(table, "svd", 0, lt, importances))
    predicted = lt.predict(plan, table)["predicted_decode_ms"]
    assert predicted <= 0.8 * total + 1e-9 and predicted > 0.8 * total - 0.05  # spent, not wasted
    assert all(r < lt.cost(table[n]).break_even() for n, r in plan.ranks.items())
    with pytest.raises(ConfigError, match=r"^space\.budget\.latency: needs the study's latency table"):
        space.plan_from_params(space.flat_params(table), SpaceContext(table, "svd", 0, None, importances))
    # the same allocation in parameters is the parameter budget's
    assert Budget(params=0.9).cost().what == "parameters" and Budget(latency=0.9).cost(lt, table).what.startswith(
        "pred"
    )


def test_allocate_with_a_latency_cost_leaves_dense_what_costs_more_than_dense(tiny):
    _, table = tiny
    lt = synthetic(table, slope=0.1, dense=0.3)  # break-even rank 3: rank 3 costs as much as dense
    from dse.space.allocation import LatencyCost

    cost = LatencyCost(lt, table)
    importances = {n: np.ones(p.full_rank) for n, p in table.items()}
    ranks = allocate(table, importances, sum(cost.dense(p) for p in table.values()), dict.fromkeys(table, 1.0), cost)
    assert ranks == {}  # a budget of the dense cost: everything dense (cheaper than rank >= 3)


def test_a_study_with_the_latency_objective(tiny_llama_dir, tmp_path):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    from dse.model import load_model
    from dse.study.config import load_study_config
    from dse.study.runner import run_study

    # the study reads a table measured here: one the study measures itself is cached only when the
    # machine is quiet enough for it to be consistent, and this test must pass on a busy machine too
    model = load_model(str(tiny_llama_dir))[0]
    table = find_projections(model)
    measure_table(model, table, Workload(prompt=16), repeats=1).save(tmp_path / "latency.json")
    lt = LatencyTable.load(tmp_path / "latency.json")
    path = write_study(
        tmp_path,
        tiny_llama_dir,
        objectives=["perplexity", "latency"],
        n_trials=4,
        evaluation={
            "tasks": [],
            "perplexity": {
                "text": {
                    "path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"),
                    "field": "page",
                    "rows": [0, 1],
                },
                "window": 64,
                "max_tokens": 128,
            },
        },
        latency_table={"prompt": 16, "path": "latency.json"},
        cache_dir=str(tmp_path / "cache"),
    )
    config = load_study_config(path)
    assert config.optimises_latency and config.uses_latency and config.latency_table.workload.prompt == 16
    study = run_study(config, progress=False)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4
    for t in done:
        # the objective is the predicted decode step; a table measured once on a busy machine may
        # predict any sign (a loaded run saw prefill -17.9 ms), so only finiteness is checked here
        record = TrialRecord.of(t)
        assert t.values[1] == record["predicted_decode_ms"] and math.isfinite(record["predicted_prefill_ms"])
        if TrialRecord.of(t).baseline is None:  # sampled plans never keep a rank slower than dense
            plan = Plan.from_dict(TrialRecord.of(t).plan)
            assert all(rank < lt.cost(table[name]).break_even() for name, rank in plan.ranks.items())
    from dse.core.errors import ResultsError
    from dse.results.plots import plot_front, save_plots

    ax = plot_front(study, x="latency")
    assert ax.get_xlabel().startswith("predicted decode latency") and ax.get_ylabel() == "perplexity"
    assert "front-latency.png" in {p.name for p in save_plots(study, tmp_path / "plots", x="latency")}
    with pytest.raises(ResultsError, match=r"^x: the study's trials record no latency_ms_per_token"):
        plot_front(study, x="latency_measured")


def test_bad_latency_table_section_names_the_field(tiny_llama_dir, tmp_path, capsys):
    from dse.cli import main

    path = write_study(tmp_path, tiny_llama_dir, latency_table={"batch": 0})
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "dse: error: latency_table.batch: expected an integer >= 1, got 0"
    path = write_study(tmp_path, tiny_llama_dir, latency_table={"bach": 2})
    assert main(["run", str(path)]) == 2
    assert "latency_table.bach: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("rank, step, aligned", [(70, 32, 64), (64, 32, 64), (20, 32, 20), (5, 1, 5), (17, 16, 16)])
def test_align_rank_is_the_one_rounding_of_align_auto(rank, step, aligned):
    """align: auto (LatencyTable.faster_plan) and the benchmarks round ranks with this one function."""
    from dse.decompose import align_rank

    assert align_rank(rank, step) == aligned
