"""Checks of plain data from YAML and JSON: each failure is one line naming the field.

``where`` is the field's path (see :mod:`dse.core.errors`); ``error`` picks the kind raised
(:class:`~dse.core.errors.ConfigError` by default, e.g. ``SpaceError`` for a space file).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from .errors import ConfigError

INF = math.inf
UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(" + "|".join(UNITS) + ")$")


def byte_size(value, where: str) -> int:
    """Bytes given as a positive integer or a size such as ``2GB`` or ``20GiB``."""
    match = SIZE.match(value.strip()) if isinstance(value, str) else None
    if match:
        return int(float(match[1]) * UNITS[match[2]])
    if not (is_int(value) and value > 0):
        raise ConfigError(f"{where}: expected bytes or a size such as 20GiB, got {value!r}")
    return value


def read_yaml(path, what: str, error: type = ConfigError) -> Dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad syntax or a non-mapping raise ``error``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{what}: YAML syntax error{at} in {path}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def read_json(path, what: str, error: type = ConfigError, hint: str = ""):
    """The data in a JSON file; a missing file or bad syntax raise ``error`` (``hint`` ends the
    syntax message, e.g. what may have gone wrong)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{what}: {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}") from None


def mapping(value, where: str, error: type = ConfigError, allowed: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """``value`` as a dict, checked to be a mapping (and its keys against ``allowed`` if given)."""
    if not isinstance(value, Mapping):
        raise error(f"{where}: expected a mapping, got {_shown(value)}")
    if allowed is not None:
        check_keys(value, allowed, where, error)
    return dict(value)


def check_keys(data: Mapping, allowed: Iterable[str], where: str, error: type = ConfigError) -> None:
    """Raise ``error`` naming the first key of ``data`` that is not in ``allowed``."""
    allowed = set(allowed)
    unknown = sorted(set(data) - allowed, key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise error(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})")


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(value, where: str, minimum: Optional[int] = None, error: type = ConfigError) -> int:
    """An integer (not a bool), at least ``minimum`` when given."""
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise error(f"{where}: expected an integer{bound}, got {_shown(value)}")
    return value


def number(
    value,
    where: str,
    low: float = -INF,
    high: float = INF,
    *,
    open_low: bool = False,
    open_high: bool = False,
    error: type = ConfigError,
) -> float:
    """A finite or infinite number in the interval from ``low`` to ``high`` (ends closed unless open)."""
    if not is_number(value):
        raise error(f"{where}: expected a number, got {_shown(value)}")
    if math.isnan(value) or value < low or value > high or (open_low and value == low) or (open_high and value == high):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise error(f"{where}: must be in {interval}, got {value:g}")
    return float(value)


def boolean(value, where: str, error: type = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{where}: expected true or false, got {_shown(value)}")
    return value


def string(value, where: str, error: type = ConfigError) -> str:
    if not isinstance(value, str) or not value:
        raise error(f"{where}: expected a non-empty string, got {_shown(value)}")
    if "\x00" in value:
        raise error(f"{where}: a NUL character is not allowed in {_shown(value)}")
    return value


def finite(x) -> bool:
    """A real number that is neither NaN nor infinite."""
    return is_number(x) and math.isfinite(x)


def resolve_path(base: Optional[Path], path, where: str, error: type = ConfigError) -> Path:
    """``path`` (``~`` expanded) made absolute against ``base`` (or the working directory), checked
    to be a non-empty string (``where`` names the field)."""
    p = Path(string(path, where, error)).expanduser()
    return p if p.is_absolute() else ((Path(base) if base else Path.cwd()) / p).resolve()


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
