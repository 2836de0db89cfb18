"""The error model of a plan and its exact minimiser: the integer program's plan equals brute force
and keeps the budget, alignment and break-even hold inside it, the fit recovers known weights and
moves with new data, the ``errormodel`` sampler and start run a tiny study, bad input is one line."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import yaml
from conftest import BENCHMARKS, make_tiny
from optuna.trial import TrialState

from dse.core.errors import ConfigError, SpaceError
from dse.decompose import Plan
from dse.model import find_projections
from dse.results.record import TrialRecord
from dse.results.status import format_status, prediction_agreement
from dse.space import (
    AllocationError,
    Observation,
    SpaceContext,
    allocate,
    best_plan,
    candidate_ranks,
    fit,
    grid_plan,
    grid_sizes,
    solve,
    space_from_dict,
)
from dse.space.allocation import ParamCost
from dse.space.errormodel import ErrorModel, coefficient_names, tails
from dse.study.config import load_study_config, study_config_from_dict
from dse.study.runner import run_study

SPACE = {"name": "em", "model_config": {"model_type": "llama"}, "layers": [0], "types": ["q", "k", "o", "down"]}


@pytest.fixture(scope="module")
def table():
    return find_projections(make_tiny("llama"))


def spectra(table, seed=0):
    """Decreasing positive importances per module (a made-up spectrum)."""
    rng = np.random.default_rng(seed)
    return {n: np.sort(rng.gamma(1.0, size=p.full_rank))[::-1] * rng.uniform(0.5, 2) for n, p in table.items()}


def params_of(ranks, sel):
    return sum(ranks[n] * (p.out_features + p.in_features) if n in ranks else p.dense_params for n, p in sel.items())


@pytest.mark.parametrize("seed", range(6))
def test_solver_equals_brute_force_and_keeps_the_budget(seed):
    """4 groups x (3 ranks + dense): the program's choice is the cheapest-loss one that fits."""
    rng = np.random.default_rng(seed)
    choices = []
    for _ in range(4):
        costs = np.append(np.sort(rng.integers(1, 40, 3)), 50)
        losses = np.append(np.sort(rng.uniform(0, 1, 3))[::-1], 0.0)
        choices.append((costs, losses))
    for kept in (10, 60, 110, 150, 200):
        if sum(c.min() for c, _ in choices) > kept:
            with pytest.raises(AllocationError, match=r"^space\.budget: keeps"):
                solve(choices, kept)
            continue
        picked = solve(choices, kept)
        cost = sum(choices[g][0][i] for g, i in enumerate(picked))
        loss = sum(choices[g][1][i] for g, i in enumerate(picked))
        best = min(
            sum(choices[g][1][i] for g, i in enumerate(combo))
            for combo in itertools.product(range(4), repeat=4)
            if sum(choices[g][0][i] for g, i in enumerate(combo)) <= kept
        )
        assert cost <= kept and loss == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("ratio", [0.2, 0.4])
@pytest.mark.parametrize("align", [2, 4])
def test_best_plan_equals_brute_force_over_aligned_ranks(table, ratio, align):
    space = space_from_dict({**SPACE, "budget": {"ratio": ratio}, "align": align})
    sel = space.selected(table)
    importances = spectra(table)
    obs = [Observation({n: 4 for n in sel}, 1.0), Observation({n: 8 for n in list(sel)[:2]}, 0.3)]
    model = fit(obs, table, importances)
    plan = best_plan(space, SpaceContext(table, "svd", 0, None, importances), model)
    kept = space.budget.kept(sel, 0)
    assert params_of(plan.ranks, sel) <= kept
    assert all(r % align == 0 for r in plan.ranks.values())
    ok = [range(align, p.full_rank, align) for p in sel.values()]
    ok = [[r for r in rs if r * (p.out_features + p.in_features) < p.dense_params] for rs, p in zip(ok, sel.values())]
    options = [[None] + rs for rs in ok]
    best = min(
        model.predict({n: r for n, r in zip(sel, combo) if r is not None})
        for combo in itertools.product(*options)
        if params_of({n: r for n, r in zip(sel, combo) if r is not None}, sel) <= kept
    )
    assert model.predict(plan.ranks) == pytest.approx(best, rel=1e-6, abs=1e-12)


