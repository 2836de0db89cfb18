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

**Numerics.** Each moment ``M`` is symmetrized and divided by ``mean(diag M)`` (a positive factor
on ``G`` or ``C`` moves no optimum, and this keeps both factors of a form at the weight's scale
however small the loss gradients are), and gets the ridge ``jitter · I``. The smaller side's
moment is eigendecomposed, ``M = Q diag(λ) Qᵀ``, its negative eigenvalues (rounding: SmolLM2 has an
indefinite ``XᵀX``) clamped to 0 before the ridge, so ``M½ = Q diag(λ½) Qᵀ`` and ``M^-½`` are finite
with condition number at most about ``dim / jitter``; the larger side's moment only enters a
product, so for ``gate``/``up`` (``1536 × 576``) every eigenproblem is ``576 × 576``. A moment the
ridge dominates (smallest eigenvalue below the ridge: fewer tokens than channels, dead channels)
is regularized and said so by a warning (one message, so Python shows it once); a moment with a
non-finite entry or a zero diagonal (no gradient reached the projection) cannot be regularized
meaningfully and is a one-line ``ConfigError`` naming it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Tuple

from ..core.errors import ConfigError
from .methods import MethodConfig, SVDForm

if TYPE_CHECKING:
    import torch


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


def scaled(moment: torch.Tensor, what: str) -> torch.Tensor:
    """``moment / mean(diag(moment))``, symmetrized (a positive factor on ``G`` or ``C`` moves no
    optimum; this keeps both factors of a form at the weight's scale however small the loss
    gradients are); a one-line ``ConfigError`` naming ``what`` if it is non-finite or zero."""
    import torch

    if not torch.isfinite(moment).all():
        raise ConfigError(
            f"calibration: the {what} has non-finite entries (an overflow?); calibrate the model in float32"
        )
    scale = moment.diagonal().mean()
    if scale <= 0:
        raise ConfigError(
            f"calibration: the {what} is zero (nothing reached it in calibration); "
            "calibrate on other text, or leave the projection out of the plan"
        )
    return (moment + moment.T) / (2 * scale)


def _say_regularized() -> None:  # one message for all, so that Python shows it once
    warnings.warn(
        "twosided: some second moments are rank-deficient or ill-conditioned (smallest eigenvalue "
        "below the ridge jitter * mean(diag)); they are regularized by the ridge",
        RuntimeWarning,
        stacklevel=4,
    )


def ridged(moment: torch.Tensor, jitter: float) -> torch.Tensor:
    """``moment + jitter · I`` (of a :func:`scaled` moment), said so when the ridge dominates a
    direction (a Cholesky factor of ``moment − jitter · I`` fails: cheaper than its eigenvalues)."""
    import torch

    eye = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
    if torch.linalg.cholesky_ex(moment - jitter * eye).info != 0:
        _say_regularized()
    return moment + jitter * eye


def roots(moment: torch.Tensor, jitter: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(M½, M^-½)`` of a :func:`scaled` moment: eigenvalues clamped at 0, plus ``jitter``."""
    import torch

    lam, Q = torch.linalg.eigh(moment)
    if lam[0] < jitter:
        _say_regularized()
    lam = lam.clamp(min=0) + jitter
    return (Q * lam.sqrt()) @ Q.T, (Q / lam.sqrt()) @ Q.T


def twosided_factorize(weight: torch.Tensor, config: TwoSidedConfig, stats) -> SVDForm:
    """``(A⁻¹ U, S, Vᵀ B⁻¹)`` of the SVD ``A W B = U diag(S) Vᵀ`` (``A = G½``, ``B = C½``), computed on
    the smaller side: for ``m ≤ n`` the roots of ``G`` and the ``m × m`` eigenproblem of
    ``(A W B)(A W B)ᵀ = A W C Wᵀ A`` (then ``Vᵀ B⁻¹ = diag(1/S) Uᵀ A W``); for ``m > n`` those of ``C``
    and of ``(A W B)ᵀ(A W B) = B Wᵀ G W B`` (then ``A⁻¹ U = W B V diag(1/S)``). The larger moment
    needs no root and no inverse. ``stats`` is a :class:`dse.decompose.stats.ProjectionStats`."""
    import torch

    of = f" of {stats.name}" if stats.name else ""
    G = scaled(stats.grad_moment.to(weight), f"output-gradient moment{of}")
    C = scaled(stats.inputs.xtx.to(weight), f"input moment{of}")
    m, n = weight.shape
    if m <= n:
        A, A_inv = roots(G, config.jitter)
        AW = A @ weight
        evals, U = torch.linalg.eigh(AW @ ridged(C, config.jitter) @ AW.T)
    else:
        B, B_inv = roots(C, config.jitter)
        WB = weight @ B
        evals, V = torch.linalg.eigh(WB.T @ ridged(G, config.jitter) @ WB)
    evals = evals.flip(0)  # descending
    S = evals.clamp(min=0).sqrt()
    safe = S.clamp(min=torch.finfo(S.dtype).tiny ** 0.5 + S[0] * torch.finfo(S.dtype).eps)
    if m <= n:
        U = U.flip(1)
        return SVDForm(A_inv @ U, S, (U.T @ AW) / safe[:, None])
    V = V.flip(1)
    return SVDForm((WB @ V) / safe[None, :], S, V.T @ B_inv)
