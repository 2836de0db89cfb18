"""How a grid space asks its choices: one registered :class:`Group` per ``group:`` value.

A group walks the space's layout and asks a ``choose(parameter name, options)`` callback for each
of its parameters, returning the label picked for every selected (layer, type) cell (a cell left
out stays dense); it also counts the configurations that walk can produce under a set of rules,
exactly. The same walk serves sampling (``trial.suggest_categorical``), rebuilding a finished
trial's plan and baseline parameters, so counts and plans never disagree. The built-ins register
in :mod:`dse.space`; see :mod:`dse.space.grid` for what each one asks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..core.registry import Registry

DENSE = "dense"
SWITCH = (False, True)
Cell = Tuple[int, str]
Choose = Callable[[str, tuple], Any]  # (parameter name, options) -> one of the options


class Group:
    """Base of groups. ``layer_rules``: ``max_layers`` and ``no_adjacent`` apply; ``switches``: the
    group decides dense modules by on/off switches, so ``dense`` is not a rank choice."""

    layer_rules = False
    switches = False

    def walk(self, space, layout, choose: Choose) -> Dict[Cell, Any]:
        raise NotImplementedError

    def count(self, space, layout, rules) -> int:
        raise NotImplementedError

    def distinct(self, space, layout, configurations: int) -> Optional[int]:
        """The number of distinct plans among ``configurations``, when it differs (else None)."""
        return None

    def units(self, layout) -> Optional[Dict[str, List[Cell]]]:
        """Each parameter that picks a label, with the cells it sets (for :mod:`dse.space.knapsack`);
        None for a group whose walk is not one label per parameter."""
        return None


class SharedGroup(Group):
    """One choice for every selected module, asked as ``rank``."""

    def walk(self, space, layout, choose):
        return dict.fromkeys(layout.cells, choose("rank", space.labels))

    def units(self, layout):
        return {"rank": list(layout.cells)}

    def count(self, space, layout, rules):
        return len(space.ranks)


class TypeGroup(Group):
    """Each selected tensor type picks one choice for all selected layers, ``type.q``."""

    def walk(self, space, layout, choose):
        picks = {}
        for t in layout.types:
            value = choose(f"type.{t}", space.labels)
            picks.update((cell, value) for cell in layout.cells if cell[1] == t)
        return picks

    def count(self, space, layout, rules):
        return len(space.ranks) ** len(layout.types)

    def units(self, layout):
        return {f"type.{t}": [c for c in layout.cells if c[1] == t] for t in layout.types}


class LayeredGroup(Group):
    """Groups that visit layers in order, so that the layer rules hold by construction: a layer
    right after a decomposed one (``no_adjacent``), or any layer once ``max_layers`` are
    decomposed, asks no parameter and stays dense."""

    layer_rules = True

    def layer_picks(self, space, layer: int, cells: List[Cell], choose: Choose) -> Dict[Cell, Any]:
        """The picks of one layer's cells (a cell left out stays dense)."""
        raise NotImplementedError

    def per_layer(self, space, width: int) -> Tuple[int, int]:
        """(configurations leaving a layer of ``width`` cells dense, configurations decomposing it)."""
        raise NotImplementedError

    def walk(self, space, layout, choose):
        picks: Dict[Cell, Any] = {}
        decomposed: List[int] = []
        for layer in layout.layers:
            if not space.rules.may_decompose(len(decomposed), layer - 1 in decomposed[-1:]):
                continue
            layer_picks = self.layer_picks(space, layer, [c for c in layout.cells if c[0] == layer], choose)
            if any(v != DENSE for v in layer_picks.values()):
                decomposed.append(layer)
            picks.update(layer_picks)
        return picks

    def count(self, space, layout, rules):
        # Layers in order; state (decomposed so far, previous layer decomposed) -> configurations.
        states = {(0, False): 1}
        previous = None
        for layer in layout.layers:
            keep, cut = self.per_layer(space, sum(1 for cell in layout.cells if cell[0] == layer))
            adjacent = previous == layer - 1
            nxt: Dict[Tuple[int, bool], int] = defaultdict(int)
            for (k, was_on), n in states.items():
                if not rules.may_decompose(k, was_on and adjacent):
                    nxt[(k, False)] += n  # not asked: one configuration
                    continue
                nxt[(k, False)] += n * keep
                nxt[(k + 1, True)] += n * cut
            states, previous = nxt, layer
        return sum(states.values())


class ModuleGroup(LayeredGroup):
    """Each selected (layer, type) cell picks a choice, ``L3.q``."""

    def layer_picks(self, space, layer, cells, choose):
        return {cell: choose(f"L{layer}.{cell[1]}", space.labels) for cell in cells}

    def per_layer(self, space, width):
        c, dense = len(space.ranks), int(DENSE in space.labels)
        return dense, c**width - dense

    def units(self, layout):
        return {f"L{layer}.{t}": [(layer, t)] for layer, t in layout.cells}


class LayerGroup(LayeredGroup):
    """Each selected layer picks one choice for all its selected types, ``L3``."""

    def layer_picks(self, space, layer, cells, choose):
        return dict.fromkeys(cells, choose(f"L{layer}", space.labels))

    def per_layer(self, space, width):
        c, dense = len(space.ranks), int(DENSE in space.labels)
        return dense, c - dense

    def units(self, layout):
        return {f"L{layer}": [c for c in layout.cells if c[0] == layer] for layer in layout.layers}


class LayerXTypeGroup(LayeredGroup):
    """On/off switches per layer (``L3``) and per type (``type.q``), and one ``rank``.

    A module is decomposed iff its layer and its type are both on (the seed thesis' space)."""

    switches = True

    def layer_picks(self, space, layer, cells, choose):
        return dict.fromkeys(cells, True) if choose(f"L{layer}", SWITCH) else {}

    def per_layer(self, space, width):
        return 1, 1

    def walk(self, space, layout, choose):
        layers_on = super().walk(space, layout, choose)
        on = {t for t in layout.types if choose(f"type.{t}", SWITCH)}
        value = choose("rank", space.labels)
        return {cell: value for cell in layers_on if cell[1] in on}

    def count(self, space, layout, rules):
        return super().count(space, layout, rules) * 2 ** len(layout.types) * len(space.ranks)

    def distinct(self, space, layout, configurations):
        """Every configuration with no layer or no type on is the same dense plan."""
        per_subset = 2 ** len(layout.types) * len(space.ranks)
        subsets = configurations // per_subset
        return 1 + (subsets - 1) * (2 ** len(layout.types) - 1) * len(space.ranks)


GROUPS: Registry[Group] = Registry("group")
