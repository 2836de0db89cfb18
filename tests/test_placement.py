"""Models spread by a device map: every layer of every family alternately on the CPU and offloaded
to disk (weights on ``meta`` between calls), against the same model on one device; and the map of
a GPU host (``cuda:0`` + CPU offload) where one is present.

Offloaded modules must be decomposed from their real weights, with factors on their execution
device, and come back exactly; calibration (both walks), evaluation, apply and a whole study must
give what the model on one device gives.
"""

from __future__ import annotations

import random

import pytest
import torch
import yaml
from conftest import BENCHMARKS, FAMILIES, make_tiny, model_output
from helpers import dispatched, offload_map, random_plan, save_tiny_llama, token_ids

from dse.decompose import (
    METHODS,
    Calibration,
    LowRankLinear,
    StatsStore,
    collect_calibration,
    collect_stats,
    decompose_,
    restore_,
    uniform_plan,
)
from dse.decompose.calibration import _stream
from dse.evaluate import perplexity, tokens_per_second
from dse.model import execution_device, find_projections, is_offloaded, load_model

CAUSAL = [f for f in FAMILIES if f != "bert"]  # bert has no causal LM to load with a device map


@pytest.fixture(params=CAUSAL)
def pair(request, tmp_path):
    """(the tiny model on the CPU, the same weights with odd layers offloaded to disk)."""
    plain = make_tiny(request.param)
    spread = dispatched(plain, tmp_path, offload_map(plain))
    assert any(is_offloaded(m) for m in spread.modules())
    return plain, spread


def _calibration(model, ids, method: str):
    config = METHODS[method].config_cls
    if not config.needs_calibration:
        return None
    return collect_calibration(model, ids, f"cal-{method}", batch_size=4, grad_moments=config.needs_grad_moments)


@pytest.mark.parametrize("method", list(METHODS))
def test_offloaded_modules_decompose_from_their_real_weights(pair, method):
    plain, spread = pair
    ids = token_ids(batch=8, length=16, seed=2)
    table = find_projections(plain)
    assert find_projections(spread) == table
    plan = random_plan(table, method, random.Random(method))
    dense = model_output(plain, ids)
    # output-gradient moments depend on the loss, and bert_mlm reloads as BertLMHeadModel (a causal
    # loss, not BertForMaskedLM's): the plain model's moments serve both
    moments = _calibration(plain, ids, method) if METHODS[method].config_cls.needs_grad_moments else None
    for model in (plain, spread):
        decompose_(model, plan, calibration=moments or _calibration(model, ids, method))
    for name in plan.ranks:
        module = spread.get_submodule(name)
        assert isinstance(module, LowRankLinear) and all(f.device.type == "cpu" for f in module.factors)
    torch.testing.assert_close(model_output(spread, ids), model_output(plain, ids), rtol=0, atol=1e-6)
    for model in (plain, spread):
        restore_(model)
    offloaded = [n for n in table if is_offloaded(spread.get_submodule(n))]
    assert offloaded and all(spread.get_submodule(n).weight.is_meta for n in offloaded)
    assert torch.equal(model_output(spread, ids), dense)


def test_both_calibration_walks_read_offloaded_layers(pair):
    plain, spread = pair
    ids = token_ids(batch=6, length=16, seed=3)
    reference, aliases, _ = collect_stats(plain, ids, batch_size=4)
    at_once, _, _ = collect_stats(spread, ids, batch_size=4)
    seen = {}
    cal = Calibration("streamed", {}, store=StatsStore.temporary())
    _stream(
        spread,
        ids,
        cal,
        batch_size=4,
        progress=False,
        on_layer=lambda names, c: seen.update({n: c.stats_for(n).xtx.clone() for n in names if n in c.stats}),
    )
    assert cal.aliases == aliases and set(seen) == set(reference)
    for name, stats in reference.items():
        assert torch.equal(at_once[name].xtx, stats.xtx) and torch.equal(seen[name], stats.xtx)


def test_evaluation_of_an_offloaded_model(pair):
    plain, spread = pair
    windows = token_ids(batch=4, length=24, seed=4)
    assert perplexity(spread, windows, batch_size=2) == perplexity(plain, windows, batch_size=2)
    prompt = token_ids(batch=1, length=8, seed=5)
    assert tokens_per_second(spread, prompt, new_tokens=3, repeats=1) > 0


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_llama(tmp_path / "tiny")


