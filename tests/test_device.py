"""Device and dtype code paths: selected correctly here (CPU), and the CUDA branches taken when asked.

No GPU is lent to this project's CI; the CUDA run itself is checked where one is (see README).
"""

from __future__ import annotations

import pytest
import torch

from dse.decompose import FactorCache, LowRankLinear, SVDConfig
from dse.model import resolve_device, resolve_dtype
from dse.model.timing import sync


def test_auto_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device: 'cuda' requested but CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    "name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_dtypes_resolve(name, dtype):
    assert resolve_dtype(name) is dtype and resolve_dtype(dtype) is dtype


def test_unknown_dtype_names_the_field():
    with pytest.raises(ValueError, match=r"^dtype: unknown 'int8'"):
        resolve_dtype("int8")


def test_latency_synchronises_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    sync(torch.device("cpu"))
    assert calls == []
    sync(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factorization_is_float64_and_stored_in_the_model_dtype(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16).to(dtype)
    form = FactorCache().form(("fp", "m", "svd"), linear, SVDConfig())
    assert form.U.dtype == dtype and form.U.device == linear.weight.device
    # float64 math: the stored singular values equal a float64 SVD's, rounded once to the dtype
    exact = torch.linalg.svdvals(linear.weight.double())
    assert torch.equal(form.S, exact.to(dtype))
    module = LowRankLinear.from_linear(linear, [form.Vh, form.U * form.S])
    assert all(f.dtype == dtype for f in module.factors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_decompose_on_cuda_keeps_device():
    linear = torch.nn.Linear(32, 32).cuda()
    form = FactorCache().form(("fp", "m", "svd"), linear, SVDConfig())
    assert form.U.is_cuda
    module = LowRankLinear.from_linear(linear, [form.Vh[:8], (form.U * form.S)[:, :8]])
    assert module(torch.randn(2, 32, device="cuda")).is_cuda
