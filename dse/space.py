"""Search spaces: which modules a study may decompose, at which ranks, and how the choices group.

A space is a YAML file (or a dict) validated into a frozen :class:`Space`::

    name: smollm2-quick                     # required
    description: free text                  # optional
    model: smollm2-135m                     # the model a study loads (dse.models.load_model)
    model_config: {model_type: llama, ...}  # optional: shapes come from this config, offline
    layers: all                             # all | [0, 3, 7] | {from: 2, to: 10} (both ends included)
    types: [q, k, v, o, gate, up, down]     # tensor types (dse.arch); default: all the model has
    ranks: [0.5, 0.25, 0.1, dense]          # the choices, below
    group: module                           # module | layer | type | shared | layer_x_type
    rules: {skip_first: 0, skip_last: 0, no_adjacent: false, max_layers: null, align: 1}

At least one of ``model`` and ``model_config`` is given; with both, shapes (counts, offline
checks) come from ``model_config`` and a study loads ``model``. The decomposition method is the
study's, not the space's: :meth:`Space.suggest` takes it as an argument.

**Ranks.** The list is exactly the set of choices. A choice is an int ``r >= 1`` (absolute rank),
a float ``f`` in (0, 1) (that fraction of the module's full rank ``min(out, in)``) or ``dense``
(leave the module as it is; a choice only when listed). Ranks resolve per module, since shapes
differ: the target ``t = r`` or ``f·full`` becomes the multiple of ``a = rules.align`` nearest to
``t`` (ties up), at least ``a`` and at most ``full`` rounded down to a multiple of ``a``; a module
whose full rank is below ``a`` takes its full rank. With ``align: 1`` that is: round to nearest,
clamp to ``[1, full]``. Two choices that resolve to the same rank on one selected module are an
error (one plan under two names), so ``align`` never changes a count.

**Groups** (the Optuna parameter each choice is asked under):

- ``module``: each selected (layer, type) cell picks a choice, ``L3.q``;
- ``layer``: each selected layer picks one choice for all its selected types, ``L3``;
- ``type``: each selected type picks one choice for all selected layers, ``type.q``;
- ``shared``: one choice for every selected module, ``rank``;
- ``layer_x_type``: an on/off switch per layer (``L3``) and per type (``type.q``) and one
  ``rank``; a module is decomposed iff its layer and its type are both on (the seed thesis'
  space). ``dense`` is not a choice here: the switches decide it.

Choice values are the labels of ``ranks`` as strings (``"1"``, ``"0.05"``, ``"dense"``), the same
for modules of every shape; switches are booleans.

**Rules.** ``skip_first: k`` / ``skip_last: k``: the first / last ``k`` layers of the model stay
dense. ``max_layers: k``: at most ``k`` layers are decomposed (a layer is decomposed when any of
its modules is). ``no_adjacent``: no two decomposed layers are neighbours (model indices ``l`` and
``l + 1``). ``align: a``: ranks resolve to multiples of ``a``. ``max_layers`` and ``no_adjacent``
apply to groups module, layer and layer_x_type (module and layer need ``dense`` among the ranks);
for type and shared they are an error; under layer_x_type they bind the layer switches. Sampling
respects every rule by construction: layers are visited in order, and a layer right after a
decomposed one (no_adjacent), or any layer once ``max_layers`` are decomposed, asks no parameter
and stays dense. So when ``max_layers`` binds, a random sampler decomposes early layers more often.

**Counts.** :meth:`Space.counts` gives the exact number of configurations (assignments of the
parameters the sampler can produce) with no rules and after each rule in turn: skip_first /
skip_last, max_layers, no_adjacent. Every configuration is a distinct plan except under
layer_x_type, where all configurations with no layer or no type on are the dense plan; its counts
end with a ``distinct plans`` row.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .arch import CANONICAL_TYPES, tensor_types
from .config import ConfigError, check_keys, read_yaml
from .plan import Plan

DENSE = "dense"
GROUPS = ("module", "layer", "type", "shared", "layer_x_type")
LAYER_RULE_GROUPS = ("module", "layer", "layer_x_type")
SWITCH = (False, True)
Choice = Union[int, float, str]
Choose = Callable[[str, tuple], Any]  # (parameter name, options) -> one of the options


class SpaceError(ConfigError):
    """A bad space; the one-line message names the field (``space.ranks[2]: ...``)."""


@dataclass(frozen=True)
class Rules:
    skip_first: int = 0
    skip_last: int = 0
    no_adjacent: bool = False
    max_layers: Optional[int] = None
    align: int = 1

    def may_decompose(self, decomposed: int, after_decomposed: bool) -> bool:
        """Whether a layer may be decomposed when ``decomposed`` layers already are and the layer
        right before it is (``after_decomposed``) or not."""
        if self.max_layers is not None and decomposed >= self.max_layers:
            return False
        return not (self.no_adjacent and after_decomposed)


def label(choice: Choice) -> str:
    """The parameter value of a rank choice: ``"1"``, ``"0.05"``, ``"dense"``."""
    return choice if isinstance(choice, str) else repr(choice)


def resolve_rank(choice: Choice, full: int, align: int = 1) -> Optional[int]:
    """The rank ``choice`` gives a module of full rank ``full`` (``None``: dense); see the module doc."""
    if choice == DENSE:
        return None
    target = Fraction(choice) if isinstance(choice, int) else Fraction(repr(choice)) * full
    if full < align:
        return full
    nearest = align * math.floor(target / align + Fraction(1, 2))
    return min(max(nearest, align), full // align * align)


@dataclass(frozen=True)
class Layout:
    """A space laid over one projection table: the selected cells and each module's resolved ranks."""

    layers: Tuple[int, ...]                    # selected layers that hold a selected module, ascending
    types: Tuple[str, ...]                     # selected types, canonical order
    cells: Dict[Tuple[int, str], List[str]]    # (layer, type) -> module names, table order
    resolved: Dict[str, Tuple[Optional[int], ...]]  # module -> its rank under each choice, table order


