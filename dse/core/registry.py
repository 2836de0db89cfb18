"""One registry for every kind of plug-in: methods, families, objectives, samplers, task sources ...

A :class:`Registry` maps a name to one unit. Units register where their package is assembled (its
``__init__``, as PEFT's tuners do), a lookup of an unknown name is a one-line
:class:`~dse.core.errors.ConfigError` that names the field and suggests the closest name, and
:meth:`Registry.describe` lists the units for ``--help``, ``dse list`` and the docs::

    METHODS = Registry("method")

    @METHODS.register("svd")
    class SVDMethod: ...

    METHODS.get("svdd", where="method")
    # ConfigError: method: unknown method 'svdd' (did you mean 'svd'?); known: asvd, svd, svdllm, tucker2
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named units of one ``kind``, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._units: Dict[str, T] = {}
        self._help: Dict[str, str] = {}

    def register(self, name: str, unit: Optional[T] = None, *, help: Optional[str] = None, replace: bool = False):
        """Register ``unit`` under ``name`` and return it; without ``unit``, a decorator.

        ``help`` defaults to the first line of the unit's docstring (a function or class), or of an
        instance's ``help`` attribute or class docstring. A name taken already is an error unless ``replace``.
        """
        if unit is None:
            return lambda u: self.register(name, u, help=help, replace=replace)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: a name must be a non-empty string, got {name!r}")
        if name in self._units and not replace:
            raise ValueError(f"{self.kind} registry: {name!r} is registered already (replace=True to override)")
        self._units[name] = unit
        self._help[name] = help if help is not None else _first_line(unit)
        return unit

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its unit (for plug-ins with a lifetime, and tests)."""
        self._help.pop(name, None)
        return self._units.pop(name)

    def get(self, name, where: Optional[str] = None, error: type = ConfigError) -> T:
        """The unit of ``name``; an unknown name raises a one-line ``error`` naming ``where``."""
        if isinstance(name, str) and name in self._units:
            return self._units[name]
        close = difflib.get_close_matches(str(name), list(self._units), n=1) if isinstance(name, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise error(f"{where or self.kind}: unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}")

    def __getitem__(self, name: str) -> T:
        return self._units[name]

    def __contains__(self, name) -> bool:
        return name in self._units

    def __iter__(self) -> Iterator[str]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def names(self) -> List[str]:
        return sorted(self._units)

    def items(self) -> List[Tuple[str, T]]:
        return list(self._units.items())

    def values(self) -> List[T]:
        return list(self._units.values())

    def describe(self) -> str:
        """One line per unit, ``name  help``, for ``--help`` and the docs."""
        width = max((len(n) for n in self._units), default=0)
        return "\n".join(f"{n:<{width}}  {self._help[n]}".rstrip() for n in self._units)

    def where(self, predicate: Callable[[T], bool]) -> List[str]:
        """The names whose unit satisfies ``predicate``, in registration order."""
        return [n for n, u in self._units.items() if predicate(u)]


def _first_line(unit) -> str:
    """A function's or class's first docstring line; an instance's ``help`` attribute, else its
    class's docstring."""
    if callable(unit) and hasattr(unit, "__name__"):
        text = unit.__doc__
    else:
        text = getattr(unit, "help", None) or type(unit).__doc__
    text = (text or "").strip()
    return text.splitlines()[0].strip() if text else ""
