"""The fields every space file has: its name, its model (or model config), optionally its family
(``family: llama``; default: the one recognised on the model) and its selection of layers and
tensor types; shared by grid spaces (:mod:`dse.space.grid`) and allocation spaces
(:mod:`dse.space.allocation`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..core.errors import SpaceError
from ..core.validate import check_keys, integer
from ..model import CANONICAL_TYPES, FAMILIES, n_layers, tensor_types
from ..model.shapes import projection_table

Layers = Union[str, Tuple[int, ...], range]


@dataclass(frozen=True)
class SpaceContext:
    """What a space may need to turn a trial (or its params) into a plan; one argument of the one
    protocol every kind of space implements: ``suggest(trial, context)`` and
    ``plan_from_params(params, context)``. A grid space reads ``table`` and ``method``; an
    allocation space also ``importances`` (:func:`dse.space.importance`, per projection),
    ``model_params`` and, under a latency budget, ``latency`` (the study's latency table)."""

    table: Mapping
    method: Union[str, Any] = "svd"
    model_params: Optional[int] = None
    latency: Any = None
    importances: Optional[Mapping] = None


class ModelSpace:
    """What both kinds of space do with their model fields (``model``, ``model_config``, ``family``,
    ``layers``, ``types``): the projection table, and the layers and types selected in it; and what
    a study asks of any space, so that no caller branches on its kind."""

    starts: Tuple[str, ...] = ()  # starting points enqueued once per study (allocation spaces)
    needs_importance = False  # whether suggest() reads SpaceContext.importances

    @property
    def aligns_ranks(self) -> bool:
        """Whether ranks are rounded to each shape's measured fast step (``align: auto``), which
        needs the study's latency table."""
        return False

    @property
    def spends_latency(self) -> bool:
        """Whether the space's budget is in predicted latency (needs the study's latency table)."""
        return False

    def table(self):
        """The projection table of the space's model, from shapes only (see :mod:`dse.model.shapes`)."""
        return projection_table(
            self.model, self.model_config, family=self.family, where="space.model_config", error=SpaceError
        )

    def selected_types(self, table: Mapping) -> Tuple[str, ...]:
        """The space's types present in ``table``, canonical order; a listed type the model lacks
        is an error."""
        present = tensor_types(table)
        for i, t in enumerate(self.types or ()):
            if t not in present:
                raise SpaceError(f"space.types[{i}]: this model has no {t!r} projections (it has {', '.join(present)})")
        return tuple(t for t in present if t in (self.types or present))

    def selected_layers(self, table: Mapping) -> List[int]:
        return selected_layers(self.layers, n_layers(table))


def selected_layers(layers: Layers, count: int) -> List[int]:
    """The layer indices a space's ``layers`` field selects in a model of ``count`` layers."""
    if layers == "all":
        return list(range(count))
    for i, layer in enumerate(layers):
        if layer >= count:
            where = "space.layers" + ("" if isinstance(layers, range) else f"[{i}]")
            raise SpaceError(f"{where}: layer {layer} does not exist (the model has {count}, 0..{count - 1})")
    return list(layers)


def parse_model(data, keys) -> Dict[str, Any]:
    """``name``, ``description``, ``model``, ``model_config`` and ``family`` of a space file (the
    keyword arguments of either kind of space), after checking its keys."""
    if not isinstance(data, Mapping):
        raise SpaceError(f"space: expected a mapping of fields, got {type(data).__name__}")
    check_keys(data, keys, "space", SpaceError)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise SpaceError(f"space.name: expected a non-empty string, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpaceError(f"space.description: expected a string, got {description!r}")
    model, model_config = data.get("model"), data.get("model_config")
    if model is None and model_config is None:
        raise SpaceError("space.model: give model (a name) or model_config (shapes offline), or both")
    if model is not None and not isinstance(model, str):
        raise SpaceError(f"space.model: expected a model name, got {model!r}")
    if model_config is not None and not (
        isinstance(model_config, Mapping) and isinstance(model_config.get("model_type"), str)
    ):
        raise SpaceError("space.model_config: expected a mapping with a model_type")
    family = data.get("family")
    if family is not None:
        FAMILIES.get(family, "space.family", SpaceError)
    return {
        "name": name,
        "description": description,
        "model": model,
        "model_config": dict(model_config) if model_config else None,
        "family": family,
    }


def parse_layers(value) -> Layers:
    if value == "all":
        return value
    if isinstance(value, Mapping):
        check_keys(value, ("from", "to"), "space.layers", SpaceError)
        for key in ("from", "to"):
            if key not in value:
                raise SpaceError(f"space.layers.{key}: missing (a range is {{from: A, to: B}}, both included)")
        first = integer(value["from"], "space.layers.from", 0, SpaceError)
        last = integer(value["to"], "space.layers.to", 0, SpaceError)
        if last < first:
            raise SpaceError(f"space.layers.to: {last} is below from {first}")
        return range(first, last + 1)
    if isinstance(value, list) and value:
        layers = tuple(integer(v, f"space.layers[{i}]", 0, SpaceError) for i, v in enumerate(value))
        for i, layer in enumerate(layers):
            if layer in layers[:i]:
                raise SpaceError(f"space.layers[{i}]: layer {layer} is listed twice")
        return tuple(sorted(layers))
    raise SpaceError(
        f"space.layers: expected 'all', a non-empty list of layer indices or {{from: A, to: B}}, got {value!r}"
    )


def layers_to_data(layers: Layers):
    """The ``layers`` field as plain data (the inverse of :func:`parse_layers`)."""
    if isinstance(layers, range):
        return {"from": layers.start, "to": layers.stop - 1}
    return list(layers) if isinstance(layers, tuple) else layers


def parse_types(types) -> Optional[Tuple[str, ...]]:
    if types is None:
        return None
    if not isinstance(types, list) or not types:
        raise SpaceError(f"space.types: expected a non-empty list of tensor types, got {types!r}")
    for i, t in enumerate(types):
        if t not in CANONICAL_TYPES:
            raise SpaceError(f"space.types[{i}]: {t!r} is not a tensor type ({', '.join(CANONICAL_TYPES)})")
        if t in types[:i]:
            raise SpaceError(f"space.types[{i}]: {t} is listed twice")
    return tuple(types)
