"""Characterization, baseline plans and multi-fidelity pruning: real tiny models, real lm-eval."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
from conftest import BENCHMARKS, make_tiny
from helpers import write_study

from dse.core.errors import ConfigError
from dse.decompose import Plan
from dse.evaluate import EarlyStop, EvalConfig, Evaluator, staged_run
from dse.model import find_projections
from dse.results.record import TrialRecord
from dse.space import PROBE_KINDS, curve_layers, parse_baseline, sensitivity_plan, spread_layers, units
from dse.study.characterize import characterize
from dse.study.config import load_study_config
from dse.study.measure import Measurer
from dse.study.worker import early_stop_rule

PERPLEXITY = {
    "text": {"path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"), "field": "page", "rows": [0, 1]},
    "window": 64,
    "max_tokens": 128,
}


@pytest.fixture(scope="module")
def table():
    return find_projections(make_tiny("llama"))  # 3 layers x 7 types


def test_spread_layers_avoid_the_ends_and_neighbours():
    assert spread_layers(32, 3) == [1, 15, 30]
    for n, k in ((30, 3), (30, 6), (12, 4)):
        chosen = spread_layers(n, k)
        assert len(chosen) == k and 0 not in chosen and n - 1 not in chosen
        assert all(b - a > 1 for a, b in zip(chosen, chosen[1:]))


@pytest.mark.parametrize(
    "kind, k, n, expected",
    [
        ("first", 2, 30, [0, 1]),
        ("last", 3, 30, [27, 28, 29]),
        ("adjacent", 3, 30, [13, 14, 15]),
        ("spread", 2, 30, [1, 28]),
    ],
)
def test_curve_layers(kind, k, n, expected):
    assert curve_layers(kind, k, n) == expected


def test_units_cover_modules_layers_and_curves(table):
    todo = units(table, rank=1, kinds=list(PROBE_KINDS), ks=(1, 2))
    by_kind = pd.Series([u.kind for u in todo]).value_counts().to_dict()
    assert by_kind == {"module": len(table), "layer": 3, "first": 2, "last": 2, "spread": 2, "adjacent": 2}
    layer = next(u for u in todo if u.name == "L1")
    assert set(layer.plan.ranks) == {n for n, p in table.items() if p.layer == 1}
    assert all(r == 1 for u in todo for r in u.plan.ranks.values())
    with pytest.raises(ConfigError, match=r"^k: 4 is not between 1"):
        units(table, ks=(4,))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"layers": 0}, r"^b\.layers: expected a count >= 1"),
        ({"layers": 2, "rank": 0}, r"^b\.rank: expected an integer >= 1"),
        ({"layers": 2, "ranks": 1}, r"^b\.ranks: unknown key"),
        ({"sensitivity": 1.5, "characterization": "x.csv"}, r"^b\.sensitivity: must be in \(0, 1\)"),
        ({"sensitivity": 0.1}, r"^b\.characterization: expected the path"),
        ({"sensitivity": 0.1, "characterization": "missing.csv"}, r"^b\.characterization: no such file"),
        ({"best": 1}, r"^b: expected one of 'dense', \{uniform"),
        ("densest", r"^b: unknown baseline 'densest' \(did you mean 'dense'\?\)"),
    ],
)
def test_bad_baselines_name_the_field(spec, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        parse_baseline(spec, "b", tmp_path)


def test_layers_baseline_is_whole_layers_at_rank_one(table):
    baseline = parse_baseline({"layers": [0, 2]}, "b")
    assert baseline.label == "layers-0-2-rank1"
    plan = baseline.plan(table, "svd")
    assert set(plan.ranks) == {n for n, p in table.items() if p.layer in (0, 2)}
    assert set(plan.ranks.values()) == {1}
    plan = parse_baseline({"layers": 1, "rank": 2}, "b").plan(table, "svd")
    assert {table[n].layer for n in plan.ranks} == {1} and set(plan.ranks.values()) == {2}


def test_sensitivity_plan_takes_the_least_sensitive_modules_first(table):
    names = list(table)
    frame = pd.DataFrame(
        {"kind": "module", "unit": names, "rank": 1, "accuracy_drop": [0.001 * i for i in range(len(names))]}
    )
    dense = sum(p.out_features * p.in_features for p in table.values())
    model_params = 2 * dense
    plan = sensitivity_plan(frame, table, 0.1, model_params=model_params)
    saved = [
        table[n].out_features * table[n].in_features - (table[n].out_features + table[n].in_features)
        for n in plan.ranks
    ]
    assert sum(saved) >= 0.1 * model_params and sum(saved[:-1]) < 0.1 * model_params

    def saved_by(n):
        return table[n].out_features * table[n].in_features - (table[n].out_features + table[n].in_features)

    by_cost = sorted(names, key=lambda n: (0.001 * names.index(n) / saved_by(n), -saved_by(n)))
    assert set(plan.ranks) == set(by_cost[: len(plan.ranks)])  # least drop per removed parameter first
    with pytest.raises(ConfigError, match=r"^baselines\.sensitivity: decomposing every module"):
        sensitivity_plan(frame, table, 0.9, model_params=model_params)
    # a perplexity-only characterization (no accuracy column) ranks by log perplexity ratio
    by_ppl = frame.rename(columns={"accuracy_drop": "log_perplexity_ratio"})
    assert sensitivity_plan(by_ppl, table, 0.1, model_params=model_params).ranks == plan.ranks


def study_file(tmp_path, model_dir, **overrides):
    return write_study(
        tmp_path,
        model_dir,
        **{
            "evaluation": {"tasks": ["piqa"], "limit": 8, "data_dir": str(BENCHMARKS), "perplexity": PERPLEXITY},
            "baselines": [],
            "storage": f"sqlite:///{tmp_path / 'c.db'}",
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def measurer(tiny_llama_dir, tmp_path_factory):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    return Measurer.from_config(
        load_study_config(study_file(tmp_path_factory.mktemp("c"), tiny_llama_dir)), progress=False
    )


def test_characterize_writes_rows_and_resumes(measurer, tmp_path, monkeypatch):
    todo = units(measurer.table, kinds=("layer", "first"), ks=(1, 2))
    csv = tmp_path / "c.csv"
    frame = characterize(measurer, todo[:3], csv, progress=False)
    assert list(frame["kind"]) == ["dense", "layer", "layer", "layer"]
    dense = frame.iloc[0]
    assert dense["accuracy_drop"] == 0 and dense["log_perplexity_ratio"] == 0
    assert (frame["params"].iloc[1:] < dense["params"]).all()
    calls = []
    measure = measurer.measure
    monkeypatch.setattr(measurer, "measure", lambda plan, *a: calls.append(plan) or measure(plan, *a))
    frame = characterize(measurer, todo, csv, progress=False)  # resumes: L3 and the two curve rows are new
    assert len(calls) == 3 and list(frame["unit"])[-3:] == ["L3", "first-1", "first-2"]
    assert pd.read_csv(csv).shape[0] == len(frame) == 7


def test_two_stage_accuracy_equals_one_stage(measurer):
    evaluator = Evaluator(
        measurer.model, measurer.tokenizer, EvalConfig(tasks=["piqa", "arc_easy"], limit=8, data_dir=str(BENCHMARKS))
    )
    one = evaluator.run(progress=False)
    seen = []
    two = staged_run(evaluator, 0.25, lambda m: seen.append(m) and None, progress=False)
    assert seen and set(seen[0]) == {"acc/piqa", "acc/arc_easy", "accuracy"}
    for key in ("acc/piqa", "acc/arc_easy", "accuracy"):
        assert two[key] == pytest.approx(one[key], abs=1e-12)
    with pytest.raises(EarlyStop, match="too low") as stop:
        staged_run(evaluator, 0.25, lambda m: "too low", progress=False)
    assert stop.value.metrics["accuracy"] == seen[0]["accuracy"]


def test_early_stop_rule_compares_with_the_best_at_this_size_or_smaller(measurer):
    from dse.study.config import MultiFidelity

    mf = MultiFidelity(first=0.25, margin=0.05)
    study = optuna.create_study(directions=["maximize", "minimize"])
    plan = Plan({n: 1 for n, p in measurer.table.items() if p.layer == 0})
    params = measurer.params_after(plan)
    assert early_stop_rule(study, mf, params) is None  # nothing to compare with yet
    study.add_trial(
        optuna.trial.create_trial(values=[0.9, params + 1], user_attrs={"accuracy": 0.9, "params": params + 1})
    )
    assert early_stop_rule(study, mf, params) is None  # only a larger model: no evidence at this size
    study.add_trial(optuna.trial.create_trial(values=[0.8, params], user_attrs={"accuracy": 0.8, "params": params}))
    rule = early_stop_rule(study, mf, params)
    assert rule({"accuracy": 0.76}) is None
    assert "more than 0.05 below 0.800 (trial 1" in rule({"accuracy": 0.7})


def test_multi_fidelity_study_records_pruned_trials(tiny_llama_dir, tmp_path):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    from dse.study.runner import run_study

    # margin 1 would never prune; margin 0 prunes whatever scores below the best smaller trial
    path = study_file(
        tmp_path, tiny_llama_dir, multi_fidelity={"first": 0.5, "margin": 0.0}, baselines=[{"uniform": 1}], n_trials=6
    )
    study = run_study(load_study_config(path), progress=False)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 6
    for t in study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert "below" in TrialRecord.of(t).pruned and TrialRecord.of(t)["eval_seconds"] > 0
            assert TrialRecord.of(t)["accuracy"] < max(
                TrialRecord.of(u).get("accuracy", 0)
                for u in study.trials
                if u.state == optuna.trial.TrialState.COMPLETE
            )


@pytest.mark.parametrize(
    "block, message",
    [
        ({"first": 1.5}, r"^multi_fidelity\.first: must be in \(0, 1\)"),
        ({"margin": -1}, r"^multi_fidelity\.margin:"),
        ({"frist": 0.2}, r"^multi_fidelity\.frist: unknown key"),
    ],
)
def test_bad_multi_fidelity_names_the_field(tmp_path, tiny_llama_dir, block, message):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    with pytest.raises(ConfigError, match=message):
        load_study_config(study_file(tmp_path, tiny_llama_dir, multi_fidelity=block))


def test_cli_characterize_a_study_and_a_model(tiny_llama_dir, tmp_path):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    from dse.cli import main

    out = tmp_path / "study-out"
    assert (
        main(
            [
                "characterize",
                str(study_file(tmp_path, tiny_llama_dir)),
                "--out",
                str(out),
                "--kinds",
                "module",
                "first",
                "--k",
                "1",
                "--modules-by-perplexity",
                "--quiet",
            ]
        )
        == 0
    )
    frame = pd.read_csv(out / "characterization.csv")
    assert frame["kind"].value_counts().to_dict() == {"module": 28, "dense": 1, "first": 1}
    assert frame.loc[frame["kind"] == "module", "accuracy"].isna().all()  # modules: perplexity alone
    assert frame.loc[frame["kind"] == "first", "accuracy"].notna().all()
    assert {"heatmap-perplexity.png", "layers.png", "layers.svg"} <= {p.name for p in out.iterdir()}

    out = tmp_path / "model-out"
    assert (
        main(
            [
                "characterize",
                str(tiny_llama_dir),
                "--out",
                str(out),
                "--kinds",
                "layer",
                "--tasks",
                "piqa",
                "--limit",
                "4",
                "--data-dir",
                str(BENCHMARKS),
                "--quiet",
            ]
        )
        == 0
    )
    assert pd.read_csv(out / "characterization.csv")["kind"].tolist() == ["dense"] + ["layer"] * 4
    assert main(["characterize", "no-such-model-anywhere", "--out", str(out), "--quiet"]) == 2
