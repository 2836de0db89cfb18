"""Plans: validation names the bad field and leaves the model untouched; JSON round trip; uniform plans."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny
from helpers import assert_unchanged, snapshot

from dse.core.errors import PlanError
from dse.decompose import METHODS, PLAN_FORMAT, Plan, decompose_, uniform_plan
from dse.decompose.methods import as_pair, get_method
from dse.model import find_projections

Q = "model.layers.0.self_attn.q_proj"  # tiny llama: q 32×32, k 16×32 (2 kv heads of 8)
K = "model.layers.0.self_attn.k_proj"
GOOD = {"model.layers.1.mlp.up_proj": 3, "model.layers.2.self_attn.o_proj": 5}  # valid entries first


@pytest.fixture
def llama():
    return make_tiny("llama")


@pytest.mark.parametrize(
    "ranks, method, options, message",
    [
        (
            {"model.layers.0.self_attn.z_proj": 2},
            "svd",
            {},
            r"plan.ranks\['model.layers.0.self_attn.z_proj'\]: no such decomposable module",
        ),
        ({"lm_head": 2}, "svd", {}, r"plan.ranks\['lm_head'\]: no such decomposable module"),
        ({Q: 0}, "svd", {}, rf"plan.ranks\['{Q}'\]: rank must be >= 1, got 0"),
        ({Q: -3}, "svd", {}, rf"plan.ranks\['{Q}'\]: rank must be >= 1, got -3"),
        ({K: 17}, "svd", {}, rf"plan.ranks\['{K}'\]: rank 17 exceeds min\(16, 32\) = 16"),
        ({Q: 33}, "svd", {}, rf"plan.ranks\['{Q}'\]: rank 33 exceeds min\(32, 32\) = 32"),
        ({Q: 2.5}, "svd", {}, rf"plan.ranks\['{Q}'\]: rank must be an integer, got 2.5"),
        ({Q: "3"}, "svd", {}, rf"plan.ranks\['{Q}'\]: rank must be an integer, got '3'"),
        ({Q: True}, "svd", {}, rf"plan.ranks\['{Q}'\]: rank must be an integer, got True"),
        ({Q: None}, "svd", {}, rf"plan.ranks\['{Q}'\]: rank must be an integer, got None"),
        ({Q: (4, 4)}, "svd", {}, rf"plan.ranks\['{Q}'\]: method svd takes one rank, got a pair \[4, 4\]"),
        ({Q: (4, 4, 4)}, "tucker2", {}, rf"plan.ranks\['{Q}'\]: a rank pair is \[r_out, r_in\], got \[4, 4, 4\]"),
        ({K: (4, 0)}, "tucker2", {}, rf"plan.ranks\['{K}'\]: rank must be >= 1, got 0"),
        ({K: (17, 4)}, "tucker2", {}, rf"plan.ranks\['{K}'\]: rank 17 exceeds min\(16, 32\) = 16"),
        ({K: (4, 2.0)}, "tucker2", {}, rf"plan.ranks\['{K}'\]: rank must be an integer, got 2.0"),
    ],
    ids=[
        "unknown-module",
        "lm-head",
        "zero",
        "negative",
        "above-min-k",
        "above-min-q",
        "float",
        "string",
        "bool",
        "none",
        "pair-for-svd",
        "triple",
        "pair-zero",
        "pair-above-min",
        "pair-float",
    ],
)
def test_bad_plan_raises_naming_the_field_and_leaves_model_unchanged(llama, ranks, method, options, message):
    plan = Plan({**GOOD, **ranks}, method, options)
    snap = snapshot(llama)
    with pytest.raises(PlanError, match=f"^{message}"):
        decompose_(llama, plan)
    assert_unchanged(llama, snap)
    with pytest.raises(PlanError, match=f"^{message}"):
        plan.validate(find_projections(llama))


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("nope", {}, r"plan.method: unknown method 'nope'; known: "),
        ("svdd", {}, r"plan.method: unknown method 'svdd' \(did you mean 'svd'\?\)"),
        ("svd", {"alpha": 1}, r"plan.method_options.alpha: svd has no such option"),
    ],
    ids=["unknown-method", "misspelt-method", "unknown-option"],
)
def test_a_plan_with_an_unknown_method_or_option_is_refused_when_made(method, options, message):
    with pytest.raises(PlanError, match=f"^{message}"):
        Plan({Q: 4}, method, options)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_accepts_an_int_rank_at_full_rank(llama, method):
    table = find_projections(llama)
    Plan({n: p.full_rank for n, p in table.items()}, method).validate(table)


@pytest.mark.parametrize(
    "plan",
    [
        Plan({Q: 4, K: 16}),
        Plan({Q: (4, 8), K: [16, 3]}, "tucker2"),
        Plan({Q: 4}, "asvd", {"alpha": 0.25}),
        Plan(),
    ],
    ids=["svd", "tucker2-pairs", "asvd-options", "empty"],
)
def test_json_round_trip(plan, tmp_path):
    assert Plan.from_json(plan.to_json()) == plan
    data = json.loads(plan.to_json())
    assert data["format"] == PLAN_FORMAT and set(data) == {"format", "method", "method_options", "ranks"}
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    assert all(isinstance(r, (int, tuple)) for r in loaded.ranks.values())  # JSON lists become pairs


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"ranks": {', r"plan: not valid JSON \(.* at line 1 column \d+\)"),
        ("", r"plan: not valid JSON \(Expecting value at line 1 column 1\)"),
        ("[1, 2]", r"plan: expected an object, got list"),
        ('{"format": 2, "ranks": {}}', r"plan.format: 2 is not supported \(this dse reads 1\)"),
        ('{"format": "1", "ranks": {}}', r"plan.format: '1' is not supported"),
        ('{"ranks": {}, "rank": {}}', r"plan.rank: unknown key"),
        ('{"ranks": [["q", 1]]}', r"plan.ranks: expected an object of module name -> rank"),
        ('{"ranks": {}, "method": "svdd"}', r"plan.method: unknown method 'svdd' \(did you mean 'svd'\?\); known: "),
        ('{"ranks": {}, "method_options": [1]}', r"plan.method_options: expected an object"),
        ('{"ranks": {}, "method_options": {"alpha": 1}}', r"plan.method_options.alpha: svd has no such option"),
    ],
    ids=[
        "truncated",
        "empty",
        "list",
        "format-2",
        "format-string",
        "unknown-key",
        "ranks-list",
        "unknown-method",
        "options-list",
        "unknown-option",
    ],
)
def test_malformed_json_is_a_clear_plan_error(text, message):
    with pytest.raises(PlanError, match=f"^{message}"):
        Plan.from_json(text)


def test_format_is_optional_on_read():
    assert Plan.from_json('{"ranks": {"a": 1}}') == Plan({"a": 1})


def test_uniform_plan_by_rank_filters_and_clamps(llama):
    table = find_projections(llama)
    plan = uniform_plan(table, 20, types={"k", "down"}, layers={0, 2})
    assert list(plan.ranks) == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.2.self_attn.k_proj",
        "model.layers.2.mlp.down_proj",
    ]
    assert plan.ranks["model.layers.0.self_attn.k_proj"] == 16  # clamped to min(16, 32)
    assert plan.ranks["model.layers.0.mlp.down_proj"] == 20
    plan.validate(table)


def test_uniform_plan_by_ratio_uses_the_svdllm_rule(llama):
    table = find_projections(llama)
    plan = uniform_plan(table, ratio=0.5, method="svd")
    assert len(plan) == len(table) and plan.method == "svd"
    for name, p in table.items():  # r = int(m·n·(1 − R)/(m + n)), at least 1
        assert plan.ranks[name] == max(1, int(p.out_features * p.in_features * 0.5 / (p.out_features + p.in_features)))
    assert uniform_plan(table, ratio=0.999).ranks[Q] == 1


def test_uniform_plan_by_ratio_counts_the_tucker2_core(llama):
    table = find_projections(llama)
    plan = uniform_plan(table, ratio=0.5, method="tucker2")
    tucker2 = get_method("tucker2")
    for name, p in table.items():  # the largest (r, r) whose factors and r x r core fit the budget
        m, n = p.out_features, p.in_features
        r = plan.ranks[name]
        assert r[0] == r[1] and tucker2.params(r, m, n) <= 0.5 * m * n
        if r[0] < min(m, n):
            assert tucker2.params((r[0] + 1, r[0] + 1), m, n) > 0.5 * m * n


@pytest.mark.parametrize("kw", [{}, {"rank": 2, "ratio": 0.5}])
def test_uniform_plan_needs_exactly_one_of_rank_and_ratio(llama, kw):
    with pytest.raises(ValueError, match="give exactly one of rank and ratio"):
        uniform_plan(find_projections(llama), **kw)


def test_params_and_summary(llama):
    table = find_projections(llama)
    plan = Plan({Q: 2, K: 5})
    assert plan.params(table) == 2 * (32 + 32) + 5 * (16 + 32)
    assert Plan({Q: (2, 3)}, "tucker2").params(table) == 32 * 2 + 2 * 3 + 3 * 32
    assert plan.summary() == "2 modules, svd, rank 2..5"
    assert Plan({Q: 4}).summary() == "1 module, svd, rank 4"
    assert Plan().summary() == "dense"


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.9])
def test_ratio_baselines_keep_within_their_budget_for_every_method(method, ratio):
    """``{ratio: R}`` keeps at most ``(1 − R)`` of each projection's weights, at the largest such
    rank (Tucker-2's ``(r, r)`` core counted: its ranks are smaller than two factors')."""
    from dse.space import parse_baseline

    table = find_projections(make_tiny("llama"))
    plan = parse_baseline({"ratio": ratio}, "baselines[0]").plan(table, Plan({}, method).config, model_params=0)
    unit = METHODS[method]
    grown = (lambda r: (r[0] + 1, r[1] + 1)) if unit.pair_ranks else (lambda r: r + 1)
    for name, p in table.items():
        m, n, rank = p.out_features, p.in_features, plan.ranks[name]
        budget = (1 - ratio) * m * n
        assert unit.params(rank, m, n) <= budget or rank in (1, (1, 1))  # rank 1 is the floor
        assert unit.params(grown(rank), m, n) > budget or as_pair(rank)[0] == p.full_rank  # the largest
    assert plan.params(table) <= (1 - ratio) * sum(p.dense_params for p in table.values())
