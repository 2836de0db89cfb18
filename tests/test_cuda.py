"""The core on a real CUDA device: every method, calibration with gradients, allocation, perplexity.

Skipped where no CUDA device is present (this project's CI); run where one is lent (see README).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny
from helpers import full_rank_plan, token_ids

from dse.decompose import (
    METHODS,
    Calibration,
    FactorCache,
    collect_calibration,
    collect_stats,
    decompose_,
    factor_forms,
    make_config,
    restore_,
    uniform_plan,
)
from dse.evaluate import perplexity
from dse.model import find_projections
from dse.space import Budget, allocate, importance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def cuda_model(dtype):
    return make_tiny("llama", dtype=dtype).cuda()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_cuda(method, dtype, tol):
    model = cuda_model(dtype)
    ids = token_ids(batch=4, length=16, seed=0).cuda()
    calibration = collect_calibration(model, ids, f"cuda-{method}", gradients=True, grad_moments=True)
    assert all(s.xtx.is_cuda and s.xtx.dtype == torch.float64 for s in calibration.stats.values())
    assert all(m.is_cuda and m.dtype == torch.float64 for m in calibration.grad_moments.values())
    table = find_projections(model)
    with torch.no_grad():
        dense = model(ids).logits.float()
    cache = FactorCache()
    decompose_(model, full_rank_plan(table, method), cache=cache, calibration=calibration)
    with torch.no_grad():
        full = model(ids).logits.float()
    restore_(model)
    assert (full - dense).abs().max() <= tol * dense.abs().max()
    plan = uniform_plan(table, ratio=0.5, method=method) if not METHODS[method].pair_ranks else None
    if plan is not None:
        decompose_(model, plan, cache=cache, calibration=calibration)
        factors = [p for n in plan.ranks for p in model.get_submodule(n).parameters()]
        assert all(p.is_cuda and p.dtype == dtype for p in factors)
        assert perplexity(model, ids) > 1
        restore_(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits.float(), dense)


def test_allocation_on_cuda():
    model = cuda_model(torch.float32)
    ids = token_ids(batch=4, length=16, seed=1).cuda()
    stats, aliases, grads = collect_stats(model, ids, gradients=True)
    calibration = Calibration("cuda-alloc", stats, aliases, grads)
    assert all(g.is_cuda for g in grads.values())
    table = find_projections(model)
    forms = factor_forms(model, table, make_config("svdllm"), calibration=calibration, table=table)
    importances = {n: importance(f, grads[n], calibration.stats_for(n).xtx) for n, f in forms.items()}
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in importances.values())
    budget = Budget(ratio=0.3).kept(table, 0)
    ranks = allocate(table, importances, budget, dict.fromkeys(table, 1.0))
    used = sum(r * (table[n].out_features + table[n].in_features) for n, r in ranks.items()) + sum(
        p.out_features * p.in_features for n, p in table.items() if n not in ranks
    )
    assert used <= budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latency_table_and_speed_on_cuda(dtype):
    from dse.decompose import Plan
    from dse.decompose.latency import Workload, measure_table
    from dse.evaluate.speed import SpeedConfig, measure_speed

    model = cuda_model(dtype)
    table = find_projections(model)
    lt = measure_table(model, table, Workload(prompt=16), repeats=2, cold_bytes=2**24)
    assert lt.environment["device"] == torch.cuda.get_device_name() and lt.environment["dtype"] == str(dtype)[6:]
    assert lt.predict(Plan({}), table)["predicted_decode_ms"] > 0
    report = measure_speed(model, None, SpeedConfig(prompt=16, batch=2, new_tokens=4, repeats=2))
    assert report.device_peak_bytes > 0 and report.decode_tokens_per_s > 0


def test_compiled_decode_on_cuda():
    """CUDA graphs (``mode="reduce-overhead"``) over the static cache give the eager tokens."""
    from dse.evaluate.speed import SpeedConfig, measure_speed
    from dse.model.timing import CompiledDecode, decode, prefill

    model = cuda_model(torch.float32)
    decompose_(model, uniform_plan(find_projections(model), 4))
    ids = token_ids(batch=2, length=6).cuda()
    compiled = CompiledDecode(model, max_len=12)
    for steps in (1, 5):
        eager, fast = decode(model, prefill(model, ids), steps), compiled.decode(compiled.prefill(ids), steps)
        torch.testing.assert_close(fast.logits[:, -1], eager.logits[:, -1], rtol=1e-4, atol=1e-4)
    report = measure_speed(model, None, SpeedConfig(prompt=8, batch=2, new_tokens=3, repeats=2, compile=True))
    assert report.compile_seconds > 0 and report.decode_tokens_per_s > 0
