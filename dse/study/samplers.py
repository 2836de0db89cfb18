"""Samplers: one registered unit per Optuna sampler a study may name, with validated options.

A study writes ``sampler: tpe`` or ``sampler: {name: tpe, n_startup_trials: 8}``. Every option is a
keyword of the Optuna sampler's constructor whose type is plain data (bool, int, float, str);
:func:`parse_sampler` checks names and types, builds the sampler once to let Optuna check values,
and returns a :class:`SamplerConfig`. A sampler that cannot steer by constraints (``random``) says
so when a study with constraints starts; constraints still decide which trials are feasible.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping

import optuna

from ..core.errors import ConfigError
from ..core.registry import Registry
from ..core.validate import is_int, is_number, mapping

_PLAIN = {"bool": lambda v: isinstance(v, bool), "int": is_int, "float": is_number, "str": lambda v: isinstance(v, str)}


@contextmanager
def quiet_optuna():
    """Optuna's experimental-feature warnings (heartbeats, grouped TPE) are not the user's concern.

    Also hidden: optuna 5 deprecates ``constraints_func`` (removal planned for v7) in favour of
    ``Trial.set_constraint``; ``dse`` keeps the former while it supports optuna 4.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
        yield


@contextmanager
def optuna_log_level(level: int = optuna.logging.WARNING):
    """Optuna's log level for the block, put back after (as a decorator: for the call): its line
    per finished trial is the progress bar's job."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


@dataclass(frozen=True)
class Sampler:
    """An Optuna sampler class with ``dse``'s defaults; ``shared`` options apply when several
    workers run one study."""

    cls: type
    defaults: Mapping[str, Any] = field(default_factory=dict)
    shared: Mapping[str, Any] = field(default_factory=dict)
    help: str = ""

    @property
    def honours_constraints(self) -> bool:
        return "constraints_func" in inspect.signature(self.cls).parameters

    def options(self) -> Dict[str, Callable[[Any], bool]]:
        """Option name -> type check, for every constructor keyword that takes plain data."""
        out = {}
        for name, p in inspect.signature(self.cls).parameters.items():
            kinds = set(re.findall(r"[A-Za-z_]+", str(p.annotation))) - {"None"}
            if name not in ("seed", "constraints_func") and kinds and kinds <= set(_PLAIN):
                nullable = p.default is None or "None" in str(p.annotation)
                out[name] = lambda v, kinds=kinds, nullable=nullable: (
                    (v is None and nullable) or any(_PLAIN[k](v) for k in kinds)
                )
        return out


SAMPLERS: Registry[Sampler] = Registry("sampler")


@dataclass(frozen=True)
class SamplerConfig:
    """A study's sampler: its name and the options the study gave."""

    name: str = "tpe"
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> Sampler:
        return SAMPLERS.get(self.name, "sampler")

    def make(self, seed: int, constraints_func=None, shared: bool = False):
        """The Optuna sampler (``constraints_func`` dropped if it cannot use one). ``shared``: one of
        several workers, so the seed is made distinct per
        process (equal seeds would make every worker propose the same plans) and the ``shared``
        options apply (TPE lies constantly about running trials so that workers spread out)."""
        unit = self.unit
        kw = {**unit.defaults, **(unit.shared if shared else {}), **self.options}
        kw["seed"] = seed + os.getpid() if shared else seed
        if unit.honours_constraints:
            kw["constraints_func"] = constraints_func
        with quiet_optuna():
            return unit.cls(**kw)


def parse_sampler(data) -> SamplerConfig:
    """The ``sampler:`` field of a study: a name, or a mapping with ``name`` and options."""
    if isinstance(data, str) or data is None:
        data = {"name": data or "tpe"}
    data = mapping(data, "sampler")
    name = data.pop("name", "tpe")
    unit = SAMPLERS.get(name, "sampler.name" if data else "sampler")
    allowed = unit.options()
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"sampler.{key}: {name} has no such option (known: {', '.join(sorted(allowed))})")
        if not allowed[key](value):
            raise ConfigError(
                f"sampler.{key}: expected {inspect.signature(unit.cls).parameters[key].annotation}, got {value!r}"
            )
    config = SamplerConfig(name, data)
    try:
        config.make(0)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampler: {name} refuses these options: {str(e).splitlines()[0]}") from None
    return config
