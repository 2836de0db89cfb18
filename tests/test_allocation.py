"""Allocation spaces: the budget is never exceeded, the importance estimate is exact where it should
be, weights steer ranks, bad files fail by field, and a study over a tiny Llama runs end to end."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import BENCHMARKS, make_tiny
from helpers import token_ids
from optuna.trial import TrialState

from dse.decompose import METHODS, InputStats, ProjectionStats, collect_stats, get_method, make_config, uniform_plan
from dse.model import find_projections
from dse.results.record import TrialRecord
from dse.space import (
    AllocationError,
    AllocationSpace,
    Budget,
    SpaceContext,
    SpaceError,
    allocate,
    importance,
    load_space,
)
from dse.study.config import load_study_config
from dse.study.runner import run_study

SPACE = {"name": "alloc", "model_config": {"model_type": "llama"}, "budget": {"ratio": 0.3}}


@pytest.fixture(scope="module")
def table():
    return find_projections(make_tiny("llama"))


def kept(ranks, table):
    return sum(
        p.out_features * p.in_features if n not in ranks else ranks[n] * (p.out_features + p.in_features)
        for n, p in table.items()
    )


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_allocation_fills_the_budget_and_never_exceeds_it(table, ratio, seed):
    rng = np.random.default_rng(seed)
    importances = {n: np.sort(rng.random(p.full_rank) ** 3)[::-1] for n, p in table.items()}
    weights = {n: float(rng.uniform(0.1, 10)) for n in table}
    budget = Budget(ratio=ratio).kept(table, 0)
    ranks = allocate(table, importances, budget, weights)
    assert kept(ranks, table) <= budget
    cheapest = min(p.out_features + p.in_features for p in table.values())
    assert budget - kept(ranks, table) < max(cheapest, max(p.out_features * p.in_features for p in table.values()))
    for name, rank in ranks.items():  # decomposed modules stay below their break-even rank
        p = table[name]
        assert rank >= 1 and rank * (p.out_features + p.in_features) < p.out_features * p.in_features


def test_important_modules_stay_dense_and_weights_steer(table):
    flat = {n: np.linspace(1, 0.01, p.full_rank) for n, p in table.items()}
    budget = Budget(ratio=0.3).kept(table, 0)
    base = allocate(table, flat, budget, dict.fromkeys(table, 1.0))
    q = [n for n, p in table.items() if p.type == "q"]
    favoured = allocate(table, flat, budget, {n: (1e3 if n in q else 1.0) for n in table})
    assert all(n not in favoured for n in q)  # the heavily weighted type is left dense
    assert sum(favoured.get(n, 0) for n in table if n not in q) <= sum(base.get(n, 0) for n in table if n not in q)


def test_budget_below_rank_one_everywhere_names_the_budget(table):
    with pytest.raises(AllocationError, match=r"^space\.budget: keeps 10 parameters"):
        allocate(table, {n: np.ones(p.full_rank) for n, p in table.items()}, 10, dict.fromkeys(table, 1.0))


@pytest.mark.parametrize("method", [m for m in METHODS if not get_method(m).pair_ranks])
@pytest.mark.parametrize("rows", [24, 10])
def test_importance_is_the_fisher_weighted_output_error_of_each_component(rows, method):
    """Dropping component i changes the output by an error whose g-weighted mean square over the
    calibration tokens is exactly importance_i, for every one-rank method (whitened or not)."""
    torch.manual_seed(0)
    weight = torch.randn(rows, 16, dtype=torch.float64)
    x = torch.randn(300, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    stats = InputStats.zeros(16)
    stats.add(x)
    stats.finish()
    g = torch.rand(rows, dtype=torch.float64) + 0.1
    options = {"jitter": 0.0} if method == "svdllm" else {}
    seen = ProjectionStats(stats, torch.diag(g)) if get_method(method).config_cls.needs_grad_moments else stats
    form = get_method(method).factorize(weight, make_config(method, options), seen)
    estimate = importance(form, g, stats.xtx)
    for i in (0, 3, min(rows, 16) - 1):
        error = torch.outer(form.U[:, i] * form.S[i], form.Vh[i]) @ x.T  # (rows, tokens)
        measured = (g[:, None] * error.pow(2)).sum(0).mean()
        assert estimate[i] == pytest.approx(measured.item(), rel=1e-8)


def test_output_gradients_match_autograd():
    model = make_tiny("llama")
    ids = token_ids(batch=4, length=12, seed=3)
    name = "model.layers.1.self_attn.o_proj"
    before = [p.requires_grad for p in model.parameters()]
    _, _, grads = collect_stats(model, ids, batch_size=2, gradients=True)
    assert [p.requires_grad for p in model.parameters()] == before  # restored
    # collect_stats sums over batches of 2, each with its own mean loss: rescale the one-batch reference
    ref = torch.zeros_like(grads[name])
    for start in (0, 2):
        out = []

        def keep(module, args, output):  # returns None: the output is not replaced
            output.retain_grad()
            out.append(output)

        h = model.get_submodule(name).register_forward_hook(keep)
        embeds = model.get_input_embeddings()(ids[start : start + 2]).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids[start : start + 2]).loss.backward()
        h.remove()
        ref += out[0].grad.double().pow(2).reshape(-1, out[0].shape[-1]).sum(0)
    model.zero_grad()
    torch.testing.assert_close(grads[name], ref / ids.numel(), rtol=1e-4, atol=0)
    assert set(grads) == set(find_projections(model))


def test_space_round_trip_and_plans(table):
    space = AllocationSpace.from_dict({**SPACE, "weights": {"layer_knots": 2}})
    names = space.param_names(table)
    assert names == ("type.q", "type.k", "type.v", "type.o", "type.gate", "type.up", "type.down", "layer.0", "layer.1")
    importances = {n: np.linspace(1, 0.01, p.full_rank) for n, p in table.items()}
    plan = space.plan_from_params(space.flat_params(table), SpaceContext(table, "svdllm", 0, None, importances))
    assert kept(plan.ranks, table) <= uniform_plan(table, ratio=0.3).params(table)
    probes = space.probe_plans(table, "svdllm", model_params=0)
    assert set(probes) == set(names)
    assert {table[n].type for n in probes["type.k"].ranks} == {"k"}
    assert set().union(*(probes[f"layer.{k}"].ranks for k in (0, 1))) == set(table)
    weights = space.sensitivity_params(
        {"type.q": 2.0, "type.k": 0.5, "layer.0": 1.0, "layer.1": 1.0},
        {"type.q": 100, "type.k": 100, "layer.0": 10, "layer.1": 10},
    )
    assert weights["type.q"] == pytest.approx(2.0) and weights["type.k"] == pytest.approx(0.5)
    assert weights["layer.0"] == pytest.approx(1.0)
    with pytest.raises(SpaceError, match=r"allocation needs a one-rank method"):
        space.plan_from_params(space.flat_params(table), SpaceContext(table, "tucker2", 0, None, importances))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"budget": {"ratio": 1.5}}, r"^space\.budget\.ratio: must be in \(0, 1\)"),
        ({"budget": {"size": 0.5}}, r"^space\.budget: expected \{ratio: R\}, \{params: F\} or \{latency: F\}"),
        ({"weights": {"layer_knots": 1}}, r"^space\.weights\.layer_knots: expected 0"),
        ({"weights": {"low": 5, "high": 1}}, r"^space\.weights\.high: must be in"),
        ({"weights": {"lo": 1}}, r"^space\.weights\.lo: unknown key"),
        ({"starts": ["best"]}, r"^space\.starts\[0\]: unknown start 'best'; known: errormodel, flat, sensitivity"),
        ({"types": ["qq"]}, r"^space\.types\[0\]: 'qq' is not a tensor type"),
    ],
)
def test_bad_allocation_space_names_the_field(tmp_path, change, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **change}))
    with pytest.raises(SpaceError, match=message):
        load_space(path)


def test_budget_in_whole_model_params(table):
    dense = sum(p.out_features * p.in_features for p in table.values())
    total = dense + 1000
    assert Budget(params=0.5).kept(table, total) == int(0.5 * total) - 1000


def allocation_study(tiny_llama_dir, tmp_path):
    """A perplexity study over an allocation space of the tiny Llama (svdllm, ratio 0.4, 2 knots)."""
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    pages = {"path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"), "field": "page"}
    study = {
        "name": "alloc-study",
        "model": str(tiny_llama_dir),
        "method": "svdllm",
        "space": {
            "name": "alloc",
            "model": str(tiny_llama_dir),
            "budget": {"ratio": 0.4},
            "weights": {"layer_knots": 2},
        },
        "calibration": {"text": {**pages, "rows": [10, 12]}, "n_samples": 4, "seq_len": 32, "seed": 0},
        "evaluation": {"tasks": [], "perplexity": {"text": {**pages, "rows": [0, 1]}, "window": 64, "max_tokens": 256}},
        "objectives": ["perplexity"],
        "sampler": "tpe",
        "n_trials": 5,
        "baselines": [{"ratio": 0.4}],
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return load_study_config(path)


def test_allocation_study_end_to_end(tiny_llama_dir, tmp_path):
    result = run_study(allocation_study(tiny_llama_dir, tmp_path), progress=False)
    trials = result.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 5
    assert [TrialRecord.of(t).baseline or TrialRecord.of(t).start for t in trials[:3]] == [
        "ratio-0.4",
        "flat",
        "sensitivity",
    ]
    uniform_params = TrialRecord.of(trials[0])["params"]
    assert all(TrialRecord.of(t)["params"] <= uniform_params for t in trials)  # every plan within the budget
    assert all(math.isfinite(t.value) for t in trials)
    from dse.results.export import select_trial

    assert select_trial(result).value == min(t.value for t in trials)  # one objective: export needs no rule
    probes = result.user_attrs["sensitivity"]
    assert set(probes) == {
        "type.q",
        "type.k",
        "type.v",
        "type.o",
        "type.gate",
        "type.up",
        "type.down",
        "layer.0",
        "layer.1",
    }
    assert all(v["perplexity"] > 0 and v["params_removed"] > 0 for v in probes.values())


def test_interrupted_probes_resume_and_starts_are_enqueued_once(tiny_llama_dir, tmp_path, monkeypatch):
    from dse.study.measure import Measurer

    config = allocation_study(tiny_llama_dir, tmp_path)
    measure, calls = Measurer._measured, []  # every measurement, the baseline's included

    def counting(stop_at=None):  # call 1: the dense baseline, then the probes
        def wrapped(self, plan, early_stop=None):
            calls.append(len(plan))
            if len(calls) == stop_at:
                raise RuntimeError("stopped while probing")
            return measure(self, plan, early_stop)

        return wrapped

    monkeypatch.setattr(Measurer, "_measured", counting(stop_at=5))
    with pytest.raises(RuntimeError, match="stopped while probing"):
        run_study(config, progress=False)
    first = optuna.load_study(study_name=config.name, storage=config.storage)
    assert len(first.user_attrs["sensitivity"]) == 3 and not first.user_attrs.get("starts_enqueued")

    calls.clear()
    monkeypatch.setattr(Measurer, "_measured", counting())
    result = run_study(config, progress=False)
    starts = [TrialRecord.of(t).start for t in result.trials if TrialRecord.of(t).start]
    assert starts == ["flat", "sensitivity"]
    assert len(result.user_attrs["sensitivity"]) == 9
    measured = [t for t in result.trials if TrialRecord.of(t).duplicate_of is None]
    assert all(n > 0 for n in calls[:6]) and len(calls) == 6 + len(measured)  # the 6 missing probes, then trials


def test_sensitivity_start_needs_a_quality_objective(tiny_llama_dir, tmp_path):
    from dse.study.config import ConfigError

    study = {
        "name": "s",
        "model": str(tiny_llama_dir),
        "space": {**SPACE, "model": str(tiny_llama_dir)},
        "calibration": {
            "text": {
                "path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"),
                "field": "page",
                "rows": [10, 12],
            }
        },
        "evaluation": {"tasks": [], "latency": True},
        "objectives": ["latency_measured", "params"],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match=r"^space\.starts\[1\]: 'sensitivity' measures"):
        load_study_config(path)


def test_allocation_space_needs_calibration(tiny_llama_dir, tmp_path):
    from dse.study.config import ConfigError

    study = {
        "name": "s",
        "model": str(tiny_llama_dir),
        "space": {**SPACE, "model": str(tiny_llama_dir)},
        "evaluation": {"tasks": [], "perplexity": {"text": {"path": "x.jsonl", "field": "page"}}},
        "objectives": ["perplexity"],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match=r"^calibration: an allocation space"):
        load_study_config(path)


def test_shipped_allocation_spaces_describe_their_budget():
    from pathlib import Path

    spaces = [
        p for p in (Path(__file__).parents[1] / "spaces").glob("*.yaml") if "budget" in yaml.safe_load(p.read_text())
    ]
    assert spaces
    for path in spaces:
        space = load_space(path)
        text = space.describe(space.table())
        assert "every plan keeps at most" in text and "continuous parameters" in text