@dataclass(frozen=True)
class Space:
    name: str
    ranks: Tuple[Choice, ...]
    model: Optional[str] = None
    model_config: Optional[Mapping[str, Any]] = None
    layers: Union[str, Tuple[int, ...], range] = "all"
    types: Optional[Tuple[str, ...]] = None
    group: str = "module"
    rules: Rules = Rules()
    description: str = ""

    needs_importance = False  # suggest() needs only the table (dse.allocation's spaces need more)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def load(cls, path) -> "Space":
        return cls.from_dict(read_yaml(path, "space", SpaceError))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Space":
        return _parse(data)

    def to_dict(self) -> Dict[str, Any]:
        """The space as plain data; ``Space.from_dict(space.to_dict()) == space``."""
        layers = self.layers
        if isinstance(layers, range):
            layers = {"from": layers.start, "to": layers.stop - 1}
        elif isinstance(layers, tuple):
            layers = list(layers)
        out = {"name": self.name, "description": self.description, "model": self.model,
               "model_config": dict(self.model_config) if self.model_config else None, "layers": layers,
               "types": list(self.types) if self.types else None, "ranks": list(self.ranks),
               "group": self.group, "rules": dataclasses.asdict(self.rules)}
        return {k: v for k, v in out.items() if v not in (None, "")}

    @property
    def labels(self) -> Tuple[str, ...]:
        return tuple(label(c) for c in self.ranks)

    def table(self):
        """The projection table of the space's model, from shapes only (see :mod:`dse.shapes`)."""
        from .shapes import projection_table

        try:
            return projection_table(self.model, self.model_config)
        except ValueError as e:
            raise SpaceError(f"space.{e}") from None

    def describe(self, table: Mapping) -> str:
        """What ``dse space FILE`` prints: :func:`format_counts`."""
        return format_counts(self, table)

    # --- over a table --------------------------------------------------------------------------

    def layout(self, table: Mapping, rules: Optional[Rules] = None) -> Layout:
        """Select cells of ``table`` and resolve every rank; ``rules`` default to the space's own."""
        rules = self.rules if rules is None else rules
        present = tensor_types(table)
        for i, t in enumerate(self.types or ()):
            if t not in present:
                raise SpaceError(f"space.types[{i}]: this model has no {t!r} projections "
                                 f"(it has {', '.join(present)})")
        types = tuple(t for t in present if t in (self.types or present))
        n_layers = 1 + max(p.layer for p in table.values())
        layers = selected_layers(self.layers, n_layers)
        kept = [layer for layer in layers if rules.skip_first <= layer < n_layers - rules.skip_last]
        if not kept:
            raise SpaceError(f"space.rules: skip_first {rules.skip_first} and skip_last {rules.skip_last} "
                             f"leave none of the {len(layers)} selected layers of {n_layers}")
        cells: Dict[Tuple[int, str], List[str]] = defaultdict(list)
        resolved = {}
        for name, p in table.items():
            if p.layer in kept and p.type in types:
                cells[(p.layer, p.type)].append(name)
                resolved[name] = self._resolve(name, p.full_rank)
        return Layout(tuple(sorted({layer for layer, _ in cells})), types, dict(cells), resolved)

    def _resolve(self, name: str, full: int) -> Tuple[Optional[int], ...]:
        resolved = tuple(resolve_rank(c, full, self.rules.align) for c in self.ranks)
        seen: Dict[int, int] = {}
        for j, r in enumerate(resolved):
            if r is not None and r in seen:
                raise SpaceError(f"space.ranks[{j}]: resolves to rank {r} like space.ranks[{seen[r]}] on "
                                 f"{name} (full rank {full}, align {self.rules.align})")
            seen.setdefault(r, j)
        return resolved

    # --- plans ---------------------------------------------------------------------------------

    def suggest(self, trial, table: Mapping, method: str = "svd", method_options=None) -> Plan:
        """Sample a plan with ``trial.suggest_categorical``, define-by-run, every rule by construction."""
        return Plan(self._build(self.layout(table), trial.suggest_categorical), method, dict(method_options or {}))

    def plan_from_params(self, params: Mapping[str, Any], table: Mapping, method: str = "svd",
                         method_options=None) -> Plan:
        """Rebuild the plan of a finished trial from its ``params``."""
        used = set()

        def choose(name, options):
            if name not in params:
                raise SpaceError(f"params: {name!r} is missing (space {self.name})")
            value = params[name]
            if not any(value == o and type(value) is type(o) for o in options):
                raise SpaceError(f"params[{name!r}]: {value!r} is not one of {list(options)}")
            used.add(name)
            return value

        ranks = self._build(self.layout(table), choose)
        extra = sorted(set(params) - used)
        if extra:
            raise SpaceError(f"params[{extra[0]!r}]: not asked by space {self.name} for these values")
        return Plan(ranks, method, dict(method_options or {}))

    def baseline_params(self, choice: Choice, table: Mapping) -> Dict[str, Any]:
        """Params giving every unit ``choice`` (``"dense"``, or a label of ``ranks``), as far as the
        rules allow: ``study.enqueue_trial(space.baseline_params("dense", table))``."""
        value = label(choice)
        if value not in self.labels and not (value == DENSE and self.group == "layer_x_type"):
            raise SpaceError(f"baseline: {value!r} is not one of space.ranks {list(self.labels)}")
        params: Dict[str, Any] = {}

        def choose(name, options):
            params[name] = (value != DENSE) if options == SWITCH else (value if value in options else options[0])
            return params[name]

        self._build(self.layout(table), choose)
        return params

    def _build(self, layout: Layout, choose: Choose) -> Dict[str, int]:
        """The ranks of a plan: the one walk behind suggest, plan_from_params and baseline_params."""
        picks: Dict[Tuple[int, str], Any] = {}  # cell -> label (layer_x_type: True until the rank is asked)
        labels, group = self.labels, self.group
        if group == "shared":
            value = choose("rank", labels)
            picks = dict.fromkeys(layout.cells, value)
        elif group == "type":
            for t in layout.types:
                value = choose(f"type.{t}", labels)
                picks.update((cell, value) for cell in layout.cells if cell[1] == t)
        else:
            decomposed: List[int] = []
            for layer in layout.layers:
                if not self.rules.may_decompose(len(decomposed), layer - 1 in decomposed[-1:]):
                    continue
                cells = [cell for cell in layout.cells if cell[0] == layer]
                if group == "module":
                    layer_picks = {cell: choose(f"L{layer}.{cell[1]}", labels) for cell in cells}
                elif group == "layer":
                    layer_picks = dict.fromkeys(cells, choose(f"L{layer}", labels))
                else:  # layer_x_type: a switch now; types and rank are asked below
                    layer_picks = dict.fromkeys(cells, True) if choose(f"L{layer}", SWITCH) else {}
                if any(v != DENSE for v in layer_picks.values()):
                    decomposed.append(layer)
                picks.update(layer_picks)
            if group == "layer_x_type":
                on = {t for t in layout.types if choose(f"type.{t}", SWITCH)}
                value = choose("rank", labels)
                picks = {cell: value for cell in picks if cell[1] in on}
        ranks = {}
        for cell, value in picks.items():
            j = labels.index(value)
            for name in layout.cells[cell]:
                if layout.resolved[name][j] is not None:
                    ranks[name] = layout.resolved[name][j]
        return {n: ranks[n] for n in layout.resolved if n in ranks}

    # --- counts --------------------------------------------------------------------------------

    def counts(self, table: Mapping) -> List[Tuple[str, int]]:
        """Exact configuration counts: no rules, then each rule added in turn (see the module doc)."""
        r = self.rules
        steps = [("no rules", Rules(align=r.align))]
        if r.skip_first or r.skip_last:
            steps.append((f"skip_first {r.skip_first}, skip_last {r.skip_last}",
                          dataclasses.replace(steps[-1][1], skip_first=r.skip_first, skip_last=r.skip_last)))
        if r.max_layers is not None:
            steps.append((f"max_layers {r.max_layers}", dataclasses.replace(steps[-1][1], max_layers=r.max_layers)))
        if r.no_adjacent:
            steps.append(("no_adjacent", dataclasses.replace(steps[-1][1], no_adjacent=True)))
        rows = [(name, self._count(self.layout(table, rules), rules)) for name, rules in steps]
        if self.group == "layer_x_type":
            layout = self.layout(table)
            per_subset = 2 ** len(layout.types) * len(self.ranks)
            subsets = rows[-1][1] // per_subset
            rows.append(("distinct plans", 1 + (subsets - 1) * (2 ** len(layout.types) - 1) * len(self.ranks)))
        return rows

    def _count(self, layout: Layout, rules: Rules) -> int:
        c, dense = len(self.ranks), int(DENSE in self.labels)
        if self.group == "shared":
            return c
        if self.group == "type":
            return c ** len(layout.types)
        # Layers in order; state (decomposed so far, previous layer decomposed) -> configurations.
        states = {(0, False): 1}
        previous = None
        for layer in layout.layers:
            width = sum(1 for cell in layout.cells if cell[0] == layer)
            # (configurations leaving the layer dense, configurations decomposing it)
            per_layer = {"module": (dense, c ** width - dense), "layer": (dense, c - dense),
                         "layer_x_type": (1, 1)}[self.group]
            adjacent = previous == layer - 1
            nxt: Dict[Tuple[int, bool], int] = defaultdict(int)
            for (k, was_on), n in states.items():
                if not rules.may_decompose(k, was_on and adjacent):
                    nxt[(k, False)] += n  # not asked: one configuration
                    continue
                nxt[(k, False)] += n * per_layer[0]
                nxt[(k + 1, True)] += n * per_layer[1]
            states, previous = nxt, layer
        total = sum(states.values())
        if self.group == "layer_x_type":
            total *= 2 ** len(layout.types) * c
        return total


