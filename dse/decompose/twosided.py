"""``twosided``: the SVD of a weight in the metric of its output gradients and of its inputs.

A projection ``y = W x`` (``W``: ``m × n``) is seen through two token-level second moments from
calibration: its inputs' ``C = XᵀX / N`` (``n × n``, shared by projections that read one input) and
its own output gradients' ``G = GᵀG / N`` (``m × m``; row ``t`` of ``G`` is the next-token loss's
gradient with respect to ``y`` at token ``t``). To second order, and with the Kronecker-factored
(K-FAC) approximation of the Fisher ``E[(g gᵀ) ⊗ (x xᵀ)] ≈ G ⊗ C``, replacing ``W`` by ``W + Δ``
raises the loss by about ``½ ‖G½ Δ C½‖_F²``: ``svdllm`` weights the error by the inputs alone
(``G = I``), this method by the outputs' importance as well (as KFAC-SVD, Thoma et al. 2026).

**Optimum.** With ``A = G½`` and ``B = C½`` (symmetric, invertible after regularization) and the SVD
``A W B = U diag(S) Vᵀ``, the best rank-``r`` ``W_r`` in the norm ``‖A (W − W_r) B‖_F`` is
``A⁻¹ [A W B]_r B⁻¹`` (Eckart–Young in the whitened coordinates, since ``A``, ``B`` are
invertible), with error ``Σ_{i>r} S_i²``. So the SVD form is ``(A⁻¹ U, S, Vᵀ B⁻¹)``: its product is
``W`` at full rank, and the usual truncation (:func:`dse.decompose.svd.truncate_two`) is optimal in
that norm.

**Numerics.** Each moment is symmetrized and eigendecomposed, ``M = Q diag(λ) Qᵀ``; negative
eigenvalues (rounding: SmolLM2 has an indefinite ``XᵀX``) are clamped to 0 and the ridge
``jitter · mean(diag M)`` is added to every eigenvalue (the moment is first divided by
``mean(diag M)``: a positive factor on ``G`` or ``C`` moves no optimum, and this keeps both factors
of a form at the weight's scale however small the loss gradients are), so ``M½ = Q diag(λ½) Qᵀ`` and ``M^-½`` are
finite with condition number at most about ``dim / jitter``. A moment the ridge dominates (smallest
eigenvalue below the ridge: fewer tokens than channels, dead channels) is regularized and said so
by a warning (one message, so shown once); a moment with a non-finite entry or no positive diagonal (all zero: no gradient
reached the projection) cannot be regularized meaningfully and is a one-line ``ConfigError``
naming it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Tuple

import torch

from ..core.errors import ConfigError
from .methods import MethodConfig, SVDForm


@dataclass(frozen=True)
class TwoSidedConfig(MethodConfig):
    """SVD in the norm ``‖G½ (W − W_r) C½‖``: output-gradient and input second moments (KFAC-SVD).

    ``jitter``: each moment gets the ridge ``jitter · mean(diag)`` (see :mod:`dse.decompose.twosided`).
    """

    name: ClassVar[str] = "twosided"
    needs_calibration: ClassVar[bool] = True
    needs_grad_moments: ClassVar[bool] = True
    jitter: float = 1e-6

    def __post_init__(self):
        if not (isinstance(self.jitter, (int, float)) and 0 < self.jitter < 1):
            raise ValueError(f"jitter must be a number in (0, 1), got {self.jitter!r}")


def regularized_roots(moment: torch.Tensor, jitter: float, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(M½, M^-½)`` of the second moment ``moment`` scaled to a mean diagonal of 1 (which moves
    no optimum, and keeps both factors of a form at the weight's scale even for loss gradients of
    1e-6) and regularized as the module doc says; ``what`` names it in the error and the warning."""
    if not torch.isfinite(moment).all():
        raise ConfigError(f"calibration: the {what} has non-finite entries (an overflow?); calibrate the "
                          "model in float32")
    scale = moment.diagonal().mean()
    if scale <= 0:
        raise ConfigError(f"calibration: the {what} is zero (nothing reached it in calibration); "
                          "calibrate on other text, or leave the projection out of the plan")
    lam, Q = torch.linalg.eigh((moment + moment.T) / (2 * scale))
    if lam[0] < jitter:  # one message for all, so that Python shows it once
        warnings.warn("twosided: some second moments are rank-deficient or ill-conditioned (smallest "
                      "eigenvalue below the ridge jitter * mean(diag)); they are regularized by the ridge",
                      RuntimeWarning, stacklevel=3)
    lam = lam.clamp(min=0) + jitter
    return (Q * lam.sqrt()) @ Q.T, (Q / lam.sqrt()) @ Q.T


def twosided_factorize(weight: torch.Tensor, config: TwoSidedConfig, stats) -> SVDForm:
    """``(A⁻¹ U, S, Vᵀ B⁻¹)`` from the SVD of ``A W B``, ``A = G½``, ``B = C½``; ``stats`` is a
    :class:`dse.decompose.stats.ProjectionStats`."""
    of = f" of {stats.name}" if stats.name else ""
    A, A_inv = regularized_roots(stats.grad_moment.to(weight), config.jitter, f"output-gradient moment{of}")
    B, B_inv = regularized_roots(stats.inputs.xtx.to(weight), config.jitter, f"input moment{of}")
    U, S, Vh = torch.linalg.svd(A @ weight @ B, full_matrices=False)
    return SVDForm(A_inv @ U, S, Vh @ B_inv)
