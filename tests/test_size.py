"""Size accounting: plan_size predicts exactly the parameters and bytes the decomposed model has."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, make_tiny
from helpers import calibration_for, random_plan

from dse.decompose import METHODS, Plan, decompose_, plan_size, restore_
from dse.model import find_projections, model_bytes, param_count

# SmolLM2-135M projection shapes (out, in): hidden 576, 3 kv heads of 64, MLP 1536.
SMOLLM2_SHAPES = {
    "q": (576, 576),
    "k": (192, 576),
    "v": (192, 576),
    "o": (576, 576),
    "gate": (1536, 576),
    "up": (1536, 576),
    "down": (576, 1536),
}


def assert_prediction_matches(model, plan, calibration=None) -> None:
    table = find_projections(model)
    report = plan_size(model, plan, table)
    assert report.params_before == param_count(model)
    assert report.bytes_before == model_bytes(model)
    decompose_(model, plan, calibration=calibration)
    try:
        assert report.params_after == param_count(model)
        assert report.bytes_after == model_bytes(model)
    finally:
        restore_(model)
    assert report.params_before - report.params_after == sum(
        p.out_features * p.in_features for n, p in table.items() if n in plan.ranks
    ) - plan.params(table)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_size_matches_the_decomposed_model(family, method):
    model = make_tiny(family)
    plan = random_plan(find_projections(model), method, random.Random(f"size-{family}-{method}"))
    assert_prediction_matches(model, plan, calibration_for(model, method))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bytes_follow_the_dtype(dtype):
    model = make_tiny("llama", dtype=dtype)
    table = find_projections(model)
    plan = Plan({n: 2 for n in table})
    report = plan_size(model, plan, table)
    assert report.bytes_before - report.bytes_after == 2 * (report.params_before - report.params_after)
    assert_prediction_matches(model, plan)


def test_report_ratios_and_flops():
    model = make_tiny("opt")
    table = find_projections(model)
    plan = Plan({n: 1 for n in table})
    report = plan_size(model, plan, table)
    dense = sum(p.out_features * p.in_features for p in table.values())
    assert report.flops_before == 2 * dense  # one multiply-add = 2 FLOPs per token
    assert report.flops_after == 2 * sum(p.out_features + p.in_features for p in table.values())
    assert report.params_ratio == report.params_after / report.params_before
    assert report.compression == pytest.approx(1 - report.params_ratio, abs=1e-15)
    d = report.as_dict()
    assert d["params"] == report.params_after and d["bytes_base"] == report.bytes_before
    assert plan_size(model, Plan(), table).params_after == report.params_before  # empty plan: dense


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("svd", 0), ("tucker2", 1)])
def test_smollm2_rank1_three_layers_by_hand(smollm2, method, extra):
    """3 layers × 7 types at rank 1. By hand: rank 1 of an m × n weight keeps m + n parameters
    (svd) or m + 1 + n (tucker2, its 1 × 1 core), so each module removes m·n − (m + n + extra)."""
    model, _ = smollm2
    table = find_projections(model)
    layers = [0, 14, 29]
    plan = Plan({n: 1 for n, p in table.items() if p.layer in layers}, method)
    assert len(plan) == 21
    assert {p.type: (p.out_features, p.in_features) for p in table.values()} == SMOLLM2_SHAPES

    removed_per_layer = sum(m * n - (m + n + extra) for m, n in SMOLLM2_SHAPES.values())
    assert removed_per_layer == 3_538_944 - (10_176 + 7 * extra)  # dense layer minus rank-1 layer
    removed = len(layers) * removed_per_layer
    dense_params, dense_bytes = param_count(model), model_bytes(model)
    assert dense_params == 134_515_008  # tied embeddings counted once
    assert model.dtype == torch.float32

    report = plan_size(model, plan, table)
    assert report.params_after == dense_params - removed
    assert report.bytes_after == dense_bytes - 4 * removed
    decompose_(model, plan)
    try:
        assert param_count(model) == dense_params - removed
        assert model_bytes(model) == dense_bytes - 4 * removed
    finally:
        restore_(model)
    assert param_count(model) == dense_params and model_bytes(model) == dense_bytes
