"""decompose_ / restore_: full rank reproduces outputs, restore is bit-exact, the factor cache
(memory and disk) factorizes each weight once. Every registered method × every tiny family.

Tolerance: at full rank the float32 outputs match the dense ones to a relative Frobenius error of
1e-4 (factors are computed in float64 and cast once to float32, so the product differs from W by a
few float32 ulps per entry, amplified by the depth of the network).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, make_tiny, model_output
from helpers import assert_unchanged, calibration_for, full_rank_plan, random_plan, rel_err, snapshot, token_ids

from dse.core.errors import PlanError
from dse.decompose import (
    METHODS,
    FactorCache,
    LowRankLinear,
    Plan,
    decompose_,
    decomposed,
    is_decomposed,
    model_fingerprint,
    restore_,
    swap_module,
)
from dse.model import find_projections

FULL_RANK_RTOL = 1e-4
METHOD_NAMES = list(METHODS)
PLAIN_METHODS = [n for n in METHODS if not METHODS[n].config_cls.needs_calibration]


# --- tiny models: every family × every method ---------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_reproduces_outputs_and_restore_is_exact(family, method):
    model = make_tiny(family)
    ids = token_ids()
    ref = model_output(model, ids)
    snap = snapshot(model)
    table = find_projections(model)
    decompose_(model, full_rank_plan(table, method), calibration=calibration_for(model, method))
    assert is_decomposed(model)
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in table)
    assert rel_err(model_output(model, ids), ref) <= FULL_RANK_RTOL
    for name, dense in snap[1].items():  # LowRankLinear.to_dense gives back the kind of module
        back = model.get_submodule(name).to_dense()
        assert type(back) is type(dense) and back.weight.shape == dense.weight.shape
        assert rel_err(back.weight, dense.weight) <= FULL_RANK_RTOL
        assert (back.bias is None) == (dense.bias is None)
        assert dense.bias is None or torch.equal(back.bias, dense.bias)
    restore_(model)
    assert_unchanged(model, snap)
    assert torch.equal(model_output(model, ids), ref)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_random_plans_restore_bit_exact_and_reuse_the_cache(family, method):
    model = make_tiny(family)
    table = find_projections(model)
    snap = snapshot(model)
    calibration = calibration_for(model, method)
    cache = FactorCache()
    rng = random.Random(f"{family}-{method}")
    for _ in range(3):
        plan = random_plan(table, method, rng)
        decompose_(model, plan, cache=cache, calibration=calibration)
        for name, rank in plan.ranks.items():
            low = model.get_submodule(name)
            assert isinstance(low, LowRankLinear)
            assert low.ranks == ((rank[1], rank[0]) if isinstance(rank, tuple) else (rank,))
        restore_(model)
        assert_unchanged(model, snap)
    assert cache.misses == len(cache) <= len(table)  # each weight factorized at most once
    decompose_(model, full_rank_plan(table, method), cache=cache, calibration=calibration)
    assert cache.misses == len(table) and cache.hits >= 1
    restore_(model)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "family, method", [(f, "svd") for f in FAMILIES] + [("llama", m) for m in METHOD_NAMES if m != "svd"]
)
def test_dtype_is_kept(family, method, dtype):
    model = make_tiny(family, dtype=dtype)
    table = find_projections(model)
    snap = snapshot(model)
    decompose_(model, random_plan(table, method, random.Random(0)), calibration=calibration_for(model, method))
    lows = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lows and all(f.dtype == dtype for m in lows for f in m.factors)
    assert all(m.bias is None or m.bias.dtype == dtype for m in lows)
    out = model_output(model, token_ids())
    assert out.dtype == dtype and torch.isfinite(out).all()
    restore_(model)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device_is_kept(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    model = make_tiny("llama").to(device)
    table = find_projections(model)
    decompose_(model, full_rank_plan(table, "svd"))
    assert all(f.device.type == device for m in model.modules() if isinstance(m, LowRankLinear) for f in m.factors)
    assert model_output(model, token_ids().to(device)).device.type == device


# --- state errors ---------------------------------------------------------------------------


def test_decompose_twice_raises_and_keeps_the_first_decomposition():
    model = make_tiny("llama")
    table = find_projections(model)
    plan = Plan({n: 2 for n in list(table)[:3]})
    decompose_(model, plan)
    lows = {n: model.get_submodule(n) for n in plan.ranks}
    with pytest.raises(RuntimeError, match=r"already decomposed: call dse.restore_\(model\) first"):
        decompose_(model, plan)
    assert all(model.get_submodule(n) is m for n, m in lows.items())


def test_originals_are_kept_inside_the_low_rank_modules_and_nowhere_else():
    """As PEFT keeps ``base_layer``, but held, not registered: no state_dict key, parameter or
    named module of the decomposed model is an original's; the root model holds nothing."""
    model = make_tiny("llama")
    plan = Plan({n: 2 for n in list(find_projections(model))[:4]})
    dense = {n: model.get_submodule(n) for n in plan.ranks}
    before = set(vars(model))
    decompose_(model, plan)
    lows = {n: model.get_submodule(n) for n in plan.ranks}
    assert all(lows[n].original is m for n, m in dense.items())
    assert set(vars(model)) == before
    assert all(set(m.state_dict()) == {"factors.0", "factors.1"} for m in lows.values())
    originals = {id(p) for m in dense.values() for p in m.parameters()} | {id(m) for m in dense.values()}
    assert not originals & {id(p) for p in model.parameters()}
    assert not originals & {id(m) for m in model.modules()}
    assert sum(p.numel() for p in lows[next(iter(lows))].parameters()) == sum(
        f.numel() for f in lows[next(iter(lows))].factors
    )
    restore_(model)
    assert all(model.get_submodule(n) is m for n, m in dense.items())


