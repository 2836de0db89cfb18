"""Data-aware methods (asvd, svdllm) and calibration statistics: exact math and real models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, model_output
from helpers import CharTokenizer as Tok
from helpers import char_spec

from dse.core.errors import PlanError
from dse.decompose import (
    Calibration,
    CalibrationSpec,
    InputStats,
    Plan,
    calibrate,
    collect_stats,
    decompose_,
    get_method,
    make_config,
    restore_,
    uniform_plan,
)
from dse.model import TextSource, find_projections

DATA_AWARE = ("asvd", "svdllm")


def stats_of(x: torch.Tensor) -> InputStats:
    stats = InputStats.zeros(x.shape[-1])
    stats.add(x)
    return stats.finish()


def factor_product(method: str, weight: torch.Tensor, rank: int, stats=None, **options) -> torch.Tensor:
    m = get_method(method)
    form = m.factorize(weight.double(), make_config(method, options), stats)
    factors = m.truncate(form, rank)
    product = factors[-1]
    for f in reversed(factors[:-1]):
        product = product @ f
    return product


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(24, 16, dtype=torch.float64)


@pytest.fixture
def inputs():
    torch.manual_seed(1)
    # correlated, unevenly scaled channels, as LLM activations are
    return torch.randn(200, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64) * 3


@pytest.mark.parametrize("method", DATA_AWARE)
def test_full_rank_is_exact(method, weight, inputs):
    full = factor_product(method, weight, 16, stats_of(inputs))
    torch.testing.assert_close(full, weight, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", DATA_AWARE)
def test_identity_statistics_reduce_to_svd(method, weight):
    identity = InputStats(torch.ones(16, dtype=torch.float64), torch.eye(16, dtype=torch.float64), 16)
    for rank in (1, 5, 12):
        torch.testing.assert_close(
            factor_product(method, weight, rank, identity), factor_product("svd", weight, rank), rtol=0, atol=1e-10
        )


@pytest.mark.parametrize("rows", [24, 10], ids=["tall", "wide"])  # both eigenproblem sides
def test_svdllm_error_is_the_tail_of_its_singular_values(rows, inputs):
    torch.manual_seed(0)
    weight = torch.randn(rows, 16, dtype=torch.float64)
    stats = stats_of(inputs)  # 200 tokens, 16 channels: XᵀX is positive definite, no regularizer needed
    form = get_method("svdllm").factorize(weight, make_config("svdllm", {"jitter": 0.0}), stats)
    for rank in (2, 8, min(rows, 16) - 1):
        err = ((weight - factor_product("svdllm", weight, rank, stats, jitter=0.0)) @ inputs.T).norm() ** 2
        tail = len(inputs) * (form.S[rank:] ** 2).sum()  # xtx is XᵀX / N
        assert err.item() == pytest.approx(tail.item(), rel=1e-8)
        # and it is never worse than plain SVD in that norm
        assert err <= ((weight - factor_product("svd", weight, rank)) @ inputs.T).norm() ** 2 * (1 + 1e-9)


@pytest.mark.parametrize("method", DATA_AWARE)
@pytest.mark.parametrize("case", ["few_tokens", "zero_channel", "all_zero"])
def test_degenerate_statistics_give_finite_factors(method, case, weight, inputs):
    x = {
        "few_tokens": inputs[:5],
        "all_zero": torch.zeros(8, 16, dtype=torch.float64),
        "zero_channel": inputs.clone().index_fill_(1, torch.tensor([3, 7]), 0.0),
    }[case]
    stats = stats_of(x)
    form = get_method(method).factorize(weight, make_config(method), stats)
    for t in (form.U, form.S, form.Vh):
        assert torch.isfinite(t).all()
    product = factor_product(method, weight, 4, stats)
    assert torch.isfinite(product).all()
    if case != "all_zero":  # the data-weighted error is still small in the directions seen
        err = ((weight - product) @ x.T).norm() / (weight @ x.T).norm()
        assert err < 1.0


@pytest.mark.parametrize("rows", [24, 10], ids=["tall", "wide"])
def test_svdllm_survives_an_indefinite_second_moment(rows):
    """Rounding can make XᵀX indefinite (seen on SmolLM2 layer 18 o_proj): no Cholesky, no failure."""
    torch.manual_seed(2)
    weight = torch.randn(rows, 16, dtype=torch.float64)
    xtx = torch.diag(torch.cat([torch.ones(15, dtype=torch.float64), torch.tensor([-1e-3], dtype=torch.float64)]))
    stats = InputStats(torch.ones(16, dtype=torch.float64), xtx, 100)
    form = get_method("svdllm").factorize(weight, make_config("svdllm"), stats)
    assert all(torch.isfinite(t).all() for t in (form.U, form.S, form.Vh))
    assert (form.S[:-1] >= form.S[1:]).all()  # descending
    # the result is that of the positive part, up to the size of the negative one (1e-3)
    clamped = InputStats(stats.abs_mean, xtx.clamp(min=0), 100)
    torch.testing.assert_close(
        factor_product("svdllm", weight, 5, stats), factor_product("svdllm", weight, 5, clamped), rtol=0, atol=1e-3
    )


def test_options_change_the_cache_key():
    assert make_config("svdllm", {"jitter": 1e-4}).key() != make_config("svdllm").key()
    assert make_config("asvd", {"alpha": 1.0}).key() != make_config("asvd").key()


@pytest.mark.parametrize("method", DATA_AWARE)
def test_decompose_without_calibration_names_the_method(method):
    model = make_tiny("llama")
    plan = uniform_plan(find_projections(model), 4, method=method)
    with pytest.raises(PlanError, match=method):
        decompose_(model, plan)


def tiny_calibration(model, n_tokens=64) -> Calibration:
    torch.manual_seed(3)
    stats, aliases, _ = collect_stats(model, torch.randint(0, 97, (4, n_tokens // 4)), batch_size=2)
    return Calibration("tiny", stats, aliases)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_calibration_shares_inputs(model_type):
    model = make_tiny(model_type)
    table = find_projections(model)
    cal = tiny_calibration(model)
    per_layer = {"llama": 4, "gpt2": 4, "opt": 4}[model_type]
    n_layers = len({p.layer for p in table.values()})
    assert len(cal.stats) == per_layer * n_layers
    assert set(cal.stats) | set(cal.aliases) == set(table)
    for name, p in table.items():
        stats = cal.stats_for(name)
        assert stats.xtx.shape == (p.in_features, p.in_features) and stats.tokens == 64
        assert stats.xtx.dtype == torch.float64


def test_statistics_match_the_inputs():
    model = make_tiny("llama")
    name = "model.layers.1.mlp.down_proj"
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    cal = tiny_calibration(model)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    stats = cal.stats_for(name)
    # each batch's sums are float32 (the model's dtype): float32 rounding of their entries
    expected = x.T @ x / len(x)
    scale = expected.diagonal().max().item()
    torch.testing.assert_close(stats.xtx, expected, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", DATA_AWARE)
def test_decompose_with_calibration_beats_svd_on_its_data(method):
    model = make_tiny("llama")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    dense = model_output(model, ids)
    cal = tiny_calibration(model, n_tokens=256)
    table = find_projections(model)
    errors = {}
    for m in ("svd", method):
        decompose_(model, uniform_plan(table, 8, method=m), calibration=cal)
        errors[m] = (model_output(model, ids) - dense).norm().item()
        restore_(model)
    torch.testing.assert_close(model_output(model, ids), dense, rtol=0, atol=0)
    assert errors[method] < errors["svd"]


def test_full_rank_decomposition_keeps_the_model():
    model = make_tiny("llama")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    dense = model_output(model, ids)
    table = find_projections(model)
    plan = Plan({n: p.full_rank for n, p in table.items()}, "svdllm")
    decompose_(model, plan, calibration=tiny_calibration(model, n_tokens=16))  # rank-deficient XᵀX
    torch.testing.assert_close(model_output(model, ids), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_samples", 0, "calibration.n_samples: expected an integer >= 1, got 0"),
        ("seq_len", 1.5, "calibration.seq_len: expected an integer >= 2"),
        ("seed", -1, "calibration.seed: expected an integer >= 0"),
    ],
)
def test_bad_spec_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        CalibrationSpec(TextSource(path="x.txt"), **{field: value})


def test_spec_from_dict(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"page": "a b c"}\n')
    spec = CalibrationSpec.from_dict(
        {"text": {"path": "p.jsonl", "field": "page", "rows": [40, 62]}, "n_samples": 8, "seq_len": 64, "seed": 3},
        base=tmp_path,
    )
    assert spec == CalibrationSpec(TextSource(path=str(tmp_path / "p.jsonl"), field="page", rows=(40, 62)), 8, 64, 3)
    assert CalibrationSpec.from_dict(spec.to_dict()) == spec  # as exported configs store it
    with pytest.raises(ValueError, match="calibration.samples: unknown key"):
        CalibrationSpec.from_dict({"text": {"path": "p"}, "samples": 8})
    with pytest.raises(ValueError, match="calibration.text.colum: unknown key"):
        CalibrationSpec.from_dict({"text": {"path": "p", "colum": "x"}})
    with pytest.raises(ValueError, match="calibration.text.path: no such file"):
        CalibrationSpec.from_dict({"text": {"path": "missing.jsonl"}}, base=tmp_path)
    with pytest.raises(ValueError, match="calibration.text: required"):
        CalibrationSpec.from_dict({"n_samples": 8})


def test_calibration_is_cached_on_disk(tmp_path):
    model = make_tiny("llama")
    spec = char_spec(tmp_path, n_samples=3, chars=400)
    first = calibrate(model, Tok(), spec, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("calibration-*/index.pt"))) == 1
    again = calibrate(model, Tok(), spec, cache_dir=tmp_path, progress=False)
    assert again.key == first.key and again.aliases == first.aliases
    assert not again.stats  # read from disk on demand, in float32: the float64 values rounded once
    for name in first.stats:
        torch.testing.assert_close(again.stats_for(name).xtx, first.stats[name].xtx.float(), rtol=0, atol=0)
        torch.testing.assert_close(again.stats_for(name).abs_mean, first.stats[name].abs_mean.float(), rtol=0, atol=0)
    other = calibrate(model, Tok(), CalibrationSpec(spec.text, 3, 16, seed=2), progress=False)
    assert other.key != first.key
    with pytest.raises(ValueError, match="calibration.seq_len: the text has"):
        calibrate(model, Tok(), CalibrationSpec(spec.text, 3, 100000), progress=False)


@pytest.mark.slow
def test_smollm2_calibration_shares_stats(smollm2, benchmarks_dir):
    from dse.study.protocols import P1_CALIBRATION_PAGES, wikitext_pages

    model, tokenizer = smollm2
    spec = CalibrationSpec(wikitext_pages(benchmarks_dir, P1_CALIBRATION_PAGES), n_samples=2, seq_len=64, seed=0)
    cal = calibrate(model, tokenizer, spec, progress=False)
    table = find_projections(model)
    assert len(cal.stats) == 4 * 30
    for layer in range(30):
        pre = f"model.layers.{layer}."
        for shared, owner in (
            ("self_attn.k_proj", "self_attn.q_proj"),
            ("self_attn.v_proj", "self_attn.q_proj"),
            ("mlp.up_proj", "mlp.gate_proj"),
        ):
            assert cal.aliases[pre + shared] == pre + owner
    for name in table:
        assert cal.stats_for(name).tokens == 128
    plan = uniform_plan({n: p for n, p in table.items() if p.layer == 0}, ratio=0.2, method="svdllm")
    decompose_(model, plan, calibration=cal)  # 64·2 tokens < 576 channels: rank-deficient, must not crash
    try:
        for name in plan.ranks:
            assert all(torch.isfinite(f).all() for f in model.get_submodule(name).factors)
    finally:
        restore_(model)