def selected_layers(layers, n_layers: int) -> List[int]:
    """The layer indices a space's ``layers`` field selects in a model of ``n_layers``."""
    if layers == "all":
        return list(range(n_layers))
    for i, layer in enumerate(layers):
        if layer >= n_layers:
            where = "space.layers" + ("" if isinstance(layers, range) else f"[{i}]")
            raise SpaceError(f"{where}: layer {layer} does not exist (the model has {n_layers}, 0..{n_layers - 1})")
    return list(layers)


def load_space(path):
    """The space in a YAML file: see :func:`space_from_dict`."""
    return space_from_dict(read_yaml(path, "space", SpaceError))


def space_from_dict(data):
    """A grid :class:`Space`, or a :class:`dse.allocation.AllocationSpace` when ``data`` has ``budget``."""
    if isinstance(data, Mapping) and "budget" in data:
        from .allocation import AllocationSpace

        return AllocationSpace.from_dict(data)
    return Space.from_dict(data)


def format_counts(space: Space, table: Mapping) -> str:
    """The table ``dse space FILE`` prints: the count after each rule, exactly and as log2."""
    layout = space.layout(table)
    head = (f"space {space.name}: {len(layout.layers)} layers x {len(layout.types)} types "
            f"({len(layout.resolved)} modules), group {space.group}, ranks {', '.join(space.labels)}")
    rows = space.counts(table)
    width = max(len(name) for name, _ in rows)
    lines = [head, f"{'':<{width}}  {'log2':>8}  configurations"]
    lines += [f"{name:<{width}}  {math.log2(n):>8.2f}  {n}" for name, n in rows]
    return "\n".join(lines)


