"""Rank plans: which modules to decompose, at what rank, with which method. Plain data.

A plan is an ordered map from fully qualified module name to a rank (or an ``(r_out, r_in)``
pair for ``tucker2``) and a method config (the method and its options), with a format version.
It round-trips through JSON, its method and options are checked when it is made, and it is
validated against a model's projection table before anything is mutated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from ..core.errors import PlanError
from ..core.io import atomic_write_text
from .methods import MethodConfig, Rank, as_pair, get_method, make_config

PLAN_FORMAT = 1
_KEYS = ("format", "method", "method_options", "ranks")


class Plan:
    """``Plan(ranks, method="svd", method_options=None)``; ``method`` may also be a method config
    (:class:`~dse.decompose.methods.MethodConfig`), whose options it then carries.

    ``config`` is the method config, built once; ``method`` its name and ``method_options`` the
    options given (those a plan file records).
    """

    def __init__(
        self,
        ranks: Optional[Mapping[str, Rank]] = None,
        method: Union[str, MethodConfig] = "svd",
        method_options: Optional[Mapping[str, Any]] = None,
    ):
        self.ranks: Dict[str, Rank] = {
            k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in (ranks or {}).items()
        }
        if isinstance(method, MethodConfig):
            if method_options:
                raise ValueError("Plan: give the options in the method config, not as method_options")
            self.config = method
            self.method_options = method.changed_options()
        else:
            self.config = make_config(method, method_options, where="plan.method", error=PlanError)
            self.method_options = dict(method_options or {})
        self.method = self.config.name

    def __len__(self) -> int:
        return len(self.ranks)

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and (self.ranks, self.config) == (other.ranks, other.config)

    def __repr__(self) -> str:
        return f"Plan({len(self.ranks)} modules, {self.config!r})"

    def with_ranks(self, ranks: Mapping[str, Rank]) -> "Plan":
        """The same method config with other ranks."""
        return Plan(ranks, self.config)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "method": self.method,
            "method_options": dict(self.method_options),
            "ranks": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.ranks.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping):
            raise PlanError(f"plan: expected an object, got {type(data).__name__}")
        fmt = data.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise PlanError(f"plan.format: {fmt!r} is not supported (this dse reads {PLAN_FORMAT})")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise PlanError(f"plan.{unknown[0]}: unknown key (known: {', '.join(_KEYS)})")
        ranks = data.get("ranks", {})
        if not isinstance(ranks, Mapping):
            raise PlanError("plan.ranks: expected an object of module name -> rank")
        options = data.get("method_options") or {}
        if not isinstance(options, Mapping):
            raise PlanError("plan.method_options: expected an object of option name -> value")
        return cls(dict(ranks), data.get("method", "svd"), dict(options))

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return cls.from_dict(data)

    def save(self, path) -> None:
        atomic_write_text(Path(path), self.to_json(indent=1))

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan: file not found: {path}")
        return cls.from_json(path.read_text())

    def validate(self, table: Mapping) -> None:
        """Check every entry against ``table`` (from :func:`dse.model.find_projections`).

        Raises :class:`PlanError` naming the first bad field: unknown module, rank that is not a
        positive integer, rank above ``min(out, in)``, a rank pair for a method that takes one rank.
        """
        method = get_method(self.method)
        for name, rank in self.ranks.items():
            where = f"plan.ranks[{name!r}]"
            if name not in table:
                raise PlanError(f"{where}: no such decomposable module in this model")
            if isinstance(rank, tuple):
                if not method.pair_ranks:
                    raise PlanError(f"{where}: method {self.method} takes one rank, got a pair {list(rank)}")
                if len(rank) != 2:
                    raise PlanError(f"{where}: a rank pair is [r_out, r_in], got {list(rank)}")
            for r in rank if isinstance(rank, tuple) else (rank,):
                if isinstance(r, bool) or not isinstance(r, int):
                    raise PlanError(f"{where}: rank must be an integer, got {r!r}")
                if r <= 0:
                    raise PlanError(f"{where}: rank must be >= 1, got {r}")
                p = table[name]
                if r > p.full_rank:
                    raise PlanError(f"{where}: rank {r} exceeds min({p.out_features}, {p.in_features}) = {p.full_rank}")

    def params(self, table: Mapping) -> int:
        """Parameters of all factors in the plan (biases excluded)."""
        method = get_method(self.method)
        return sum(method.params(r, table[n].out_features, table[n].in_features) for n, r in self.ranks.items())

    def kept_params(self, table: Mapping) -> int:
        """Weights the projections of ``table`` keep under the plan (dense modules in full)."""
        return self.params(table) + sum(p.dense_params for n, p in table.items() if n not in self.ranks)

    def summary(self) -> str:
        if not self.ranks:
            return "dense"
        rs = sorted({as_pair(r)[0] for r in self.ranks.values()})
        return f"{len(self.ranks)} module{'s' if len(self.ranks) > 1 else ''}, {self.method}, rank {rs[0]}" + (
            f"..{rs[-1]}" if len(rs) > 1 else ""
        )


def align_rank(rank: int, step: int) -> int:
    """``rank`` rounded down to a multiple of ``step``; a rank below one step is kept as it is."""
    return rank // step * step if rank >= step > 1 else rank


def uniform_plan(
    table: Mapping,
    rank=None,
    *,
    ratio: Optional[float] = None,
    method: Union[str, MethodConfig] = "svd",
    method_options=None,
    types=None,
    layers=None,
) -> Plan:
    """Every selected module at one rank, or at the rank that removes ``ratio`` of its parameters.

    With ``ratio=R`` the rank is the method's :meth:`~dse.decompose.methods.Method.ratio_rank`:
    ``⌊m·n·(1−R)/(m+n)⌋`` per ``m × n`` weight for two factors (SVD-LLM's rule), the largest
    ``(r, r)`` within the same parameters for Tucker-2.
    """
    if (rank is None) == (ratio is None):
        raise ValueError("uniform_plan: give exactly one of rank and ratio")
    unit = get_method(method.name if isinstance(method, MethodConfig) else method)
    ranks = {}
    for name, p in table.items():
        if (types and p.type not in types) or (layers is not None and p.layer not in layers):
            continue
        if ratio is not None:
            ranks[name] = unit.ratio_rank(p.out_features, p.in_features, ratio)
        else:
            ranks[name] = max(1, min(rank, p.full_rank))
    return Plan(ranks, method, method_options)
