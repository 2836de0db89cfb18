"""``twosided``: exact at full rank, optimal in its norm ``‖G½ (W − W_r) C½‖_F`` (against the closed
form computed independently with SciPy's matrix square roots, and against other rank-r
candidates), regularization and bad statistics; and the output-gradient moments calibration
gathers (autograd, at once = streamed, the store, ``dse estimate``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import BENCHMARKS, make_tiny
from helpers import CharTokenizer, char_spec, token_ids, write_study

from dse.core.errors import ConfigError, ModelError, PlanError
from dse.decompose import (
    InputStats,
    ProjectionStats,
    calibrate,
    collect_calibration,
    collect_stats,
    decompose_,
    factor_forms,
    get_method,
    make_config,
    restore_,
    uniform_plan,
)
from dse.model import find_projections, load_model
from dse.study.config import load_study_config
from dse.study.estimate import estimate

SHAPES = [(24, 16), (16, 24), (12, 12)]


def moment(dim: int, tokens: int, seed: int) -> torch.Tensor:
    """``ZᵀZ / tokens`` of correlated, unevenly scaled rows (as activations and gradients are)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, dim, generator=g, dtype=torch.float64) @ torch.randn(
        dim, dim, generator=g, dtype=torch.float64
    )
    z = z * torch.logspace(0, -1, dim, dtype=torch.float64)
    return z.T @ z / tokens


def two_sided(G: torch.Tensor, C: torch.Tensor) -> ProjectionStats:
    return ProjectionStats(InputStats(torch.ones(C.shape[0], dtype=torch.float64), C, 100), G, "p")