def test_candidates_stop_at_break_even(table):
    q, k = table["model.layers.0.self_attn.q_proj"], table["model.layers.0.self_attn.k_proj"]
    assert list(candidate_ranks(q, ParamCost())) == list(range(1, 16))  # 32x32: rank 16 costs the dense 1024
    assert list(candidate_ranks(k, ParamCost(), 4)) == [4, 8]  # 16x32: below 512 / 48 = 10.7
    assert list(candidate_ranks(q, ParamCost(), 4, slower_from=9)) == [4, 8]  # measured slower from rank 9


def test_fit_recovers_known_weights_and_moves_with_new_data(table):
    importances = spectra(table, seed=1)
    tail = tails(importances)
    layer = {p.layer: w for p, w in zip(table.values(), [0.5, 1.0, 2.0] * 10)}
    typ = {"q": 0.2, "k": 1.5, "v": 0.1, "o": 0.7, "gate": 0.3, "up": 0.3, "down": 1.1}
    truth = {n: layer[p.layer] + typ[p.type] for n, p in table.items()}
    rng = np.random.default_rng(0)
    obs = []
    for _ in range(80):
        ranks = {n: int(rng.integers(1, p.full_rank)) for n, p in table.items() if rng.random() < 0.5}
        obs.append(Observation(ranks, sum(truth[n] * tail[n][r] for n, r in ranks.items())))
    model = fit(obs, table, importances, ridge=1e-8)
    for n in table:
        assert model.weight(n) == pytest.approx(truth[n], rel=0.02)
    test = {n: 3 for n in table}
    assert model.predict(test) == pytest.approx(sum(truth[n] * tail[n][3] for n in test), rel=0.01)
    few = fit(obs[:5], table, importances)
    more = fit(obs[:5] + [Observation({"model.layers.0.self_attn.k_proj": 2}, 50.0)], table, importances)
    assert more.weight("model.layers.0.self_attn.k_proj") > few.weight("model.layers.0.self_attn.k_proj")
    assert not np.allclose(few.coef, more.coef)
    a, b = few.draw(np.random.default_rng(3)), few.draw(np.random.default_rng(3))
    assert np.array_equal(a, b) and (a >= 0).all()


def test_bad_input_is_one_line(table, tmp_path):
    with pytest.raises(SpaceError, match=r"^error model: no observations"):
        fit([], table, spectra(table))
    with pytest.raises(SpaceError, match=r"^space\.align: expected an integer >= 1 or 'auto', got 'x'"):
        space_from_dict({**SPACE, "budget": {"ratio": 0.3}, "align": "x"})
    grid = {"name": "g", "model_config": {"model_type": "llama"}, "ranks": [4, 8]}
    study = {"name": "s", "space": grid, "objectives": ["perplexity", "params"], "sampler": "errormodel"}
    study["evaluation"] = {"tasks": [], "perplexity": {"text": {"path": str(tmp_path / "t.txt")}}}
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(ConfigError, match=r"^calibration: sampler errormodel weighs each module's truncation error"):
        study_config_from_dict(study, tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=r"^sampler: errormodel refuses these options: explore"):
        study_config_from_dict({**study, "sampler": {"name": "errormodel", "explore": 2.0}}, tmp_path / "s.yaml")