def test_restore_leaves_low_rank_modules_without_an_original():
    model = make_tiny("llama")
    name = next(iter(find_projections(model)))
    dense = model.get_submodule(name)
    shell = LowRankLinear.from_linear(dense, [torch.ones(2, dense.in_features), torch.ones(dense.out_features, 2)])
    swap_module(model, name, shell)
    assert shell.original is None and not is_decomposed(model)
    restore_(model)
    assert model.get_submodule(name) is shell


def test_restore_of_a_dense_model_is_a_no_op():
    model = make_tiny("gpt2")
    snap = snapshot(model)
    restore_(model)
    assert_unchanged(model, snap)


def test_decomposed_restores_after_the_block_and_after_an_error():
    model = make_tiny("llama")
    snap = snapshot(model)
    plan = random_plan(find_projections(model), "svd", random.Random(0))
    with decomposed(model, plan) as same:
        assert same is model and is_decomposed(model)
        assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in plan.ranks)
    assert not is_decomposed(model)
    assert_unchanged(model, snap)
    with pytest.raises(ZeroDivisionError):
        with decomposed(model, plan):
            1 / 0
    assert_unchanged(model, snap)
    with decomposed(model, Plan({})):  # the dense model: nothing swapped, nothing to restore
        assert not is_decomposed(model)


@pytest.mark.parametrize("method", [n for n in METHODS if METHODS[n].config_cls.needs_calibration])
def test_data_aware_method_without_calibration_is_a_plan_error(method):
    model = make_tiny("llama")
    snap = snapshot(model)
    table = find_projections(model)
    with pytest.raises(PlanError, match=rf"^plan.method: {method} needs calibration"):
        decompose_(model, full_rank_plan(table, method))
    assert_unchanged(model, snap)


# --- factor cache on disk -----------------------------------------------------------------------


@pytest.mark.parametrize("method", PLAIN_METHODS)
def test_disk_cache_is_reused_by_a_second_cache_object(tmp_path, method):
    model = make_tiny("gpt2")
    table = find_projections(model)
    plan = full_rank_plan(table, method)
    ids = token_ids()
    first = FactorCache(tmp_path)
    decompose_(model, plan, cache=first)
    out_first = model_output(model, ids)
    restore_(model)
    assert first.misses == len(table) and first.hits == 0

    second = FactorCache(tmp_path)
    decompose_(model, plan, cache=second)
    assert second.misses == 0 and second.hits == len(table)
    assert torch.equal(model_output(model, ids), out_first)


