"""Architecture adapters: where each family keeps its decomposable projections.

A :class:`Family` maps the module path inside a layer to a canonical tensor type (``q k v o gate
up down``; GPT-2's fused attention input is ``qkv``). Families are units of the :data:`FAMILIES`
registry (the built-ins register in :mod:`dse.model`). :func:`find_projections` turns a model into
the ordered table of its decomposable modules, which every other part of ``dse`` uses; a table
says how many layers the model has (:func:`n_layers`) and which types it holds
(:func:`tensor_types`, canonical order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from torch import nn

from ..core.errors import ModelError
from ..core.registry import Registry

CANONICAL_TYPES = ("q", "k", "v", "qkv", "o", "gate", "up", "down")
GENERIC = "generic"


@dataclass(frozen=True)
class Family:
    """Where the layers and projections of one model family live.

    ``layers`` is the dotted path of the ``nn.ModuleList`` of blocks; ``projections`` maps a path
    relative to one block to its canonical tensor type; ``model_types`` are the transformers
    ``config.model_type`` values it covers. A family without ``projections`` is found on each
    model (:meth:`resolve`): every ``nn.Linear`` of the first ``nn.ModuleList``, typed by its
    attribute name (``generic``).
    """

    name: str
    model_types: tuple
    layers: Optional[str] = None
    projections: Optional[Mapping[str, str]] = None

    @property
    def help(self) -> str:
        if self.projections is None:
            return "every nn.Linear of the model's first nn.ModuleList, typed by its attribute name"
        return f"layers at {self.layers}; model types {', '.join(self.model_types) or 'any'}"

    def resolve(self, model: nn.Module) -> "Family":
        """This family with its layers and projections as found in ``model``."""
        if self.projections is not None:
            return self
        for path, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) and isinstance(mod[0], nn.Module):
                projections = {n: n.rsplit(".", 1)[-1] for n, m in mod[0].named_modules() if isinstance(m, nn.Linear)}
                return Family(self.name, self.model_types, path, projections)
        raise ModelError(f"family {self.name}: the model has no nn.ModuleList of layers")


@dataclass(frozen=True)
class Projection:
    """One decomposable module: its fully qualified name, position and shape (out, in)."""

    name: str
    layer: int
    type: str
    out_features: int
    in_features: int
    transposed: bool  # stored as (in, out), as GPT-2's Conv1D does

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense weight (bias excluded)."""
        return self.out_features * self.in_features


FAMILIES: Registry[Family] = Registry("family")


def register_family(family: Family) -> Family:
    """Add ``family`` to :data:`FAMILIES` after checking its tensor types."""
    for t in (family.projections or {}).values():
        if t not in CANONICAL_TYPES:
            raise ValueError(f"family {family.name}: unknown tensor type {t!r} (known: {', '.join(CANONICAL_TYPES)})")
    return FAMILIES.register(family.name, family)


def family_of(model: nn.Module, family: Optional[str] = None) -> Family:
    """The registered family of ``model`` (by ``config.model_type``), or the one named, resolved on
    ``model``. ``family="generic"`` is the explicit fallback (see :class:`Family`)."""
    if family is not None:
        return FAMILIES.get(family, "family").resolve(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for fam in FAMILIES.values() for t in fam.model_types)
    raise ModelError(
        f"family: model_type {model_type!r} has no architecture adapter; known: {', '.join(known)} "
        f"(or pass family='{GENERIC}' to decompose every nn.Linear inside the layers)")


def _shape(module: nn.Module) -> Tuple[int, int, bool]:
    """``(out, in, transposed)`` of a linear projection: ``nn.Linear``, GPT-2's ``Conv1D``, or
    any module with integer ``out_features`` / ``in_features`` (a decomposed one, say)."""
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        n_in, n_out = module.weight.shape
        return n_out, n_in, True
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return out_f, in_f, bool(getattr(module, "transposed", False))
    raise ModelError(f"family: {type(module).__name__} is not a linear projection")


def find_projections(model: nn.Module, family: Optional[str] = None) -> Dict[str, Projection]:
    """Ordered map from fully qualified module name to :class:`Projection` (layer-major)."""
    fam = family_of(model, family)
    try:
        layers = model.get_submodule(fam.layers)
    except AttributeError:
        raise ModelError(f"family {fam.name}: the model has no {fam.layers!r}") from None
    table: Dict[str, Projection] = {}
    for i, block in enumerate(layers):
        for rel, ttype in fam.projections.items():
            try:
                mod = block.get_submodule(rel)
            except AttributeError:
                continue  # e.g. a family variant without gate_proj
            out_f, in_f, transposed = _shape(mod)
            name = f"{fam.layers}.{i}.{rel}"
            table[name] = Projection(name, i, ttype, out_f, in_f, transposed)
    if not table:
        raise ModelError(f"family {fam.name}: no projections found under {fam.layers!r}")
    return table


def n_layers(table: Mapping[str, Projection]) -> int:
    """The number of layers of the model a projection table describes."""
    return 1 + max(p.layer for p in table.values())


def tensor_types(table: Mapping[str, Projection]) -> List[str]:
    """The tensor types present, in canonical order (types no family names last, sorted)."""
    return ordered_types({p.type for p in table.values()})


def ordered_types(present) -> List[str]:
    """``present`` tensor types in canonical order, unknown ones last and sorted."""
    present = set(present)
    return [t for t in CANONICAL_TYPES if t in present] + sorted(present - set(CANONICAL_TYPES))


_NUMBERED = re.compile(r"^(?P<prefix>.+)\.(?P<layer>\d+)\.(?P<rel>[^.].*)$")


def locate(name: str) -> Tuple[int, str]:
    """``(layer, tensor type)`` of a module name, by the registered families' layouts.

    ``model.layers.3.self_attn.q_proj`` -> ``(3, "q")``; a name no family knows falls back to its
    last number and last component (``blocks.2.attn.proj`` -> ``(2, "proj")``).
    """
    m = _NUMBERED.match(name)
    if not m:
        raise ValueError(f"module {name!r}: no layer number in its name")
    for fam in FAMILIES.values():
        if m["prefix"] == fam.layers and m["rel"] in (fam.projections or {}):
            return int(m["layer"]), fam.projections[m["rel"]]
    return int(m["layer"]), m["rel"].rsplit(".", 1)[-1]
