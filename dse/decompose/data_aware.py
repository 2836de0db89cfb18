"""Data-aware methods: the SVD of the weight seen through its inputs' statistics.

Both methods factorize ``W · T = U · diag(S) · Vh'`` for an invertible input transform ``T``
and return the SVD form ``(U, S, Vh' · T⁻¹)``, so ``U · diag(S) · Vh = W`` at full rank and the
usual truncation (:func:`dse.decompose.svd.truncate_two`) keeps the components that matter most *for
the inputs seen in calibration*. ``stats`` is a :class:`dse.decompose.calibration.InputStats`
(``abs_mean``: mean ``|x|`` per channel; ``xtx``: ``XᵀX / N``).

* ``asvd`` (ASVD, Yuan et al. 2023): ``T = diag(s)``, ``s = abs_mean ** alpha``.
* ``svdllm`` (SVD-LLM, Wang et al. 2024): ``T = L`` with ``L Lᵀ = XᵀX / N`` (whitening). Then
  ``‖(W − W_r) Xᵀ‖_F² = N · Σ_{i>r} S_i²``: truncation is optimal in the data-weighted norm.
  Computed without ``L`` (see :class:`SVDLLMConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .methods import MethodConfig, SVDForm

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ASVDConfig(MethodConfig):
    """Activation-aware SVD: scale input channels by ``s = (mean |x|) ** alpha`` before the SVD.

    Channels whose scale is below ``floor · max(s)`` (e.g. never active) are raised to it, so
    ``1 / s`` stays finite; if every channel is zero the scaling is the identity.
    """

    name: ClassVar[str] = "asvd"
    needs_calibration: ClassVar[bool] = True
    alpha: float = 0.5
    floor: float = 1e-6


@dataclass(frozen=True)
class SVDLLMConfig(MethodConfig):
    """SVD-LLM's truncation in the data-weighted norm, computed by eigendecompositions.

    With ``C = XᵀX / N + jitter · mean(diag) · I`` (the regularizer keeps ``C`` positive definite
    when ``XᵀX`` is only semi-definite: fewer tokens than channels, dead channels, rounding), the
    rank-``r`` truncation is ``U_r U_rᵀ W`` where ``U`` holds the eigenvectors of ``W C Wᵀ``: the
    same result as SVD-LLM's SVD of ``W L`` (``L Lᵀ = C``) with no Cholesky factor, so it never
    fails on an indefinite ``XᵀX``.
    """

    name: ClassVar[str] = "svdllm"
    needs_calibration: ClassVar[bool] = True
    jitter: float = 1e-6


def asvd_factorize(weight: torch.Tensor, config: ASVDConfig, stats) -> SVDForm:
    import torch

    s = stats.abs_mean.to(weight).pow(config.alpha)
    top = s.max()
    s = torch.ones_like(s) if top <= 0 else s.clamp(min=config.floor * top)
    U, S, Vh = torch.linalg.svd(weight * s[None, :], full_matrices=False)
    return SVDForm(U, S, Vh / s[None, :])


def regularized(xtx: torch.Tensor, jitter: float) -> torch.Tensor:
    """``xtx + jitter · mean(diag(xtx)) · I``, symmetrized."""
    import torch

    eps = jitter * xtx.diagonal().mean().clamp(min=0)
    return (xtx + xtx.T) / 2 + eps * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)


def square_root(C: torch.Tensor) -> torch.Tensor:
    """``F`` with ``F Fᵀ = C``: the Cholesky factor, or ``Q Λ½`` with ``Λ`` clamped at 0 when ``C``
    is not positive definite."""
    import torch

    L, info = torch.linalg.cholesky_ex(C)
    if info == 0:
        return L
    lam, Q = torch.linalg.eigh(C)
    return Q * lam.clamp(min=0).sqrt()[None, :]


def svdllm_factorize(weight: torch.Tensor, config: SVDLLMConfig, stats) -> SVDForm:
    """``U, S`` from the eigenvectors and eigenvalues of ``W C Wᵀ`` (on the smaller side), then
    ``Vh = diag(1/S) Uᵀ W``, so ``U_r diag(S_r) Vh_r = U_r U_rᵀ W``."""
    import torch

    C = regularized(stats.xtx.to(weight), config.jitter)
    m, n = weight.shape
    if m <= n:  # the m × m Gram of the whitened weight: W C Wᵀ
        evals, U = torch.linalg.eigh(weight @ C @ weight.T)
    else:  # the n × n one, Fᵀ WᵀW F with F Fᵀ = C, and U = W F V / S
        WF = weight @ square_root(C)
        evals, V = torch.linalg.eigh(WF.T @ WF)
        U = WF @ V
    evals, U = evals.flip(0), U.flip(1)  # descending
    S = evals.clamp(min=0).sqrt()
    safe = S.clamp(min=torch.finfo(S.dtype).tiny ** 0.5 + S[0] * torch.finfo(S.dtype).eps)
    if m > n:
        U = U / safe[None, :]
    return SVDForm(U, S, (U.T @ weight) / safe[:, None])
