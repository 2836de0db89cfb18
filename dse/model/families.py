"""Architecture families, recognised by structure: where a model's layers are and what each
projection in them is.

A :class:`Family` maps the path of a projection inside one layer (``self_attn.q_proj``) to a
canonical tensor type (``q k v o gate up down``; fused ones are types of their own: ``qkv`` for
Phi-3's ``qkv_proj`` and GPT-2's ``c_attn``, ``gate_up`` for Phi-3's ``gate_up_proj``). It names no
model types and no layer path: :func:`family_of` looks at every ``nn.ModuleList`` of the model and
picks the family and list whose first layer holds the most of a family's projections, so a
decoder with Llama-style names is the ``llama`` family whatever its ``model_type`` (Llama 2/3,
Mistral, Qwen 2/3, Gemma 1/2/3, OLMo, Granite ...), and a BERT is found under ``bert.encoder.layer``
as under a bare ``encoder.layer``. Families are units of :data:`FAMILIES` (the built-ins register
in :mod:`dse.model`). :func:`find_projections` turns a model into the ordered table of its
decomposable modules, which every other part of ``dse`` uses. Recognition names no model types;
a family's optional ``shapes`` rule does, to give the same table from a config without building
the model (:func:`projections_from_config`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..core.errors import ModelError
from ..core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

CANONICAL_TYPES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
GENERIC = "generic"

# (layer list path, layer count, {projection path: (out, in)}) of a model, from its config's fields
ConfigLayout = Tuple[str, int, Mapping[str, Tuple[int, int]]]


@dataclass(frozen=True)
class Family:
    """One architecture family: ``projections`` maps a path inside a layer to its tensor type.

    A family without ``projections`` (``generic``) takes every ``nn.Linear`` of the layer list whose
    first layer holds the most of them, typed by its attribute name; it is used only when named.
    ``shapes``, if given, reads a model's layout from its config fields alone (no torch, no model:
    :func:`projections_from_config`), returning ``None`` for a config it does not know; a test
    checks it against the model transformers builds.
    """

    name: str
    projections: Optional[Mapping[str, str]] = None
    help: str = ""
    shapes: Optional[Callable[[Mapping[str, Any]], Optional[ConfigLayout]]] = None


@dataclass(frozen=True)
class FamilyLayout:
    """A family as found on one model: the path of its layer list and the projections present."""

    family: str
    layers: str
    projections: Mapping[str, str]


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
    return FAMILIES.register(family.name, family, help=family.help or None)


def _layer_lists(model: nn.Module) -> List[Tuple[str, nn.ModuleList]]:
    from torch import nn

    return [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) and isinstance(mod[0], nn.Module)
    ]


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def _linears(block: nn.Module) -> Dict[str, str]:
    from torch import nn

    return {
        n: n.rsplit(".", 1)[-1]
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    }


def _match(family: Family, lists) -> Optional[FamilyLayout]:
    """``family`` on the layer list whose first layer holds most of its projections (None: none)."""
    best = None
    for path, layers in lists:
        if family.projections is None:
            present = _linears(layers[0])
        else:
            present = {rel: t for rel, t in family.projections.items() if _has(layers[0], rel)}
        score = (len(present), len(layers))
        if present and (best is None or score > best[0]):
            best = (score, FamilyLayout(family.name, path, present))
    return best[1] if best else None


def _found(lists) -> str:
    if not lists:
        return "the model has no nn.ModuleList of layers"
    path, layers = max(lists, key=lambda item: len(item[1]))
    names = ", ".join(_linears(layers[0])) or "no linear modules"
    return f"found {path} ({len(layers)} x {type(layers[0]).__name__}) holding {names}"


def family_of(model: nn.Module, family: Optional[str] = None) -> FamilyLayout:
    """The layout of ``model``: the registered family whose projections its layers hold most of,
    or the family named (``family: generic`` decomposes every ``nn.Linear`` in the layers)."""
    lists = _layer_lists(model)
    if family is not None:
        layout = _match(FAMILIES.get(family, "family"), lists)
        if layout is None:
            raise ModelError(f"family: {family} does not fit this model ({_found(lists)})")
        return layout
    layouts = [
        layout
        for fam in FAMILIES.values()
        if fam.projections is not None and (layout := _match(fam, lists)) is not None
    ]
    if not layouts:
        known = ", ".join(n for n, fam in FAMILIES.items() if fam.projections is not None)
        raise ModelError(
            f"family: no known family ({known}) recognises {type(model).__name__}: {_found(lists)}; "
            f"register one, or set family: {GENERIC} to decompose every nn.Linear in the layers"
        )
    return max(layouts, key=lambda layout: len(layout.projections))  # the first registered among ties


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
    """Ordered map from fully qualified module name to :class:`Projection` (layer-major), for the
    family found on ``model`` or the one named (see :func:`family_of`)."""
    layout = family_of(model, family)
    table: Dict[str, Projection] = {}
    for i, block in enumerate(model.get_submodule(layout.layers)):
        for rel, ttype in layout.projections.items():
            if not _has(block, rel):
                continue  # a layer without this projection (e.g. a cross-attention only in some layers)
            out_f, in_f, transposed = _shape(block.get_submodule(rel))
            name = f"{layout.layers}.{i}.{rel}"
            table[name] = Projection(name, i, ttype, out_f, in_f, transposed)
    return table


def projections_from_config(fields: Mapping[str, Any], family: Optional[str] = None) -> Optional[Dict[str, Projection]]:
    """The :func:`find_projections` table of the model that config ``fields`` describe, by the
    ``shapes`` rule of the family named (else of the first registered family whose rule knows the
    config), without building the model; ``None`` when no rule knows it."""
    candidates = list(FAMILIES.values()) if family is None else [FAMILIES[family]] if family in FAMILIES else []
    for fam in candidates:
        layout = fam.shapes(fields) if fam.shapes is not None else None
        if layout is None:
            continue
        layers, count, shapes = layout
        table: Dict[str, Projection] = {}
        for i in range(count):
            for rel, ttype in (fam.projections or {}).items():
                if rel in shapes:
                    name = f"{layers}.{i}.{rel}"
                    table[name] = Projection(name, i, ttype, *shapes[rel], False)
        return table
    return None


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
    """``(layer, tensor type)`` of a module name, by the registered families' projection paths.

    ``model.layers.3.self_attn.q_proj`` -> ``(3, "q")``; a name no family knows falls back to its
    last number and last component (``blocks.2.attn.proj`` -> ``(2, "proj")``).
    """
    m = _NUMBERED.match(name)
    if not m:
        raise ValueError(f"module {name!r}: no layer number in its name")
    for fam in FAMILIES.values():
        if m["rel"] in (fam.projections or {}):
            return int(m["layer"]), fam.projections[m["rel"]]
    return int(m["layer"]), m["rel"].rsplit(".", 1)[-1]
