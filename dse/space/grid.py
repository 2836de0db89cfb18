"""Search spaces: which modules a study may decompose, at which ranks, and how the choices group.

A grid space is a YAML file (or a dict) validated into a frozen :class:`Space`::

    name: smollm2-quick                     # required
    description: free text                  # optional
    model: smollm2-135m                     # the model a study loads (dse.model.load_model)
    model_config: {model_type: llama, ...}  # optional: shapes come from this config, offline
    family: llama                           # optional: the family (dse list families); default: recognised
    layers: all                             # all | [0, 3, 7] | {from: 2, to: 10} (both ends included)
    types: [q, k, v, o, gate, up, down]     # tensor types (dse.model); default: all the model has
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

**Groups** (the Optuna parameter each choice is asked under; units of :data:`dse.space.GROUPS`):

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
``l + 1``). ``align: a``: ranks resolve to multiples of ``a``; ``align: auto``: a study rounds each
sampled rank down to its shape's measured fast step (:mod:`dse.decompose.latency`) and leaves dense
any module whose rank is measured no faster than dense (counts are those of ``align: 1``).
``max_layers`` and ``no_adjacent``
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
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..core.errors import SpaceError
from ..core.validate import boolean, check_keys, integer
from ..decompose import Plan
from ..model import n_layers
from .fields import Layers, ModelSpace, SpaceContext, layers_to_data, parse_layers, parse_model, parse_types
from .groups import DENSE, GROUPS, SWITCH, Choose

Choice = Union[int, float, str]


@dataclass(frozen=True)
class Rules:
    skip_first: int = 0
    skip_last: int = 0
    no_adjacent: bool = False
    max_layers: Optional[int] = None
    align: Union[int, str] = 1  # or "auto": each shape's measured fast step (a latency table), at run time

    @property
    def align_step(self) -> int:
        """The step ranks resolve to in the space itself (``auto`` rounds later, by the latency table)."""
        return 1 if self.align == "auto" else self.align

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

    layers: Tuple[int, ...]  # selected layers that hold a selected module, ascending
    types: Tuple[str, ...]  # selected types, canonical order
    cells: Dict[Tuple[int, str], List[str]]  # (layer, type) -> module names, table order
    resolved: Dict[str, Tuple[Optional[int], ...]]  # module -> its rank under each choice, table order


@dataclass(frozen=True)
class Space(ModelSpace):
    name: str
    ranks: Tuple[Choice, ...]
    model: Optional[str] = None
    model_config: Optional[Mapping[str, Any]] = None
    family: Optional[str] = None
    layers: Layers = "all"
    types: Optional[Tuple[str, ...]] = None
    group: str = "module"
    rules: Rules = Rules()
    description: str = ""

    # --- construction (files: dse.space.load_space) ---------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Space":
        return _parse(data)

    def to_dict(self) -> Dict[str, Any]:
        """The space as plain data; ``Space.from_dict(space.to_dict()) == space``."""
        out = {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "model_config": dict(self.model_config) if self.model_config else None,
            "family": self.family,
            "layers": layers_to_data(self.layers),
            "types": list(self.types) if self.types else None,
            "ranks": list(self.ranks),
            "group": self.group,
            "rules": dataclasses.asdict(self.rules),
        }
        return {k: v for k, v in out.items() if v not in (None, "")}

    @property
    def labels(self) -> Tuple[str, ...]:
        return tuple(label(c) for c in self.ranks)

    def describe(self, table: Mapping) -> str:
        """What ``dse space FILE`` prints: :func:`format_counts`."""
        return format_counts(self, table)

    # --- over a table --------------------------------------------------------------------------

    def layout(self, table: Mapping, rules: Optional[Rules] = None) -> Layout:
        """Select cells of ``table`` and resolve every rank; ``rules`` default to the space's own."""
        rules = self.rules if rules is None else rules
        types = self.selected_types(table)
        count = n_layers(table)
        layers = self.selected_layers(table)
        kept = [layer for layer in layers if rules.skip_first <= layer < count - rules.skip_last]
        if not kept:
            raise SpaceError(
                f"space.rules: skip_first {rules.skip_first} and skip_last {rules.skip_last} "
                f"leave none of the {len(layers)} selected layers of {count}"
            )
        cells: Dict[Tuple[int, str], List[str]] = defaultdict(list)
        resolved = {}
        for name, p in table.items():
            if p.layer in kept and p.type in types:
                cells[(p.layer, p.type)].append(name)
                resolved[name] = self._resolve(name, p.full_rank)
        return Layout(tuple(sorted({layer for layer, _ in cells})), types, dict(cells), resolved)

    def _resolve(self, name: str, full: int) -> Tuple[Optional[int], ...]:
        resolved = tuple(resolve_rank(c, full, self.rules.align_step) for c in self.ranks)
        seen: Dict[int, int] = {}
        for j, r in enumerate(resolved):
            if r is not None and r in seen:
                raise SpaceError(
                    f"space.ranks[{j}]: resolves to rank {r} like space.ranks[{seen[r]}] on "
                    f"{name} (full rank {full}, align {self.rules.align})"
                )
            seen.setdefault(r, j)
        return resolved

    # --- plans ---------------------------------------------------------------------------------

    @property
    def aligns_ranks(self) -> bool:
        return self.rules.align == "auto"

    def suggest(self, trial, context: SpaceContext) -> Plan:
        """Sample a plan with ``trial.suggest_categorical``, define-by-run, every rule by construction."""
        return Plan(self._build(self.layout(context.table), trial.suggest_categorical), context.method)

    def plan_from_params(self, params: Mapping[str, Any], context: SpaceContext) -> Plan:
        """Rebuild the plan of a finished trial from its ``params``."""
        table, method = context.table, context.method
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
        return Plan(ranks, method)

    def baseline_params(self, choice: Choice, table: Mapping) -> Dict[str, Any]:
        """Params giving every unit ``choice`` (``"dense"``, or a label of ``ranks``), as far as the
        rules allow: ``study.enqueue_trial(space.baseline_params("dense", table))``."""
        value = label(choice)
        if value not in self.labels and not (value == DENSE and GROUPS.get(self.group).switches):
            raise SpaceError(f"baseline: {value!r} is not one of space.ranks {list(self.labels)}")
        params: Dict[str, Any] = {}

        def choose(name, options):
            params[name] = (value != DENSE) if options == SWITCH else (value if value in options else options[0])
            return params[name]

        self._build(self.layout(table), choose)
        return params

    def _build(self, layout: Layout, choose: Choose) -> Dict[str, int]:
        """The ranks of a plan: the group's walk, then each picked cell's modules at their rank."""
        picks = GROUPS.get(self.group).walk(self, layout, choose)
        ranks = {}
        for cell, value in picks.items():
            j = self.labels.index(value)
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
            steps.append(
                (
                    f"skip_first {r.skip_first}, skip_last {r.skip_last}",
                    dataclasses.replace(steps[-1][1], skip_first=r.skip_first, skip_last=r.skip_last),
                )
            )
        if r.max_layers is not None:
            steps.append((f"max_layers {r.max_layers}", dataclasses.replace(steps[-1][1], max_layers=r.max_layers)))
        if r.no_adjacent:
            steps.append(("no_adjacent", dataclasses.replace(steps[-1][1], no_adjacent=True)))
        group = GROUPS.get(self.group)
        rows = [(name, group.count(self, self.layout(table, rules), rules)) for name, rules in steps]
        distinct = group.distinct(self, self.layout(table), rows[-1][1])
        if distinct is not None:
            rows.append(("distinct plans", distinct))
        return rows


