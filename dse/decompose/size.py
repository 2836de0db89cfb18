"""Size accounting of a plan: parameters, bytes (params + buffers) and projection FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping

from torch import nn

from ..model import model_bytes, param_count
from .methods import get_method
from .plan import Plan


@dataclass
class SizeReport:
    """Predicted sizes of a model under a plan (computed without touching the weights)."""

    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    flops_before: int  # decoder projections only, per token
    flops_after: int

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def compression(self) -> float:
        """Fraction of the model's parameters removed."""
        return 1.0 - self.params_ratio

    def as_dict(self) -> Dict[str, float]:
        return {
            "params": self.params_after,
            "params_base": self.params_before,
            "params_ratio": self.params_ratio,
            "compression": self.compression,
            "bytes": self.bytes_after,
            "bytes_base": self.bytes_before,
            "flops_per_token": self.flops_after,
            "flops_per_token_base": self.flops_before,
        }


def plan_size(model: nn.Module, plan: Plan, table: Mapping) -> SizeReport:
    """Exact parameter, byte and projection-FLOP counts of ``model`` (dense) under ``plan``.

    FLOPs count the matrix products of all decoder projections (2 per multiply-add, per token),
    biases and attention scores excluded. The plan is validated against ``table`` first.
    """
    plan.validate(table)
    method = get_method(plan.method)
    removed = removed_bytes = 0
    for name, rank in plan.ranks.items():
        p = table[name]
        cut = p.dense_params - method.params(rank, p.out_features, p.in_features)
        removed += cut
        removed_bytes += cut * model.get_submodule(name).weight.element_size()
    dense = sum(p.dense_params for p in table.values())
    before_p, before_b = param_count(model), model_bytes(model)
    return SizeReport(
        before_p, before_p - removed, before_b, before_b - removed_bytes, 2 * dense, 2 * (dense - removed)
    )
