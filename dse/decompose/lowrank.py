"""``LowRankLinear``: a dense projection replaced by a chain of two or three factor matrices."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model import execution_device, module_tensors


class LowRankLinear(nn.Module):
    """``y = x · F1ᵀ · F2ᵀ [· F3ᵀ] + b``: factors in input-to-output order, each ``(out_i, in_i)``.

    Two factors are a truncated SVD (``W ≈ B · A``); three are Tucker-2 (``W ≈ U_out · G · U_inᵀ``).
    ``transposed`` remembers that the dense module stored its weight as ``(in, out)`` (GPT-2's
    ``Conv1D``) so that :meth:`to_dense` gives back the same kind of module.

    :attr:`original` is the dense module it replaced, which :func:`dse.decompose_` keeps here (as
    PEFT keeps ``base_layer``) for ``restore_``; it is held, not registered, so it is in no
    ``state_dict``, parameter count or ``named_modules`` walk and ``.to()`` leaves it where it is.
    A module built any other way (a loaded compressed model's) has none.
    """

    def __init__(self, factors: Sequence[torch.Tensor], bias: torch.Tensor | None = None, transposed: bool = False):
        super().__init__()
        if not 2 <= len(factors) <= 3:
            raise ValueError(f"LowRankLinear takes 2 or 3 factors, got {len(factors)}")
        for a, b in zip(factors, factors[1:]):
            if b.shape[1] != a.shape[0]:
                raise ValueError(f"factor shapes do not chain: {tuple(a.shape)} then {tuple(b.shape)}")
        self.factors = nn.ParameterList([nn.Parameter(f, requires_grad=False) for f in factors])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.transposed = transposed

    @property
    def original(self) -> Optional[nn.Module]:
        """The dense module this one replaced, or ``None`` (see the class doc)."""
        return self.__dict__.get("_original")

    def keep_original(self, module: Optional[nn.Module]) -> None:
        """Hold ``module`` as :attr:`original` without registering it as a submodule."""
        self.__dict__["_original"] = module

    @property
    def in_features(self) -> int:
        return self.factors[0].shape[1]

    @property
    def out_features(self) -> int:
        return self.factors[-1].shape[0]

    @property
    def ranks(self) -> tuple:
        return tuple(f.shape[0] for f in self.factors[:-1])

    @classmethod
    def from_linear(cls, module: nn.Module, factors: Sequence[torch.Tensor]) -> "LowRankLinear":
        """Build from a dense ``nn.Linear`` or ``Conv1D`` and factors of its ``(out, in)`` weight.

        The factors are moved to the module's execution device (see :mod:`dse.model.devices`) and
        dtype; the bias is shared, not copied (an offloaded module's is read onto that device).
        Factors on the meta device stay there: shells, to be given their tensors later.
        """
        weight = module.weight
        device = factors[0].device if factors[0].is_meta else execution_device(module)
        transposed = type(module).__name__ == "Conv1D"
        factors = [f.to(device=device, dtype=weight.dtype).contiguous() for f in factors]
        out_f, in_f = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        if factors[0].shape[1] != in_f or factors[-1].shape[0] != out_f:
            raise ValueError(
                f"factors map {factors[0].shape[1]} -> {factors[-1].shape[0]}, module maps {in_f} -> {out_f}"
            )
        with module_tensors(module):
            bias = None if module.bias is None else module.bias.data
        return cls(factors, bias, transposed)

    def dense_weight(self) -> torch.Tensor:
        """The merged ``(out, in)`` weight, computed in float64 and cast back."""
        w = self.factors[-1].double()
        for f in reversed(self.factors[:-1]):
            w = w @ f.double()
        return w.to(self.factors[0].dtype)

    def to_dense(self) -> nn.Module:
        """A dense module of the original kind (``nn.Linear`` or ``Conv1D``) with the merged weight."""
        w = self.dense_weight()
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(self.out_features, self.in_features)
            dense.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        else:
            dense = nn.Linear(
                self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
            )
            dense.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.data.clone(), requires_grad=False)
        elif self.transposed:
            dense.bias = None
        return dense.to(device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *rest, last = self.factors
        for f in rest:
            x = F.linear(x, f)
        return F.linear(x, last, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, bias={self.bias is not None}"
