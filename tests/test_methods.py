"""Decomposition methods: every registered method meets Eckart–Young, counts its parameters right,
and the registry reports bad names and options clearly.

Eckart–Young tolerance (float64 throughout): ``| ‖W − Ŵ_r‖_F − sqrt(Σ_{i>r} s_i²) | ≤ 1e-10 · ‖W‖_F``.
A float64 SVD has backward error of order ``k · eps · ‖W‖ ≈ 3e-13 · ‖W‖`` for ``k = 1536``, so the
bound holds with margin yet fails for any factor that is not an optimal rank-r truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from dse.core.errors import ConfigError
from dse.decompose import (
    METHODS,
    MethodConfig,
    as_pair,
    get_method,
    make_config,
    register_method,
    svd_form,
    truncate_two,
)

EY_RTOL = 1e-10
SMOLLM2_MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.14.mlp.down_proj",
    "model.layers.29.mlp.gate_proj",
]


def product(factors) -> torch.Tensor:
    """The (out, in) matrix of factors given in input-to-output order, in float64."""
    w = factors[-1].double()
    for f in reversed(factors[:-1]):
        w = w @ f.double()
    return w


def rank_arg(method, r: int):
    return (r, r) if method.pair_ranks else r


def random_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    """A float64 m × n matrix with a geometrically decaying spectrum (condition number 1e6)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -6, k, dtype=torch.float64)
    return q1 @ torch.diag(s) @ q2.t()


def assert_eckart_young(name: str, weight: torch.Tensor, ranks) -> None:
    method = METHODS[name]
    if method.config_cls.needs_calibration:
        pytest.skip(
            f"{name} needs calibration: its optimum is in the activation-weighted norm, not the Frobenius norm of W"
        )
    w = weight.double()
    form = method.factorize(w, make_config(name), None)
    s = torch.linalg.svdvals(w)
    for r in ranks:
        err = torch.linalg.matrix_norm(w - product(method.truncate(form, rank_arg(method, r))))
        tail = s[r:].square().sum().sqrt()
        assert abs(err - tail) <= EY_RTOL * s.norm(), f"{name} rank {r}: error {err:.6e}, tail {tail:.6e}"


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
def test_eckart_young_on_random_matrices(name, shape):
    k = min(shape)
    assert_eckart_young(name, random_matrix(*shape, seed=sum(shape)), [1, 2, k // 3, k // 2, k - 1, k])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_eckart_young_on_smollm2_weights(name, smollm2):
    model, _ = smollm2
    for module in SMOLLM2_MODULES:
        weight = model.get_submodule(module).weight
        k = min(weight.shape)
        assert_eckart_young(name, weight, [1, 16, k // 2, k - 1, k])


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("m, n, r", [(12, 8, 1), (12, 8, 5), (8, 12, 8), (10, 10, 10)])
def test_params_formula_counts_the_factors(name, m, n, r):
    method = METHODS[name]
    form = svd_form(torch.randn(m, n, generator=torch.Generator().manual_seed(m * n + r)))
    factors = method.truncate(form, rank_arg(method, r))
    assert factors[0].shape[1] == n and factors[-1].shape[0] == m
    assert sum(f.numel() for f in factors) == method.params(rank_arg(method, r), m, n)
    if not method.pair_ranks:
        assert method.params(r, m, n) == r * (m + n)  # the rank-r count of the issue: r·(m+n)


def test_tucker2_unequal_ranks_has_error_of_the_smaller_rank():
    method = get_method("tucker2")
    w = random_matrix(30, 20, seed=3)
    s = torch.linalg.svdvals(w)
    form = method.factorize(w, make_config("tucker2"), None)
    for r_out, r_in in [(7, 4), (4, 7), (20, 20), (1, 20)]:
        factors = method.truncate(form, (r_out, r_in))
        assert [tuple(f.shape) for f in factors] == [(r_in, 20), (r_out, r_in), (30, r_out)]
        assert sum(f.numel() for f in factors) == 30 * r_out + r_out * r_in + r_in * 20
        err = torch.linalg.matrix_norm(w - product(factors))
        tail = s[min(r_out, r_in) :].square().sum().sqrt()
        assert abs(err - tail) <= EY_RTOL * s.norm()


def test_svd_split_is_balanced():
    """Both factors carry S^½: their row/column norms are equal, which keeps fp16 factors in range."""
    w = random_matrix(20, 12, seed=5)
    a, b = truncate_two(svd_form(w), 6)
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-12, atol=0)


def test_factorize_runs_in_float64():
    form = svd_form(torch.randn(6, 4, dtype=torch.float32))
    assert form.U.dtype == form.S.dtype == form.Vh.dtype == torch.float64
    assert torch.all(form.S[:-1] >= form.S[1:])  # descending


def test_as_pair():
    assert as_pair(3) == (3, 3)
    assert as_pair((4, 2)) == (4, 2)
    assert as_pair([4, 2]) == (4, 2)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"^method: unknown method 'nope'; known: ") as err:
        get_method("nope")
    assert all(name in str(err.value) for name in METHODS)


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match=r"^method_options\.alpha: svd has no such option \(known: none\)"):
        make_config("svd", {"alpha": 0.5})


def test_config_key_names_method_and_options():
    keys = {name: make_config(name).key() for name in METHODS}
    assert all(key.startswith(name) for name, key in keys.items())
    assert len(set(keys.values())) == len(keys)  # distinct cache keys per method
    assert make_config("svd").changed_options() == {}
    assert make_config("asvd", {"alpha": 0.5, "floor": 1e-3}).changed_options() == {"floor": 1e-3}


def test_a_new_method_is_one_registered_unit():
    @dataclass(frozen=True)
    class HalfConfig(MethodConfig):
        """Toy method: the SVD of W/2, scaled back at truncation."""

        name: ClassVar[str] = "toy-half"
        scale: float = 0.5

    def factorize(weight, config, stats=None):
        form = svd_form(weight * config.scale)
        form.S = form.S / config.scale
        return form

    method = register_method(HalfConfig, factorize, truncate_two)
    try:
        assert get_method("toy-half") is method
        assert make_config("toy-half", {"scale": 0.25}).key() == "toy-half-scale0.25"
        assert_eckart_young("toy-half", random_matrix(16, 10, seed=7), [1, 5, 10])
    finally:
        METHODS.unregister("toy-half")
