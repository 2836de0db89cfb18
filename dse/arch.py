"""Architecture adapters: where each family keeps its decoder projections.

One :class:`Family` entry per model family maps the module path inside a layer to a canonical
tensor type (``q k v o gate up down``; GPT-2's fused attention input is ``qkv``). Adding a family
is one ``register_family`` call. :func:`find_projections` turns a model into the ordered table of
its decomposable modules, which every other part of ``dse`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping

from torch import nn

CANONICAL_TYPES = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Family:
    """Where the layers and projections of one model family live.

    ``layers`` is the dotted path of the ``nn.ModuleList`` of blocks; ``projections`` maps a path
    relative to one block to its canonical tensor type.
    """

    name: str
    model_types: tuple
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


FAMILIES: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for t in family.projections.values():
        if t not in CANONICAL_TYPES:
            raise ValueError(f"family {family.name}: unknown tensor type {t!r}")
    FAMILIES[family.name] = family
    return family


_LLAMA_LIKE = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
register_family(Family("llama", ("llama", "mistral", "qwen2", "gemma", "gemma2", "qwen3"),
                       "model.layers", _LLAMA_LIKE))
register_family(Family("gpt2", ("gpt2",), "transformer.h", {
    "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}))
register_family(Family("opt", ("opt",), "model.decoder.layers", {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.out_proj": "o", "fc1": "up", "fc2": "down"}))
register_family(Family("bert", ("bert", "roberta"), "encoder.layer", {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down"}))
GENERIC = "generic"


class UnknownFamilyError(ValueError):
    pass


def family_of(model: nn.Module, family: str | None = None) -> Family:
    """The registered family of ``model`` (by ``config.model_type``), or the one named.

    ``family="generic"`` is the explicit fallback: every ``nn.Linear`` inside the first
    ``nn.ModuleList`` of the model, typed by its attribute name.
    """
    if family == GENERIC:
        return _generic_family(model)
    if family is not None:
        if family not in FAMILIES:
            raise UnknownFamilyError(f"family: unknown {family!r}; known: {', '.join(sorted(FAMILIES))}, {GENERIC}")
        return FAMILIES[family]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for fam in FAMILIES.values() for t in fam.model_types)
    raise UnknownFamilyError(
        f"model_type {model_type!r} has no architecture adapter; known: {', '.join(known)} "
        f"(or pass family='{GENERIC}' to decompose every nn.Linear inside the layers)")


def _generic_family(model: nn.Module) -> Family:
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and isinstance(mod[0], nn.Module):
            block = mod[0]
            projections = {n: n.rsplit(".", 1)[-1] for n, m in block.named_modules()
                           if isinstance(m, nn.Linear)}
            return Family(GENERIC, (), path, projections)
    raise UnknownFamilyError("family generic: the model has no nn.ModuleList of layers")


def _shape(module: nn.Module) -> tuple[int, int, bool]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        n_in, n_out = module.weight.shape
        return n_out, n_in, True
    from .lowrank import LowRankLinear

    if isinstance(module, LowRankLinear):
        return module.out_features, module.in_features, module.transposed
    raise TypeError(f"{type(module).__name__} is not a linear projection")


def find_projections(model: nn.Module, family: str | None = None) -> Dict[str, Projection]:
    """Ordered map from fully qualified module name to :class:`Projection` (layer-major)."""
    fam = family_of(model, family)
    layers = model.get_submodule(fam.layers)
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
        raise UnknownFamilyError(f"family {fam.name}: no projections found under {fam.layers!r}")
    return table


def tensor_types(table: Mapping[str, Projection]) -> List[str]:
    """The tensor types present, in canonical order."""
    present = {p.type for p in table.values()}
    return [t for t in CANONICAL_TYPES if t in present] + sorted(present - set(CANONICAL_TYPES))
