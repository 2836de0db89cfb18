"""Streamed calibration (layer by layer) against the calibration at once, for every family, and its
float32 statistics store."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny
from helpers import CharTokenizer as Tok
from helpers import char_spec as _spec
from helpers import rel_err, token_ids

from dse.decompose import (
    METHODS,
    Calibration,
    StatsStore,
    calibrate,
    collect_calibration,
    collect_stats,
    decompose_,
    factor_forms,
    restore_,
    uniform_plan,
)
from dse.decompose.calibration import _stream
from dse.decompose.stats import pack_symmetric, unpack_symmetric
from dse.model import find_projections

DATA_AWARE = [m for m in METHODS if METHODS[m].config_cls.needs_calibration]


def streamed(model, ids, on_layer=None, grad_moments=None) -> Calibration:
    """The streamed walk; ``grad_moments`` (output-gradient moments gathered before) go to its store."""
    cal = Calibration("streamed", {}, store=StatsStore.temporary(), grad_moments=dict(grad_moments or {}))
    _stream(model, ids, cal, batch_size=4, on_layer=on_layer, progress=False)
    return cal


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_statistics_equal_the_statistics_at_once(family):
    model = make_tiny(family)
    ids = token_ids(batch=10, length=16, seed=1)
    at_once, aliases, _ = collect_stats(model, ids, batch_size=4)
    table = find_projections(model)
    layers, held = [], {}

    def on_layer(names, cal):
        layers.append(names)
        held.update({n: cal.stats_for(n).xtx.clone() for n in names if n in cal.stats})

    cal = streamed(model, ids, on_layer)
    assert layers == [[n for n, p in table.items() if p.layer == i] for i in range(len(layers))]
    assert cal.aliases == aliases and not cal.stats  # every statistic released to the store
    for name, stats in at_once.items():
        assert torch.equal(held[name], stats.xtx)  # bit for bit while in memory
        stored = cal.stats_for(name)
        assert stored.xtx.dtype == torch.float32 and stored.tokens == stats.tokens == ids.numel()
        assert torch.equal(stored.xtx, stats.xtx.float()) and torch.equal(stored.abs_mean, stats.abs_mean.float())
    one_layer = max(sum(s.nbytes for n, s in at_once.items() if table[n].layer == i) for i in range(len(layers)))
    assert one_layer < cal.peak_bytes < sum(s.nbytes for s in at_once.values())


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_symmetric_packing_round_trips(n):
    a = torch.randn(n, n, dtype=torch.float64)
    m = a @ a.T
    m = (m + m.T) / 2  # a matmul kernel need not give a bit-symmetric a @ aᵀ
    packed = pack_symmetric(m)
    assert packed.numel() == n * (n + 1) // 2 and torch.equal(unpack_symmetric(packed, n), m)


def test_the_walk_is_not_part_of_the_key_and_gradients_come_in_a_pass_of_their_own(tmp_path):
    model = make_tiny("llama")
    at_once = calibrate(model, Tok(), _spec(tmp_path, False), gradients=True, progress=False)
    cal = calibrate(model, Tok(), _spec(tmp_path, True), cache_dir=tmp_path / "cache", gradients=True, progress=False)
    assert cal.key == at_once.key and set(cal.grads) == set(at_once.grads) == set(find_projections(model))
    for name, g in at_once.grads.items():
        torch.testing.assert_close(cal.grads[name], g, rtol=1e-12, atol=0)
    again = calibrate(model, Tok(), _spec(tmp_path, True), cache_dir=tmp_path / "cache", gradients=True, progress=False)
    assert again.key == cal.key and set(again.grads) == set(cal.grads)  # read back, gradients included
    assert _spec(tmp_path, True).to_dict()["streamed"] is True and "streamed" not in _spec(tmp_path, False).to_dict()


def test_an_incomplete_store_is_gathered_again(tmp_path):
    model = make_tiny("llama")
    spec = _spec(tmp_path, True)
    first = calibrate(model, Tok(), spec, cache_dir=tmp_path, progress=False)
    (first.store.directory / "index.pt").write_bytes(b"torn")
    again = calibrate(model, Tok(), spec, cache_dir=tmp_path, progress=False)
    assert again.store.read_index()["key"] == first.key
    name = next(iter(find_projections(model)))
    assert torch.equal(again.stats_for(name).xtx, first.stats_for(name).xtx)


@pytest.mark.parametrize("method", DATA_AWARE)
def test_factors_from_the_float32_store_match(method):
    model = make_tiny("llama")
    ids = token_ids(batch=12, length=16, seed=2)
    table = find_projections(model)
    config = METHODS[method].config_cls()
    exact_cal = collect_calibration(model, ids, "k", batch_size=4, grad_moments=config.needs_grad_moments)
    exact = factor_forms(model, table, config, calibration=exact_cal)
    stored_cal = streamed(model, ids, grad_moments=exact_cal.grad_moments)
    stored = factor_forms(model, table, config, calibration=stored_cal)
    for name, form in exact.items():  # single vectors of near-equal singular values may turn; truncations agree
        assert rel_err(stored[name].S, form.S) < 1e-5, name
        for r in (table[name].full_rank // 4, table[name].full_rank // 2):
            truncated = [(f.U[:, :r] * f.S[:r]) @ f.Vh[:r] for f in (stored[name], form)]
            assert rel_err(*truncated) < 1e-5, (name, r)
    plan = uniform_plan(table, 3, method=method)
    decompose_(model, plan, calibration=stored_cal)
    restore_(model)


def test_a_measurer_factorizes_inside_the_layer_loop(tmp_path, tiny_llama_dir):
    from conftest import BENCHMARKS
    from helpers import write_study

    from dse.study.config import load_study_config
    from dse.study.measure import Measurer

    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    calibration = {
        "text": {
            "path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"),
            "field": "page",
            "rows": [40, 41],
        },
        "n_samples": 4,
        "seq_len": 32,
        "streamed": True,
    }
    path = write_study(
        tmp_path,
        tiny_llama_dir,
        method="svdllm",
        calibration=calibration,
        cache={"memory": "cpu"},
        evaluation={"tasks": [], "latency": True},
        objectives=["latency", "params"],
    )
    measurer = Measurer.from_config(load_study_config(path), progress=False)
    assert measurer.cache.misses == len(measurer.table) == len(measurer.cache)  # every form made in the loop
    assert not measurer.calibration.stats and measurer.calibration.store is not None
    assert all(f.U.device.type == "cpu" for f in measurer.cache._mem.values())
    measurer.measure(uniform_plan(measurer.table, 2, method=measurer.config.method))
    assert measurer.cache.misses == len(measurer.table)  # the trial only truncated