def weight(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def truncated(W, stats, rank, **options) -> torch.Tensor:
    method = get_method("twosided")
    factors = method.truncate(method.factorize(W, make_config("twosided", options), stats), rank)
    return factors[1] @ factors[0]


def error(G, C, D) -> float:
    """``‖G½ D C½‖_F² = tr(Dᵀ G D C)``: the method's norm, without any square root."""
    return torch.trace(D.T @ G @ D @ C).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_is_exact(shape):
    m, n = shape
    W = weight(m, n)
    stats = two_sided(moment(m, 200, 1), moment(n, 200, 2))
    torch.testing.assert_close(truncated(W, stats, min(m, n)), W, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_truncation_is_the_closed_form_optimum_of_its_norm(shape):
    """Against ``A⁻¹ [A W B]_r B⁻¹`` with SciPy's principal square roots and NumPy's SVD, its error
    the tail of the singular values, and no other rank-r candidate below it."""
    m, n = shape
    k = min(m, n)
    W = weight(m, n, seed=3)
    G, C = moment(m, 300, 4), moment(n, 300, 5)  # positive definite: the ridge below changes nothing measurable
    A, B = scipy.linalg.sqrtm(G.numpy()).real, scipy.linalg.sqrtm(C.numpy()).real
    U, S, Vt = np.linalg.svd(A @ W.numpy() @ B)
    L_G, L_C = torch.linalg.cholesky(G), torch.linalg.cholesky(C)  # other roots: the same norm, the same optimum
    Ug, Sg, Vtg = torch.linalg.svd(L_G.T @ W @ L_C)
    rng = torch.Generator().manual_seed(6)
    for r in (1, 3, k // 2, k - 1):
        ours = truncated(W, two_sided(G, C), r, jitter=1e-12)
        closed = np.linalg.solve(A, U[:, :r] * S[:r]) @ np.linalg.solve(B.T, Vt[:r].T).T
        torch.testing.assert_close(ours, torch.from_numpy(closed), rtol=0, atol=1e-7 * W.abs().max().item())
        best = error(G, C, W - ours)
        assert best == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-7)
        cholesky_form = torch.linalg.solve(L_G.T, Ug[:, :r] * Sg[:r]) @ torch.linalg.solve(L_C.T, Vtg[:r].T).T
        torch.testing.assert_close(ours, cholesky_form, rtol=0, atol=1e-7 * W.abs().max().item())
        candidates = [truncated_svd(W, r), svdllm_truncation(W, C, r)]
        for _ in range(100):  # rank-r candidates near the optimum: a column space close to its own
            left = ours @ torch.randn(n, r, generator=rng, dtype=torch.float64)
            left = left + 1e-2 * torch.randn(m, r, generator=rng, dtype=torch.float64)
            right = torch.linalg.lstsq(left, W).solution  # the best right factor for that column space in Frobenius
            candidates.append(left @ right)
        for candidate in candidates:  # each a product of rank-r factors
            assert error(G, C, W - candidate) >= best * (1 - 1e-9)


def truncated_svd(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def svdllm_truncation(W, C, r):
    method = get_method("svdllm")
    factors = method.truncate(
        method.factorize(
            W, make_config("svdllm", {"jitter": 1e-12}), InputStats(torch.ones(C.shape[0], dtype=torch.float64), C, 1)
        ),
        r,
    )
    return factors[1] @ factors[0]


def test_identity_moments_give_svd_and_an_identity_gradient_moment_gives_svdllm():
    W = weight(20, 14, seed=7)
    C = moment(14, 200, 8)
    for r in (1, 5, 13):
        identity = two_sided(torch.eye(20, dtype=torch.float64), torch.eye(14, dtype=torch.float64))
        torch.testing.assert_close(truncated(W, identity, r), truncated_svd(W, r), rtol=0, atol=1e-10)
        torch.testing.assert_close(
            truncated(W, two_sided(torch.eye(20, dtype=torch.float64), C), r, jitter=1e-12),
            svdllm_truncation(W, C, r),
            rtol=0,
            atol=1e-8,
        )


@pytest.mark.parametrize("case", ["few_tokens", "dead_channel", "indefinite"])
def test_degenerate_moments_are_regularized_and_said_so(case):
    W = weight(24, 16, seed=9)
    G, C = moment(24, 300, 10), moment(16, 300, 11)
    if case == "few_tokens":
        G = moment(24, 3, 12)  # rank 3 of 24
    elif case == "dead_channel":
        C[3], C[:, 3] = 0, 0
    else:
        C = C - 1.5 * torch.linalg.eigvalsh(C)[0] * torch.eye(16, dtype=torch.float64)  # one negative eigenvalue
    with pytest.warns(RuntimeWarning, match=r"^twosided: some second moments are rank-deficient .* regularized"):
        form = get_method("twosided").factorize(W, make_config("twosided"), two_sided(G, C))
    assert all(torch.isfinite(t).all() for t in (form.U, form.S, form.Vh))
    torch.testing.assert_close((form.U * form.S) @ form.Vh, W, rtol=0, atol=1e-6)  # still exact at full rank


@pytest.mark.parametrize(
    "which, bad, message",
    [
        ("grad", "zero", r"^calibration: the output-gradient moment of p is zero \(nothing reached it"),
        ("input", "zero", r"^calibration: the input moment of p is zero"),
        ("grad", "nan", r"^calibration: the output-gradient moment of p has non-finite entries"),
        ("input", "inf", r"^calibration: the input moment of p has non-finite entries"),
    ],
)
def test_bad_statistics_are_one_line_errors(which, bad, message):
    G, C = moment(12, 100, 13), moment(8, 100, 14)
    target = G if which == "grad" else C
    if bad == "zero":
        target.zero_()
    else:
        target[0, 1] = float(bad)
    with pytest.raises(ConfigError, match=message) as err:
        get_method("twosided").factorize(weight(12, 8), make_config("twosided"), two_sided(G, C))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("jitter", [0, -1e-3, 1.0])
def test_jitter_is_checked(jitter):
    with pytest.raises(ConfigError, match=r"^method_options: jitter must be a number in \(0, 1\)"):
        make_config("twosided", {"jitter": jitter})


# --- the output-gradient moments of calibration -------------------------------------------------


def test_grad_moments_match_autograd():
    model = make_tiny("llama")
    ids = token_ids(batch=4, length=12, seed=3)
    cal = collect_calibration(model, ids, "k", batch_size=2, grad_moments=True)
    table = find_projections(model)
    assert set(cal.grad_moments) == set(table) == set(cal.grads)  # one per projection, shared inputs or not
    refs = {n: 0 for n in table}
    for start in (0, 2):  # collect_calibration sums over batches of 2, each with its own mean loss
        outputs = {}

        def keep(name):
            def hook(module, args, output):
                output.retain_grad()
                outputs[name] = output

            return hook

        handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in table]
        embeds = model.get_input_embeddings()(ids[start : start + 2]).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids[start : start + 2]).loss.backward()
        for h in handles:
            h.remove()
        for n, out in outputs.items():
            g = out.grad.double().reshape(-1, out.shape[-1])
            refs[n] = refs[n] + g.T @ g
    model.zero_grad()
    _, _, grads = collect_stats(model, ids, batch_size=2, gradients=True)
    for name, p in table.items():
        ref = refs[name] / ids.numel()
        got = cal.grad_moments[name]
        assert got.shape == (p.out_features, p.out_features) and got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.diagonal().max().item())
        assert torch.equal(cal.grads[name], got.diagonal())  # the mean squared gradient is its diagonal
        torch.testing.assert_close(cal.grads[name], grads[name], rtol=1e-5, atol=0)


