"""Package faces that import their heavy modules on first use (PEP 562).

A face imports eagerly only what its registrations need (torch-free modules), so ``dse list`` and
reading a space file never import torch; every other public name is imported from its submodule
when first read::

    __getattr__, _LAZY = lazy_names(__name__, {"surgery": ("decompose_", "restore_")})
"""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Tuple


def lazy_names(package: str, modules: Mapping[str, Iterable[str]]) -> Tuple[Callable, List[str]]:
    """``(__getattr__, names)`` for the face of ``package``: each name listed under a submodule of
    ``modules`` is imported from it on first access and kept on the package."""
    where = {name: sub for sub, names in modules.items() for name in names}
    folder = Path(sys.modules[package].__file__).parent
    for name in where:  # importing that submodule would set the package attribute to the module
        if (folder / f"{name}.py").exists() or (folder / name).is_dir():
            raise ValueError(f"{package}.{name}: a lazy name may not be a submodule's name; import it at once")

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, list(where)