# --- validation --------------------------------------------------------------------------------

_KEYS = ("name", "description", "model", "model_config", "layers", "types", "ranks", "group", "rules")


def _int(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpaceError(f"{where}: expected an integer, got {value!r}")
    if value < minimum:
        raise SpaceError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _choice(value, where: str) -> Choice:
    if value == DENSE:
        return DENSE
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, float) and 0 < value < 1:
        return value
    raise SpaceError(f"{where}: expected an int >= 1 (rank), a float in (0, 1) (fraction of full rank) "
                     f"or 'dense', got {value!r}")


def parse_layers(value) -> Union[str, Tuple[int, ...], range]:
    if value == "all":
        return value
    if isinstance(value, Mapping):
        check_keys(value, ("from", "to"), "space.layers", SpaceError)
        for key in ("from", "to"):
            if key not in value:
                raise SpaceError(f"space.layers.{key}: missing (a range is {{from: A, to: B}}, both included)")
        first, last = _int(value["from"], "space.layers.from", 0), _int(value["to"], "space.layers.to", 0)
        if last < first:
            raise SpaceError(f"space.layers.to: {last} is below from {first}")
        return range(first, last + 1)
    if isinstance(value, list) and value:
        layers = tuple(_int(v, f"space.layers[{i}]", 0) for i, v in enumerate(value))
        for i, layer in enumerate(layers):
            if layer in layers[:i]:
                raise SpaceError(f"space.layers[{i}]: layer {layer} is listed twice")
        return tuple(sorted(layers))
    raise SpaceError(f"space.layers: expected 'all', a non-empty list of layer indices or {{from: A, to: B}}, "
                     f"got {value!r}")