def test_a_model_without_a_loss_is_a_one_line_error():
    with pytest.raises(
        ModelError,
        match=r"^calibration: gradients need a model that returns a language-modeling "
        r"loss; BertModel returns none$",
    ):
        collect_calibration(make_tiny("bert"), token_ids(), grad_moments=True)


def test_streamed_moments_equal_the_moments_at_once_and_the_store_keeps_them(tmp_path):
    model, tok = make_tiny("llama"), CharTokenizer()
    table = find_projections(model)
    config = make_config("twosided")
    at_once = calibrate(model, tok, char_spec(tmp_path, False), grad_moments=True, progress=False)
    seen = {}

    def on_layer(names, cal):  # the walk factorizes each layer with its moments still in memory
        seen.update(factor_forms(model, names, config, calibration=cal))

    streamed = calibrate(
        model,
        tok,
        char_spec(tmp_path, True),
        cache_dir=tmp_path / "cache",
        grad_moments=True,
        on_layer=on_layer,
        progress=False,
    )
    assert streamed.key == at_once.key and set(seen) == set(table)
    assert not streamed.grad_moments and streamed.has_grad_moments()  # released to the store, layer by layer
    for name in table:
        stored = streamed.stats_for(name, grad_moment=True)
        assert stored.grad_moment.dtype == torch.float32
        torch.testing.assert_close(stored.grad_moment.double(), at_once.grad_moments[name], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(streamed.grads[name], at_once.grads[name], rtol=1e-12, atol=0)
    exact = factor_forms(model, table, config, calibration=at_once)
    for name, form in exact.items():
        r = table[name].full_rank // 2
        products = [(f.U[:, :r] * f.S[:r]) @ f.Vh[:r] for f in (seen[name], form)]
        torch.testing.assert_close(products[0], products[1], rtol=0, atol=1e-4 * products[1].abs().max().item())
    again = calibrate(
        model, tok, char_spec(tmp_path, True), cache_dir=tmp_path / "cache", grad_moments=True, progress=False
    )
    assert again.has_grad_moments() and not again.grad_moments  # read back from the store, not gathered again


def test_a_store_without_moments_gets_them_added(tmp_path):
    model, tok = make_tiny("llama"), CharTokenizer()
    first = calibrate(model, tok, char_spec(tmp_path, False), cache_dir=tmp_path, progress=False)
    assert not first.has_grad_moments()
    files = {p.name: p.stat().st_mtime_ns for p in first.store.directory.iterdir() if not p.name.startswith("grad")}
    with pytest.raises(PlanError, match=r"^plan.method: twosided needs output-gradient moments; calibrate with"):
        decompose_(model, uniform_plan(find_projections(model), 2, method="twosided"), calibration=first)
    again = calibrate(model, tok, char_spec(tmp_path, False), cache_dir=tmp_path, grad_moments=True, progress=False)
    assert again.has_grad_moments() and again.store.has_grad_moments()
    unchanged = {n: t for n, t in files.items() if n != "index.pt"}  # the input statistics are reused
    assert {p.name: p.stat().st_mtime_ns for p in again.store.directory.iterdir() if p.name in unchanged} == unchanged
    decompose_(model, uniform_plan(find_projections(model), 2, method="twosided"), calibration=again)
    restore_(model)


def test_estimate_counts_the_moments():
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    config = load_study_config(Path(__file__).resolve().parents[1] / "studies" / "llama2-7b-cluster.yaml")
    base = estimate(config)
    est = estimate(dataclasses.replace(config, method=make_config("twosided")))
    d, f, kv, layers = 4096, 11008, 4096, 32
    outs = [d, kv, kv, d, f, f, d]  # q k v o gate up down
    moments = 8 * layers * sum(o * o + o for o in outs)  # float64 moments, and their diagonals
    assert est.line("calibration at once").device - base.line("calibration at once").device == moments
    assert est.line("calibration streamed").device - base.line("calibration streamed").device == moments
    disk = 4 * layers * sum(o * (o + 1) // 2 + o for o in outs)  # float32 upper triangles, and the diagonals
    assert est.line("calibration statistics on disk").disk - base.line("calibration statistics on disk").disk == disk


def test_estimate_matches_a_tiny_calibration(tmp_path, tiny_llama_dir):
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
    }
    config = load_study_config(write_study(tmp_path, tiny_llama_dir, method="twosided", calibration=calibration))
    est = estimate(config)
    model, tokenizer = load_model(str(tiny_llama_dir))
    at_once = calibrate(model, tokenizer, config.calibration, grad_moments=True, progress=False)
    spec = dataclasses.replace(config.calibration, streamed=True)
    streamed = calibrate(model, tokenizer, spec, grad_moments=True, progress=False)
    assert at_once.peak_bytes == est.line("calibration at once").host
    assert streamed.peak_bytes == est.line("calibration streamed").host