def format_counts(space: Space, table: Mapping) -> str:
    """The table ``dse space FILE`` prints: the count after each rule, exactly and as log2."""
    layout = space.layout(table)
    head = (
        f"space {space.name}: {len(layout.layers)} layers x {len(layout.types)} types "
        f"({len(layout.resolved)} modules), group {space.group}, ranks {', '.join(space.labels)}"
    )
    rows = space.counts(table)
    width = max(len(name) for name, _ in rows)
    lines = [head, f"{'':<{width}}  {'log2':>8}  configurations"]
    lines += [f"{name:<{width}}  {math.log2(n):>8.2f}  {n}" for name, n in rows]
    return "\n".join(lines)


# --- validation --------------------------------------------------------------------------------

_KEYS = ("name", "description", "model", "model_config", "family", "layers", "types", "ranks", "group", "rules")


def _choice(value, where: str) -> Choice:
    if value == DENSE:
        return DENSE
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, float) and 0 < value < 1:
        return value
    raise SpaceError(
        f"{where}: expected an int >= 1 (rank), a float in (0, 1) (fraction of full rank) or 'dense', got {value!r}"
    )


def _rules(value, group: str, has_dense: bool) -> Rules:
    if not isinstance(value, Mapping):
        raise SpaceError(f"space.rules: expected a mapping, got {value!r}")
    check_keys(value, [f.name for f in dataclasses.fields(Rules)], "space.rules", SpaceError)
    kw = dict(value)
    for key in ("skip_first", "skip_last"):
        if key in kw:
            integer(kw[key], f"space.rules.{key}", 0, SpaceError)
    if "align" in kw and kw["align"] != "auto":
        integer(kw["align"], "space.rules.align", 1, SpaceError)
    if kw.get("max_layers") is not None:
        integer(kw["max_layers"], "space.rules.max_layers", 1, SpaceError)
    if "no_adjacent" in kw:
        boolean(kw["no_adjacent"], "space.rules.no_adjacent", SpaceError)
    rules = Rules(**kw)
    unit = GROUPS.get(group)
    for key in ("max_layers", "no_adjacent"):
        if getattr(rules, key) not in (None, False):
            if not unit.layer_rules:
                raise SpaceError(
                    f"space.rules.{key}: applies to groups {', '.join(GROUPS.where(lambda g: g.layer_rules))}, "
                    f"not {group}"
                )
            if not unit.switches and not has_dense:
                raise SpaceError(
                    f"space.rules.{key}: needs 'dense' among space.ranks (with group {group} "
                    f"every selected layer is decomposed otherwise)"
                )
    return rules


def _parse(data) -> Space:
    fields = parse_model(data, _KEYS)
    group = data.get("group", "module")
    unit = GROUPS.get(group, "space.group", SpaceError)
    raw_ranks = data.get("ranks")
    if not isinstance(raw_ranks, list) or not raw_ranks:
        raise SpaceError(f"space.ranks: expected a non-empty list of choices, got {raw_ranks!r}")
    ranks = tuple(_choice(v, f"space.ranks[{i}]") for i, v in enumerate(raw_ranks))
    labels = [label(c) for c in ranks]
    for i, value in enumerate(labels):
        if value in labels[:i]:
            raise SpaceError(f"space.ranks[{i}]: {value} is listed twice")
        if value == DENSE and unit.switches:
            raise SpaceError(f"space.ranks[{i}]: group {group} leaves modules dense by its switches; remove 'dense'")
    if labels == [DENSE]:
        raise SpaceError("space.ranks: needs a rank besides 'dense'")
    return Space(
        **fields,
        ranks=ranks,
        layers=parse_layers(data.get("layers", "all")),
        types=parse_types(data.get("types")),
        group=group,
        rules=_rules(data.get("rules") or {}, group, DENSE in labels),
    )
