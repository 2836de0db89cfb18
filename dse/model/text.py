"""Text a model reads: where it comes from (:class:`TextSource`) and its token windows.

Perplexity (:mod:`dse.evaluate`) and calibration (:mod:`dse.decompose`) both read a text a study
names: a plain text file, a JSONL file (one field, a slice of rows, joined by a separator) or a
hub dataset.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..core.errors import ConfigError
from ..core.validate import check_keys, mapping, resolve_path


@dataclass(frozen=True)
class TextSource:
    """Where a text comes from.

    ``path``: a ``.txt`` file, or a ``.jsonl`` file whose ``field`` of rows ``rows[0]:rows[1]`` is
    joined with ``separator``. ``dataset``: a hub dataset (``name``, ``split``, ``field``) instead.
    ``where`` is the field path of this source in the study, for error messages.
    """

    path: Optional[str] = None
    dataset: Optional[str] = None
    name: Optional[str] = None
    split: str = "test"
    field: str = "text"
    rows: Optional[Tuple[int, int]] = None
    separator: str = "\n\n"
    where: str = dataclasses.field(default="text", compare=False, repr=False)

    @classmethod
    def from_dict(cls, data, where: str = "text", base: Optional[Path] = None) -> "TextSource":
        """From plain data (a study's ``text:`` block); a relative ``path`` resolves against ``base``."""
        data = mapping(data, where)
        check_keys(data, {f.name for f in fields(cls)} - {"where"}, where)
        if (data.get("path") is None) == (data.get("dataset") is None):
            raise ConfigError(f"{where}: give exactly one of path and dataset")
        if data.get("path") is not None:
            data["path"] = str(resolve_path(base, data["path"], f"{where}.path"))
            if not Path(data["path"]).is_file():
                raise ConfigError(f"{where}.path: no such file {data['path']!r}")
        rows = data.get("rows")
        if rows is not None:
            if not (isinstance(rows, (list, tuple)) and len(rows) == 2 and all(isinstance(r, int) for r in rows)):
                raise ConfigError(f"{where}.rows: expected [first, end], got {rows!r}")
            data["rows"] = tuple(rows)
        return cls(**data, where=where)

    def to_dict(self) -> dict:
        """The source as plain data (:meth:`from_dict` reads it back)."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in fields(self)
            if f.name != "where"
        }

    def check_disjoint(self, other: "TextSource") -> None:
        """Refuse in one line a text that shares text with ``other``: both read one local file, as
        JSONL rows that meet (no ``rows``: all of them) or as the same plain file. Hub datasets are
        not compared."""
        if self.path is None or other.path is None or Path(self.path).resolve() != Path(other.path).resolve():
            return
        rows = self.rows or (0, math.inf), other.rows or (0, math.inf)
        if Path(self.path).suffix == ".jsonl" and max(rows[0][0], rows[1][0]) >= min(rows[0][1], rows[1][1]):
            return
        shown = ["all" if r[1] == math.inf else f"{r[0]}:{r[1]}" for r in rows]
        raise ConfigError(
            f"{self.where}: rows {shown[0]} of {Path(self.path).name} overlap {other.where} "
            f"(rows {shown[1]}); choose text apart from it"
        )

    def read(self) -> str:
        """The text: the file, or the joined field of the selected rows."""
        if self.path is not None:
            p = Path(self.path).expanduser()
            if not p.is_file():
                raise ConfigError(f"{self.where}.path: no such file {str(p)!r}")
            if p.suffix != ".jsonl":
                return p.read_text()
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            from datasets import load_dataset

            rows = load_dataset(self.dataset, self.name, split=self.split)
        lo, hi = self.rows if self.rows else (0, len(rows))
        try:
            return self.separator.join(rows[i][self.field] for i in range(lo, min(hi, len(rows))))
        except KeyError:
            raise ConfigError(f"{self.where}.field: rows have no field {self.field!r}") from None


def text_section(data, where: str, allowed, base: Optional[Path] = None) -> dict:
    """A study section that reads a text (``text:`` plus options) as keyword arguments: its keys
    checked against ``allowed``, ``text`` required and parsed into a :class:`TextSource`."""
    data = mapping(data, where, allowed=allowed)
    if "text" not in data:
        raise ConfigError(f"{where}.text: required (a mapping with path or dataset)")
    return {**data, "text": TextSource.from_dict(data["text"], f"{where}.text", base)}


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids as one 1-D tensor, without special tokens."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def token_windows(
    tokenizer, text: str, window: int, max_tokens: Optional[int] = None, where: str = "evaluation.perplexity.window"
) -> torch.Tensor:
    """``(n_windows, window)`` token ids: the first ``max_tokens`` tokens cut into whole windows."""
    ids = token_ids(tokenizer, text)
    if max_tokens:
        ids = ids[:max_tokens]
    n = ids.numel() // window
    if n == 0:
        raise ConfigError(f"{where}: the text has {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)
