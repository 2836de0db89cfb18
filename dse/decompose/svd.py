"""Plain truncated SVD and Tucker-2 of a weight matrix: pure math, no data, no modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, List

from .methods import MethodConfig, Rank, SVDForm, as_pair

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SVDConfig(MethodConfig):
    """Truncated SVD, ``W ≈ (U_r S_r^½)(S_r^½ Vh_r)``: two factors, ``r·(m+n)`` parameters."""

    name: ClassVar[str] = "svd"


@dataclass(frozen=True)
class Tucker2Config(MethodConfig):
    """Tucker-2 of a matrix, ``W ≈ U_out · G · U_inᵀ``: three factors with ranks ``(r_out, r_in)``.

    For a matrix the HOSVD bases are the singular vectors and the core is ``diag(S)`` cut to
    ``r_out × r_in``; with ``r_out = r_in = r`` it has the error of rank-``r`` SVD and ``r²``
    more parameters, and with ``r_out ≠ r_in`` the error of rank ``min(r_out, r_in)``.
    """

    name: ClassVar[str] = "tucker2"


def svd_form(weight: torch.Tensor, config: MethodConfig = None, stats=None) -> SVDForm:
    """Thin SVD of ``weight`` in float64 (``torch.linalg.svd``, full_matrices=False); ``config``
    and ``stats`` are unused (the signature of every factorization)."""
    import torch

    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return SVDForm(U, S, Vh)


def truncate_two(form: SVDForm, rank: Rank) -> List[torch.Tensor]:
    """``[S_r^½ Vh_r, U_r S_r^½]``: the balanced split keeps both factors well scaled in fp16."""
    r = as_pair(rank)[0]
    root = form.S[:r].sqrt()
    return [form.Vh[:r] * root[:, None], form.U[:, :r] * root[None, :]]


def truncate_three(form: SVDForm, rank: Rank) -> List[torch.Tensor]:
    """``[U_inᵀ, G, U_out]`` with ``G = diag(S)[:r_out, :r_in]``."""
    import torch

    r_out, r_in = as_pair(rank)
    core = torch.zeros(r_out, r_in, dtype=form.S.dtype, device=form.S.device)
    d = min(r_out, r_in)
    core[range(d), range(d)] = form.S[:d]
    return [form.Vh[:r_in].clone(), core, form.U[:, :r_out].clone()]  # never views of the cache