def test_apply_reads_offloaded_weights(tiny_dir, tmp_path):
    from dse.decompose import model_fingerprint
    from dse.results.compressed import apply_config, load_compressed
    from dse.results.rankconfig import RankConfig

    plain, tokenizer = load_model(str(tiny_dir))
    table = find_projections(plain)
    plan = uniform_plan({n: p for n, p in table.items() if p.layer in (0, 1)}, 4)
    config = RankConfig(str(tiny_dir), model_fingerprint(plain, table), "float32", plan)
    spread_map = offload_map(plain)
    apply_config(config, tmp_path / "lowrank", device_map=spread_map)
    apply_config(config, tmp_path / "merged", device_map=spread_map, merge=True)
    ids = token_ids(batch=2, length=12, seed=6)
    decompose_(plain, plan)
    try:
        expected = model_output(plain, ids)
    finally:
        restore_(plain)
    for folder in ("lowrank", "merged"):
        reloaded, _ = load_compressed(tmp_path / folder)
        torch.testing.assert_close(model_output(reloaded, ids), expected, rtol=0, atol=1e-5)


def test_auto_map_offloads_past_max_memory(tiny_dir, tmp_path):
    plain, _ = load_model(str(tiny_dir))
    spread, _ = load_model(
        str(tiny_dir), device_map="auto", max_memory={"cpu": 60_000}, offload_dir=str(tmp_path / "off")
    )
    assert "disk" in set(spread.hf_device_map.values())
    ids = token_ids(batch=2, length=12, seed=7)
    plan = uniform_plan(find_projections(plain), 3)
    for model in (plain, spread):
        decompose_(model, plan)
    torch.testing.assert_close(model_output(spread, ids), model_output(plain, ids), rtol=0, atol=1e-6)


def test_a_study_with_a_device_map_measures_what_one_device_measures(tiny_dir, tmp_path):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    from dse.study.config import load_study_config
    from dse.study.runner import run_study

    plain, _ = load_model(str(tiny_dir))
    base = {
        "model": str(tiny_dir),
        "n_trials": 3,
        "sampler": "random",
        "objectives": ["perplexity", "params"],
        "space": {"name": "t", "model": str(tiny_dir), "ranks": [2, 4, "dense"], "group": "layer"},
        "method": "svdllm",
        "baselines": ["dense", {"ratio": 0.3}],
        "calibration": {
            "text": {
                "path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"),
                "field": "page",
                "rows": [40, 42],
            },
            "n_samples": 4,
            "seq_len": 32,
        },
        "evaluation": {
            "tasks": [],
            "perplexity": {
                "text": {
                    "path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"),
                    "field": "page",
                    "rows": [0, 1],
                },
                "window": 32,
                "max_tokens": 128,
            },
        },
    }
    values = {}
    for name, extra in (
        ("one", {}),
        (
            "spread",
            {
                "device_map": offload_map(plain),
                "offload_dir": "off",
                "calibration": {**base["calibration"], "streamed": True},
            },
        ),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "name": name, **extra}))
        study = run_study(load_study_config(path), progress=False)
        values[name] = [t.values for t in study.trials]
        assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len(values["one"]) == 3
    for a, b in zip(values["one"], values["spread"]):
        assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-4)  # svdllm from float32-stored statistics


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine (a map over cuda:0 and CPU offload needs one)"
)
@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_and_cpu_offload_map(tmp_path, method):
    plain = make_tiny("llama")
    spread = dispatched(plain, tmp_path, offload_map(plain, layer=lambda i: "cpu" if i % 2 else 0, rest=0))
    ids = token_ids(batch=8, length=16, seed=8)
    table = find_projections(plain)
    offloaded = [n for n in table if is_offloaded(spread.get_submodule(n))]
    assert offloaded and all(execution_device(spread.get_submodule(n)).type == "cuda" for n in table)
    plan = uniform_plan(table, 4, method=method)
    dense = model_output(spread, ids)
    for model in (plain, spread):
        decompose_(model, plan, calibration=_calibration(model, ids, method))
    for name in table:
        assert all(f.is_cuda for f in spread.get_submodule(name).factors)
    torch.testing.assert_close(model_output(spread, ids).cpu(), model_output(plain, ids), rtol=1e-4, atol=1e-4)
    for model in (plain, spread):
        restore_(model)
    assert torch.equal(model_output(spread, ids), dense)
    cal = Calibration("cuda", {}, store=StatsStore.temporary())
    _stream(spread, ids, cal, batch_size=4, on_layer=None, progress=False)
    reference, _, _ = collect_stats(plain, ids, batch_size=4)
    for name, stats in reference.items():
        torch.testing.assert_close(cal.stats_for(name).xtx.double(), stats.xtx, rtol=1e-4, atol=1e-5)