def test_corrupted_cache_file_is_recomputed(tmp_path):
    model = make_tiny("llama")
    table = find_projections(model)
    plan = full_rank_plan(table, "svd")
    decompose_(model, plan, cache=FactorCache(tmp_path))
    restore_(model)
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == len(table)
    files[0].write_bytes(b"not a torch file")
    files[1].write_bytes(files[1].read_bytes()[:100])  # torn write

    cache = FactorCache(tmp_path)
    decompose_(model, plan, cache=cache)
    assert cache.misses == 2 and cache.hits == len(table) - 2
    restore_(model)
    again = FactorCache(tmp_path)  # the recomputed files were written back
    decompose_(model, plan, cache=again)
    assert again.misses == 0


def test_methods_do_not_share_cache_entries():
    model = make_tiny("opt")
    table = find_projections(model)
    cache = FactorCache()
    for method in PLAIN_METHODS:
        decompose_(model, full_rank_plan(table, method), cache=cache)
        restore_(model)
    assert cache.misses == len(cache) == len(PLAIN_METHODS) * len(table)


def test_changing_a_weight_in_place_changes_the_fingerprint():
    """The fingerprint is read from the weights: an in-place change gives a new one, undoing it
    gives the old one back, and nothing is stored on the model."""
    model = make_tiny("llama")
    table = find_projections(model)
    before, attributes = model_fingerprint(model, table), set(vars(model))
    weight = model.get_submodule(next(iter(table))).weight
    first = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = first + 1.0
    assert model_fingerprint(model, table) != before
    with torch.no_grad():
        weight[0, 0] = first
        weight.mul_(2.0)
    assert model_fingerprint(model, table) != before
    with torch.no_grad():
        weight.div_(2.0)
    assert model_fingerprint(model, table) == before and set(vars(model)) == attributes


def test_weights_changed_in_place_are_factorized_again():
    """The cache key holds the model fingerprint: after an in-place update (an optimizer step, a
    load_state_dict) the same cache gives factors of the new weights, not the stale ones."""
    model = make_tiny("llama")
    table = find_projections(model)
    name = next(iter(table))
    plan = full_rank_plan(table, "svd")
    ids = token_ids()
    cache = FactorCache()
    decompose_(model, plan, cache=cache)
    restore_(model)
    with torch.no_grad():
        model.get_submodule(name).weight.mul_(2.0)
    dense = model_output(model, ids)
    decompose_(model, plan, cache=cache)
    assert cache.misses == 2 * len(table)
    assert rel_err(model_output(model, ids), dense) < FULL_RANK_RTOL


# --- the real SmolLM2 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache():
    """One factor cache shared by the SmolLM2 tests of this file (each weight factorized once)."""
    return FactorCache()


@pytest.mark.slow
def test_smollm2_full_rank_reproduces_logits(smollm2, smollm2_cache):
    model, tokenizer = smollm2
    ids = tokenizer(
        "The capital of France is Paris. Low-rank factors of a weight matrix", return_tensors="pt"
    ).input_ids
    ref = model_output(model, ids)
    table = find_projections(model)
    assert len(table) == 210
    decompose_(model, full_rank_plan(table, "svd"), cache=smollm2_cache)
    try:
        assert rel_err(model_output(model, ids), ref) <= FULL_RANK_RTOL
    finally:
        restore_(model)
    assert torch.equal(model_output(model, ids), ref)


@pytest.mark.slow
def test_smollm2_100_random_cycles_are_bit_exact(smollm2, smollm2_cache):
    model, _ = smollm2
    table = find_projections(model)
    snap = snapshot(model)
    _, dense_modules = snap
    rng = random.Random(2024)
    for _ in range(100):
        plan = random_plan(table, "svd", rng)
        decompose_(model, plan, cache=smollm2_cache)
        assert all(model.get_submodule(n).ranks == (r,) for n, r in plan.ranks.items())
        restore_(model)
        assert all(model.get_submodule(n) is m for n, m in dense_modules.items())
    assert_unchanged(model, snap)  # every parameter and buffer bit-exact after the 100 cycles
