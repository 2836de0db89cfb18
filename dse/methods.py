"""Decomposition methods: pure math from a weight matrix to factors, and a registry.

Every method factorizes a weight ``W`` (``m × n``, float64) once into an SVD form
``W ≈ U · diag(S) · Vh`` with ``k = min(m, n)`` components (data-aware methods make ``Vh``
non-orthogonal), and then *truncates* that form to a rank without new math. The factor cache
stores the SVD form; a trial only truncates. Nothing here touches modules.

A method is a config dataclass plus a :class:`Method` entry in :data:`METHODS`
(``register_method``); later methods (``asvd``, ``svdllm``) add themselves the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Union

import torch

Rank = Union[int, Tuple[int, int]]


@dataclass
class SVDForm:
    """``W ≈ U · diag(S) · Vh``: U ``(m, k)``, S ``(k,)`` descending, Vh ``(k, n)``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def to(self, **kw) -> "SVDForm":
        return SVDForm(self.U.to(**kw), self.S.to(**kw), self.Vh.to(**kw))


@dataclass(frozen=True)
class MethodConfig:
    """Base of method configs. ``name`` is the registry key; fields are the method's options."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def key(self) -> str:
        """A stable string naming the method and its options (used in cache keys)."""
        opts = "".join(f"-{f.name}{getattr(self, f.name)}" for f in dataclasses.fields(self))
        return self.name + opts

    def options(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


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


Factorize = Callable[[torch.Tensor, MethodConfig, Optional[Any]], SVDForm]
Truncate = Callable[[SVDForm, Rank], List[torch.Tensor]]


@dataclass(frozen=True)
class Method:
    config_cls: type
    factorize: Factorize
    truncate: Truncate
    pair_ranks: bool = False  # accepts (r_out, r_in)

    def params(self, rank: Rank, m: int, n: int) -> int:
        """Parameters of the factors (bias excluded) at ``rank`` for an ``m × n`` weight."""
        r_out, r_in = as_pair(rank)
        if self.pair_ranks:
            return m * r_out + r_out * r_in + r_in * n
        return r_out * (m + n)


METHODS: Dict[str, Method] = {}


def register_method(config_cls: type, factorize: Factorize, truncate: Truncate,
                    pair_ranks: bool = False) -> Method:
    method = Method(config_cls, factorize, truncate, pair_ranks)
    METHODS[config_cls.name] = method
    return method


def as_pair(rank: Rank) -> Tuple[int, int]:
    return (rank, rank) if isinstance(rank, int) else (int(rank[0]), int(rank[1]))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_config(name: str, options: Optional[Dict[str, Any]] = None) -> MethodConfig:
    """The config of method ``name`` with ``options``; unknown options are an error naming them."""
    cls = get_method(name).config_cls
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method_options: {name} has no option {unknown[0]!r}"
                         f" (known: {', '.join(sorted(known)) or 'none'})")
    return cls(**options)


# --- pure math ---------------------------------------------------------------------------------

def svd_form(weight: torch.Tensor) -> SVDForm:
    """Thin SVD of ``weight`` in float64 (``torch.linalg.svd``, full_matrices=False)."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return SVDForm(U, S, Vh)


def _svd_factorize(weight: torch.Tensor, config: MethodConfig, stats=None) -> SVDForm:
    return svd_form(weight)


def truncate_two(form: SVDForm, rank: Rank) -> List[torch.Tensor]:
    """``[S_r^½ Vh_r, U_r S_r^½]``: the balanced split keeps both factors well scaled in fp16."""
    r = as_pair(rank)[0]
    root = form.S[:r].sqrt()
    return [form.Vh[:r] * root[:, None], form.U[:, :r] * root[None, :]]


def truncate_three(form: SVDForm, rank: Rank) -> List[torch.Tensor]:
    """``[U_inᵀ, G, U_out]`` with ``G = diag(S)[:r_out, :r_in]``."""
    r_out, r_in = as_pair(rank)
    core = torch.zeros(r_out, r_in, dtype=form.S.dtype, device=form.S.device)
    d = min(r_out, r_in)
    core[range(d), range(d)] = form.S[:d]
    return [form.Vh[:r_in].clone(), core, form.U[:, :r_out].clone()]  # never views of the cache


register_method(SVDConfig, _svd_factorize, truncate_two)
register_method(Tucker2Config, _svd_factorize, truncate_three, pair_ranks=True)

from . import data_aware  # noqa: E402,F401  registers asvd and svdllm
