"""Data-aware methods: the SVD of the weight seen through its inputs' statistics.

Both methods factorize ``W · T = U · diag(S) · Vh'`` for an invertible input transform ``T``
and return the SVD form ``(U, S, Vh' · T⁻¹)``, so ``U · diag(S) · Vh = W`` at full rank and the
usual truncation (:func:`dse.methods.truncate_two`) keeps the components that matter most *for
the inputs seen in calibration*. ``stats`` is a :class:`dse.calibration.InputStats`
(``abs_mean``: mean ``|x|`` per channel; ``xtx``: ``XᵀX / N``).

* ``asvd`` (ASVD, Yuan et al. 2023): ``T = diag(s)``, ``s = abs_mean ** alpha``.
* ``svdllm`` (SVD-LLM, Wang et al. 2024): ``T = L`` with ``L Lᵀ = XᵀX / N`` (whitening). Then
  ``‖(W − W_r) Xᵀ‖_F² = N · Σ_{i>r} S_i²``: truncation is optimal in the data-weighted norm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from .methods import MethodConfig, SVDForm, register_method, truncate_two

log = logging.getLogger(__name__)


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
    """Truncation-aware whitening by the Cholesky factor of ``XᵀX / N``.

    ``XᵀX`` is often only positive semi-definite (fewer tokens than channels, dead channels,
    rounding). Order of attempts, first success wins: (1) Cholesky of ``XᵀX``; (2) Cholesky of
    ``XᵀX + jitter · mean(diag) · I``; (3) eigendecomposition ``Q Λ Qᵀ`` with eigenvalues clamped
    to ``jitter · mean(diag)``, whitening by ``Q Λ^½``. The path taken is logged at DEBUG level.
    """

    name: ClassVar[str] = "svdllm"
    needs_calibration: ClassVar[bool] = True
    jitter: float = 1e-6


def asvd_factorize(weight: torch.Tensor, config: ASVDConfig, stats) -> SVDForm:
    s = stats.abs_mean.to(weight).pow(config.alpha)
    top = s.max()
    s = torch.ones_like(s) if top <= 0 else s.clamp(min=config.floor * top)
    U, S, Vh = torch.linalg.svd(weight * s[None, :], full_matrices=False)
    return SVDForm(U, S, Vh / s[None, :])


def whitening(xtx: torch.Tensor, jitter: float):
    """``(L, kind)`` with ``L Lᵀ ≈ xtx`` and ``L`` invertible; ``kind`` is the path taken.

    ``kind`` is ``"cholesky"``, ``"cholesky+jitter"`` (``L`` lower triangular) or ``"eigh"``
    (``L = Q Λ^½``, square). See :class:`SVDLLMConfig`.
    """
    eps = jitter * xtx.diagonal().mean().clamp(min=torch.finfo(xtx.dtype).tiny)
    L, info = torch.linalg.cholesky_ex(xtx)
    if info == 0:
        return L, "cholesky"
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    L, info = torch.linalg.cholesky_ex(xtx + eps * eye)
    if info == 0:
        return L, "cholesky+jitter"
    evals, Q = torch.linalg.eigh((xtx + xtx.T) / 2)
    return Q * evals.clamp(min=eps).sqrt()[None, :], "eigh"


def svdllm_factorize(weight: torch.Tensor, config: SVDLLMConfig, stats) -> SVDForm:
    L, kind = whitening(stats.xtx.to(weight), config.jitter)
    log.debug("svdllm whitening: %s", kind)
    U, S, Vh = torch.linalg.svd(weight @ L, full_matrices=False)
    if kind == "eigh":
        return SVDForm(U, S, torch.linalg.solve(L, Vh, left=False))  # Vh · L⁻¹
    return SVDForm(U, S, torch.linalg.solve_triangular(L, Vh, upper=False, left=False))


register_method(ASVDConfig, asvd_factorize, truncate_two)
register_method(SVDLLMConfig, svdllm_factorize, truncate_two)