def _rules(value, group: str, has_dense: bool) -> Rules:
    if not isinstance(value, Mapping):
        raise SpaceError(f"space.rules: expected a mapping, got {value!r}")
    known = [f.name for f in dataclasses.fields(Rules)]
    check_keys(value, known, "space.rules", SpaceError)
    kw = dict(value)
    for key in ("skip_first", "skip_last"):
        if key in kw:
            _int(kw[key], f"space.rules.{key}", 0)
    if "align" in kw:
        _int(kw["align"], "space.rules.align", 1)
    if kw.get("max_layers") is not None:
        _int(kw["max_layers"], "space.rules.max_layers", 1)
    if not isinstance(kw.get("no_adjacent", False), bool):
        raise SpaceError(f"space.rules.no_adjacent: expected true or false, got {kw['no_adjacent']!r}")
    rules = Rules(**kw)
    for key in ("max_layers", "no_adjacent"):
        if getattr(rules, key) not in (None, False):
            if group not in LAYER_RULE_GROUPS:
                raise SpaceError(f"space.rules.{key}: applies to groups {', '.join(LAYER_RULE_GROUPS)}, "
                                 f"not {group}")
            if group != "layer_x_type" and not has_dense:
                raise SpaceError(f"space.rules.{key}: needs 'dense' among space.ranks (with group {group} "
                                 f"every selected layer is decomposed otherwise)")
    return rules


def parse_model(data, keys) -> Tuple[str, str, Optional[str], Optional[Dict[str, Any]]]:
    """``(name, description, model, model_config)`` of a space file, after checking its keys."""
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
    if model_config is not None and not (isinstance(model_config, Mapping)
                                         and isinstance(model_config.get("model_type"), str)):
        raise SpaceError("space.model_config: expected a mapping with a model_type")
    return name, description, model, dict(model_config) if model_config else None


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


def _parse(data) -> Space:
    name, description, model, model_config = parse_model(data, _KEYS)
    group = data.get("group", "module")
    if group not in GROUPS:
        raise SpaceError(f"space.group: expected one of {', '.join(GROUPS)}, got {group!r}")
    raw_ranks = data.get("ranks")
    if not isinstance(raw_ranks, list) or not raw_ranks:
        raise SpaceError(f"space.ranks: expected a non-empty list of choices, got {raw_ranks!r}")
    ranks = tuple(_choice(v, f"space.ranks[{i}]") for i, v in enumerate(raw_ranks))
    labels = [label(c) for c in ranks]
    for i, value in enumerate(labels):
        if value in labels[:i]:
            raise SpaceError(f"space.ranks[{i}]: {value} is listed twice")
        if value == DENSE and group == "layer_x_type":
            raise SpaceError(f"space.ranks[{i}]: group layer_x_type leaves modules dense by its switches; "
                             f"remove 'dense'")
    if labels == [DENSE]:
        raise SpaceError("space.ranks: needs a rank besides 'dense'")
    return Space(name=name, ranks=ranks, model=model, model_config=model_config,
                 layers=parse_layers(data.get("layers", "all")), types=parse_types(data.get("types")), group=group,
                 rules=_rules(data.get("rules") or {}, group, DENSE in labels), description=description)
