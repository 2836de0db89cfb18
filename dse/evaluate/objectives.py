"""Objectives: what a study optimises, each one registered unit (as lm-eval keeps a metric with its
``higher_is_better``).

An :class:`Objective` says which trial attribute holds its value, its direction, how tables and
plots show it, its hypervolume reference, which measurement it needs switched on in the
evaluation, and optionally how it is derived from other metrics. Studies (``objectives:``), the
worker, ``dse status``, ``dse pareto``, the front and its plots all read it from
:data:`OBJECTIVES`; the built-ins register in :mod:`dse.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

from ..core.registry import Registry
from ..core.validate import finite

Requires = Callable[[object], Optional[str]]  # EvalConfig -> the missing switch, or None
Derive = Callable[[Mapping[str, float]], Optional[float]]  # a trial's metrics -> the value, or None


@dataclass(frozen=True)
class Objective:
    """One objective of a study.

    ``attribute``: the trial attribute holding its value. ``direction``: ``maximize`` or
    ``minimize``. ``label`` (axes) and ``header`` / ``fmt`` (tables) show it. ``reference``: the
    hypervolume reference value, or None for ``reference_factor`` times the undecomposed model's
    value. ``size``: a size objective (drawn on the x axis, never the quality axis). ``requires``:
    given the study's :class:`~dse.evaluate.EvalConfig`, the evaluation field that must be switched
    on for the value to exist (None when it is). ``derive``: computes the value from a trial's
    other metrics (None when it cannot), for objectives no evaluation measures directly.
    ``healed``: measured after each trial's model is healed (the study needs ``heal:``).
    """

    name: str
    attribute: str
    direction: str
    label: str
    header: str
    fmt: str = "{:.4g}"
    reference: Optional[float] = None
    reference_factor: float = 2.0
    size: bool = False
    requires: Optional[Requires] = None
    derive: Optional[Derive] = None
    healed: bool = False
    help: str = ""

    def __post_init__(self):
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(f"objective {self.name}: direction must be maximize or minimize, got {self.direction!r}")

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def missing(self, evaluation) -> Optional[str]:
        """The evaluation field this objective needs that ``evaluation`` leaves off, or None."""
        return self.requires(evaluation) if self.requires else None

    def format(self, value) -> str:
        return self.fmt.format(value) if finite(value) else "-"


OBJECTIVES: Registry[Objective] = Registry("objective")


def register_objective(objective: Objective) -> Objective:
    return OBJECTIVES.register(objective.name, objective)


HEALED = "_healed"  # the suffix of a metric measured after healing


def healed(objective: Objective) -> Objective:
    """``objective`` measured after the trial's model is healed: ``<name>_healed``, kept in
    ``<attribute>_healed``."""
    return replace(
        objective,
        name=objective.name + HEALED,
        attribute=objective.attribute + HEALED,
        label=f"{objective.label}, healed",
        header=f"{objective.header} healed",
        derive=None,
        healed=True,
        help=f"{objective.help}, after the study's heal: of the trial's model",
    )


def healed_metrics(metrics: Mapping[str, float]) -> dict:
    """``metrics`` (an evaluation's) under their healed names."""
    return {key + HEALED: value for key, value in metrics.items()}


def derive_metrics(metrics: Mapping[str, float]) -> dict:
    """``metrics`` with the value of every registered derived objective that it lacks and can give."""
    out = dict(metrics)
    for objective in OBJECTIVES.values():
        if objective.derive is not None and objective.attribute not in out:
            value = objective.derive(out)
            if value is not None:
                out[objective.attribute] = value
    return out
