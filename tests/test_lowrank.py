"""LowRankLinear: construction from nn.Linear / GPT-2 Conv1D, forward, and the round trip to dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dse.decompose import LowRankLinear, svd_form, truncate_three, truncate_two

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error of a full-rank factorization after a cast to the dtype (float64 product, cast back).
FULL_RANK_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_dense(kind: str, out_f: int = 12, in_f: int = 8, bias: bool = True, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "conv1d":  # GPT-2's Conv1D always has a bias; weight stored (in, out)
        module = Conv1D(out_f, in_f)
        nn.init.normal_(module.weight)
        nn.init.normal_(module.bias)
    else:
        module = nn.Linear(in_f, out_f, bias=bias)
    return module.to(dtype).requires_grad_(False)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a Conv1D."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def exact_factors(module: nn.Module):
    """``[I, W]``: a two-factor chain whose float64 product is ``W`` bit for bit."""
    w = weight_of(module)
    return [torch.eye(w.shape[1], dtype=w.dtype), w.clone()]


KINDS = ["linear", "linear-nobias", "conv1d"]


def dense_for(kind: str, dtype=torch.float32):
    return make_dense("conv1d" if kind == "conv1d" else "linear", bias=kind != "linear-nobias", dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_exact_and_keeps_kind_bias_dtype(kind, dtype):
    dense = dense_for(kind, dtype)
    low = LowRankLinear.from_linear(dense, exact_factors(dense))
    assert low.transposed == (kind == "conv1d")
    assert (low.in_features, low.out_features) == (8, 12)
    back = low.to_dense()
    assert type(back) is type(dense)
    assert back.weight.shape == dense.weight.shape
    assert back.weight.dtype == dtype and back.weight.device == dense.weight.device
    assert torch.equal(back.weight, dense.weight)
    if dense.bias is None:
        assert back.bias is None
    else:
        assert torch.equal(back.bias, dense.bias)
        assert back.bias.data_ptr() != dense.bias.data_ptr()  # the dense copy owns its bias


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_factors_follow_module_dtype_and_device_and_share_bias(kind, dtype):
    dense = dense_for(kind, dtype)
    w64 = weight_of(dense).double()
    low = LowRankLinear.from_linear(dense, truncate_two(svd_form(w64), 8))  # float64 factors in
    assert all(f.dtype == dtype and f.device == dense.weight.device for f in low.factors)
    assert all(not f.requires_grad for f in low.factors)
    if dense.bias is None:
        assert low.bias is None
    else:
        assert low.bias.dtype == dtype
        assert low.bias.data_ptr() == dense.bias.data_ptr()  # shared, not copied


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("truncate", [truncate_two, truncate_three])
def test_full_rank_forward_matches_dense(kind, dtype, truncate):
    dense = dense_for(kind, dtype)
    low = LowRankLinear.from_linear(dense, truncate(svd_form(weight_of(dense)), 8))
    assert low.ranks == ((8,) if truncate is truncate_two else (8, 8))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref, out = dense(x).float(), low(x).float()
    assert out.shape == ref.shape
    assert (out - ref).norm() <= FULL_RANK_RTOL[dtype] * ref.norm()
    merged = low.dense_weight().float()
    assert (merged - weight_of(dense).float()).norm() <= FULL_RANK_RTOL[dtype] * weight_of(dense).float().norm()


def test_truncated_forward_is_the_chain_of_factors():
    dense = make_dense("linear")
    factors = truncate_two(svd_form(dense.weight), 3)
    low = LowRankLinear.from_linear(dense, factors)
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = x @ factors[0].t() @ factors[1].t() + dense.bias.double()
    torch.testing.assert_close(low(x.float()).double(), expected, rtol=1e-5, atol=1e-5)
    assert low.ranks == (3,)
    assert "ranks=(3,)" in repr(low) and "bias=True" in repr(low)


def test_three_factor_ranks_and_shapes():
    dense = make_dense("linear", 12, 8)
    low = LowRankLinear.from_linear(dense, truncate_three(svd_form(dense.weight), (5, 3)))
    assert low.ranks == (3, 5)  # input-to-output order: U_inᵀ (3×8), G (5×3), U_out (12×5)
    assert [tuple(f.shape) for f in low.factors] == [(3, 8), (5, 3), (12, 5)]
    assert low.dense_weight().shape == (12, 8)


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([(4, 8)], "2 or 3 factors"),
        ([(4, 8)] * 4, "2 or 3 factors"),
        ([(4, 8), (12, 5)], "do not chain"),
        ([(4, 8), (3, 4), (12, 2)], "do not chain"),
    ],
)
def test_bad_factor_chains_are_rejected(shapes, message):
    with pytest.raises(ValueError, match=message):
        LowRankLinear([torch.zeros(s) for s in shapes])


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_factors_must_match_module_shape(kind):
    dense = dense_for(kind)
    with pytest.raises(ValueError, match="module maps 8 -> 12"):
        LowRankLinear.from_linear(dense, [torch.zeros(2, 8), torch.zeros(11, 2)])
    with pytest.raises(ValueError, match="module maps 8 -> 12"):
        LowRankLinear.from_linear(dense, [torch.zeros(2, 12), torch.zeros(8, 2)])  # (in, out) swapped