def test_errormodel_start_and_sampler_run_a_tiny_study(tiny_llama_dir, tmp_path):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    pages = {"path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"), "field": "page"}
    study = {
        "name": "em-study",
        "model": str(tiny_llama_dir),
        "method": "svdllm",
        "space": {
            "name": "em",
            "model": str(tiny_llama_dir),
            "budget": {"ratio": 0.4},
            "weights": {"layer_knots": 2},
            "starts": ["errormodel"],
            "align": 2,
        },
        "calibration": {"text": {**pages, "rows": [10, 12]}, "n_samples": 4, "seq_len": 32, "seed": 0},
        "evaluation": {"tasks": [], "perplexity": {"text": {**pages, "rows": [0, 1]}, "window": 64, "max_tokens": 256}},
        "objectives": ["perplexity"],
        "sampler": {"name": "errormodel", "explore": 0.5},
        "n_trials": 5,
        "baselines": [{"ratio": 0.4}],
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    result = run_study(load_study_config(path), progress=False)
    trials = result.get_trials(states=(TrialState.COMPLETE,))
    records = [TrialRecord.of(t) for t in trials]
    assert len(trials) == 5 and [r.baseline or r.start for r in records[:2]] == ["ratio-0.4", "errormodel"]
    assert records[1].planned == records[1].plan  # the start's plan, measured as it was enqueued
    uniform = records[0]["params"]
    assert all(r["params"] <= uniform for r in records)  # every plan within the budget
    assert all(v % 2 == 0 for r in records[1:] for v in r.plan["ranks"].values())  # aligned
    assert all(math.isfinite(r["predicted_loss"]) for r in records)  # probes measured before any trial
    rho, n, metric = prediction_agreement(result)  # a random model's losses carry no signal to rank
    assert n == 5 and metric == "perplexity" and (math.isnan(rho) or -1 <= rho <= 1)
    assert "error model: Spearman" in format_status(result)


def test_sampler_is_seeded_and_refits_after_each_finished_trial(table):
    import optuna

    from dse.study.modelsampler import ErrorModelSampler

    space = space_from_dict(
        {**SPACE, "layers": "all", "types": None, "budget": {"ratio": 0.3}, "weights": {"layer_knots": 2}}
    )
    context = SpaceContext(table, "svd", 0, None, spectra(table))
    probes = space.probe_plans(table, "svd", model_params=0)
    study = optuna.create_study()
    study.set_user_attr("baseline", {"perplexity": 10.0})
    study.set_user_attr("sensitivity", {n: {"perplexity": 10.0 * (1.1 + 0.1 * i)} for i, n in enumerate(probes)})
    trial = study.ask()
    plans = [ErrorModelSampler(seed=1, explore=1.0).propose(trial, space, context, "perplexity") for _ in range(2)]
    assert plans[0].ranks == plans[1].ranks and params_of(plans[0].ranks, space.selected(table)) <= space.budget.kept(
        space.selected(table), 0
    )
    sampler = ErrorModelSampler(seed=1)
    before = sampler.model(study, space, context, "perplexity")
    TrialRecord(plan=plans[0].to_dict(), metrics={"perplexity": 30.0}).write(trial)
    study.tell(trial, 30.0)
    after = sampler.model(study, space, context, "perplexity")
    assert after.n_observations == before.n_observations + 1 and not np.allclose(after.coef, before.coef)
    assert ErrorModelSampler(seed=1, refit=False).model(study, space, context, "perplexity").n_observations == len(
        probes
    )


def test_latency_budget_and_align_auto_inside_the_program(table):
    """Under a latency budget with ``align: auto`` every rank is a multiple of its shape's measured
    step and faster than dense, the predicted step keeps the budget, and the optimum is no worse
    than the greedy allocation's plan (aligned and cut to faster ranks, so one of its candidates)."""
    from test_latency import synthetic

    latency = synthetic(table, slope=0.02, dense=0.3, step=4, rest=2.0)
    space = space_from_dict({**SPACE, "layers": "all", "types": None, "budget": {"latency": 0.8}, "align": "auto"})
    importances = spectra(table, seed=2)
    context = SpaceContext(table, "svd", 0, latency, importances)
    model = fit([Observation({n: 4 for n in table}, 1.0)], table, importances)
    plan = best_plan(space, context, model)
    total = latency.predict(Plan({}), table)["predicted_decode_ms"]
    assert latency.predict(plan, table)["predicted_decode_ms"] <= 0.8 * total + 1e-9
    assert plan.ranks and all(r % 4 == 0 and r < latency.cost(table[n]).break_even() for n, r in plan.ranks.items())
    weights = {n: model.weight(n) for n in table}
    kept = space.budget.kept(table, 0, space.budget.cost(latency, table))
    greedy = allocate(table, importances, kept, weights, space.budget.cost(latency, table))
    greedy = latency.faster_plan(Plan(greedy), table, align=True)
    assert model.predict(plan.ranks) <= model.predict(greedy.ranks) + 1e-12


class _Ask(Exception):
    """The walk asked a parameter the prefix does not answer (its options)."""


def grid_plans(space, context):
    """Every plan of a grid space: its define-by-run walk run for every answer (brute force)."""
    todo, plans = [()], []
    while todo:
        prefix = todo.pop()

        class Trial:
            answers = list(prefix)

            def suggest_categorical(self, name, options):
                if not self.answers:
                    raise _Ask(options)
                return self.answers.pop(0)

        try:
            plans.append(space.suggest(Trial(), context).ranks)
        except _Ask as ask:
            todo += [prefix + (o,) for o in ask.args[0]]
    return plans


GRIDS = [  # group, ranks, rules
    ("module", [2, 0.5, "dense"], {}),
    ("module", [2, 6, "dense"], {"max_layers": 1}),
    ("layer", [2, 0.25, "dense"], {"no_adjacent": True}),
    ("type", [2, 0.5, "dense"], {}),
    ("shared", [1, 4, 0.5], {}),
    ("layer_x_type", [2, 0.5], {"max_layers": 1}),
    ("layer_x_type", [3, 6], {}),
]


@pytest.mark.parametrize("group,ranks,rules", GRIDS)
def test_grid_plan_equals_brute_force(table, group, ranks, rules):
    """On a grid space the program's plan is the least predicted loss among every plan the space's
    walk can produce within the size, for every group and the layer rules."""
    types = ["q", "v", "down"] if group in ("module", "layer_x_type") else None
    space = space_from_dict(
        {
            "name": "g",
            "model_config": {"model_type": "llama"},
            "types": types,
            "ranks": ranks,
            "group": group,
            "rules": rules,
        }
    )
    importances = spectra(table, seed=4)
    context = SpaceContext(table, "svd", 0, None, importances)
    names = coefficient_names(table)
    coef = np.random.default_rng(len(group)).uniform(0.2, 2.0, len(names))
    model = ErrorModel(names, coef, np.eye(len(names)), table, tails(importances))
    sel = {n: table[n] for n in space.layout(table).resolved}
    plans = grid_plans(space, context)
    sizes = [params_of(r, sel) for r in plans]
    low, high = grid_sizes(space, context, model)
    assert low == min(sizes) and high == params_of({}, sel)
    for fraction in (0.0, 0.3, 0.7, 1.0):
        kept = low + fraction * (high - low)
        plan = grid_plan(space, context, model, fraction)
        best = min(model.predict(r) for r, size in zip(plans, sizes) if size <= kept)
        assert dict(plan.ranks) in [dict(r) for r in plans]  # a plan of the space, rules included
        assert params_of(plan.ranks, sel) <= kept
        assert model.predict(plan.ranks) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_errormodel_sampler_runs_a_grid_study(tiny_llama_dir, tmp_path):
    """A grid study with the errormodel sampler: random suggestions until a trial is measured, then
    the model's optima at drawn sizes, each a plan of the grid with its prediction recorded."""
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    pages = {"path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"), "field": "page"}
    space = {"name": "g", "model": str(tiny_llama_dir), "ranks": [2, 4, "dense"], "group": "layer"}
    study = {
        "name": "em-grid",
        "model": str(tiny_llama_dir),
        "method": "svd",
        "space": space,
        "calibration": {"text": {**pages, "rows": [10, 12]}, "n_samples": 4, "seq_len": 32, "seed": 0},
        "evaluation": {"tasks": [], "perplexity": {"text": {**pages, "rows": [0, 1]}, "window": 64, "max_tokens": 256}},
        "objectives": ["perplexity", "params"],
        "sampler": {"name": "errormodel", "explore": 0.0},
        "n_trials": 5,
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    config = load_study_config(path)
    result = run_study(config, progress=False)
    trials = result.get_trials(states=(TrialState.COMPLETE,))
    records = [TrialRecord.of(t) for t in trials]
    assert len(records) == 5
    assert records[0].get("predicted_loss") is None and trials[0].params  # nothing to fit: the space's draw
    assert all(math.isfinite(r["predicted_loss"]) for r in records[1:])  # the model's optima
    assert not any(t.params for t in trials[1:])
    from dse.model import load_model

    context = SpaceContext(find_projections(load_model(str(tiny_llama_dir))[0]), "svd", 0, None, None)
    allowed = [dict(r) for r in grid_plans(config.space, context)]
    assert all(dict(r.plan["ranks"]) in allowed for r in records)


def test_trust_region_keeps_every_module_near_the_incumbent(table):
    """With ``near``, each module's cost moves at most ``radius`` of its cost in ``near``, and the
    optimum predicts no worse than ``near`` itself (a candidate); unbounded gives the global optimum."""
    space = space_from_dict({**SPACE, "layers": "all", "types": None, "budget": {"ratio": 0.3}})
    importances = spectra(table, seed=5)
    context = SpaceContext(table, "svd", 0, None, importances)
    model = fit([Observation({n: 4 for n in table}, 1.0)], table, importances)
    sel = space.selected(table)
    other = fit([Observation({n: 2 for n in table}, 3.0)], table, spectra(table))  # another model's optimum
    near = dict(best_plan(space, context, other).ranks)
    cost = ParamCost()

    def spent(name, ranks):
        return cost.dense(sel[name]) if name not in ranks else ranks[name] * cost.unit(sel[name])

    for radius in (0.0, 0.25, 0.5):
        plan = dict(best_plan(space, context, model, near=near, radius=radius).ranks)
        assert all(abs(spent(n, plan) - spent(n, near)) <= radius * spent(n, near) + 1e-9 for n in sel)
        assert model.predict(plan) <= model.predict(near) + 1e-12
    assert best_plan(space, context, model, near=near, radius=0.0).ranks == near
    assert best_plan(space, context, model, near=near, radius=math.inf).ranks == best_plan(space, context, model).ranks


def test_trust_region_radius_steps_with_trials_that_do_not_improve():
    import optuna

    from dse.study.modelsampler import PATIENCE, ErrorModelSampler

    study = optuna.create_study()
    sampler = ErrorModelSampler(trust=0.4)
    assert sampler.region(study, "perplexity") == (None, math.inf)
    radii = []
    for i, value in enumerate([50.0, 40.0] + [45.0] * (4 * PATIENCE) + [39.0]):
        trial = study.ask()
        TrialRecord(plan=Plan({"m": i + 1}).to_dict(), metrics={"perplexity": value}).write(trial)
        study.tell(trial, value)
        radii.append(sampler.region(study, "perplexity"))
    assert radii[1] == ({"m": 2}, 0.4)  # the incumbent: trial 1
    steps = [r for _, r in radii[1 : 2 + 4 * PATIENCE : PATIENCE]]
    assert steps == [0.4, 0.2, 0.1, math.inf, 0.4]  # halved every PATIENCE failures, then unbounded, then again
    assert radii[-1] == ({"m": len(radii)}, 0.4)  # a better trial is the new incumbent
    assert ErrorModelSampler(trust=0.0).region(study, "perplexity") == (None, math.inf)
