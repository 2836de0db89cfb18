"""Decomposition methods: what a method is, and the registry of methods.

Every method factorizes a weight ``W`` (``m × n``, float64) once into an SVD form
``W ≈ U · diag(S) · Vh`` with ``k = min(m, n)`` components (data-aware methods make ``Vh``
non-orthogonal), and then *truncates* that form to a rank without new math. The factor cache
stores the SVD form; a trial only truncates. Nothing here touches modules.

A method is one unit: a config dataclass (its options, validated) and a :class:`Method` entry in
:data:`METHODS` (``register_method``). The built-ins (:mod:`dse.decompose.svd`,
:mod:`dse.decompose.data_aware`) register in :mod:`dse.decompose`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

from ..core.errors import ConfigError
from ..core.registry import Registry

if TYPE_CHECKING:
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
    needs_grad_moments: ClassVar[bool] = False  # its stats are ProjectionStats (calibrate(grad_moments=True))

    def key(self) -> str:
        """A stable string naming the method and its options (used in cache keys)."""
        opts = "".join(f"-{f.name}{getattr(self, f.name)}" for f in dataclasses.fields(self))
        return self.name + opts

    def changed_options(self) -> Dict[str, Any]:
        """The options that differ from their defaults, as a plan file records them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


Factorize = Callable[["torch.Tensor", MethodConfig, Optional[Any]], SVDForm]
Truncate = Callable[[SVDForm, Rank], List["torch.Tensor"]]


@dataclass(frozen=True)
class Method:
    """A registered method: its config class, its factorization and its truncation."""

    config_cls: type
    factorize: Factorize
    truncate: Truncate
    pair_ranks: bool = False  # accepts (r_out, r_in)

    @property
    def help(self) -> str:
        doc = (self.config_cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def params(self, rank: Rank, m: int, n: int) -> int:
        """Parameters of the factors (bias excluded) at ``rank`` for an ``m × n`` weight."""
        r_out, r_in = as_pair(rank)
        if self.pair_ranks:
            return m * r_out + r_out * r_in + r_in * n
        return r_out * (m + n)

    def ratio_rank(self, m: int, n: int, ratio: float) -> Rank:
        """The largest rank, ``(r, r)`` for a method of two ranks, whose factors keep at most
        ``(1 − ratio) · m · n`` parameters of an ``m × n`` weight (at least 1, at most full rank):
        SVD-LLM's uniform rule ``⌊m·n·(1 − ratio) / (m + n)⌋`` for one rank."""
        as_rank = (lambda r: (r, r)) if self.pair_ranks else (lambda r: r)
        budget = m * n * (1 - ratio)
        low, high = 1, min(m, n)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.params(as_rank(mid), m, n) <= budget else (low, mid - 1)
        return as_rank(low)


METHODS: Registry[Method] = Registry("method")


def register_method(config_cls: type, factorize: Factorize, truncate: Truncate, pair_ranks: bool = False) -> Method:
    """Register a method under ``config_cls.name``: its options are the config's fields."""
    return METHODS.register(config_cls.name, Method(config_cls, factorize, truncate, pair_ranks))


def as_pair(rank: Rank) -> Tuple[int, int]:
    return (rank, rank) if isinstance(rank, int) else (int(rank[0]), int(rank[1]))


def get_method(name: str, where: str = "method") -> Method:
    return METHODS.get(name, where)


def as_config(method: Union[str, MethodConfig]) -> MethodConfig:
    """``method`` as a config: a config as it is, a name with default options."""
    return method if isinstance(method, MethodConfig) else make_config(method)


def make_config(
    name: str, options: Optional[Mapping[str, Any]] = None, *, where: str = "method", error: type = ConfigError
) -> MethodConfig:
    """The config of method ``name`` with ``options``; an unknown method or option is an ``error``
    naming the field (``method`` / ``method_options.<option>``; ``where`` replaces ``method``)."""
    try:
        cls = get_method(name, where).config_cls
    except ConfigError as e:
        raise error(str(e)) from None
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    opts_where = where.rpartition(".")[0] + ".method_options" if "." in where else "method_options"
    if unknown:
        raise error(
            f"{opts_where}.{unknown[0]}: {name} has no such option (known: {', '.join(sorted(known)) or 'none'})"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise error(f"{opts_where}: {e}") from None
