"""Perplexity with non-overlapping (or strided) windows over a token stream.

``text_from`` reads the text a study names: a plain text file, a JSONL file (one field, a
slice of rows, joined by a separator) or a hub dataset. ``perplexity`` evaluates the in-memory
model: PPL = exp(mean token NLL over every predicted token of every window).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import check_keys


@dataclass(frozen=True)
class TextSource:
    """Where perplexity text comes from.

    ``path``: a ``.txt`` file, or a ``.jsonl`` file whose ``field`` of rows ``rows[0]:rows[1]`` is
    joined with ``separator``. ``dataset``: a hub dataset (``name``, ``split``, ``field``) instead.
    """

    path: Optional[str] = None
    dataset: Optional[str] = None
    name: Optional[str] = None
    split: str = "test"
    field: str = "text"
    rows: Optional[Tuple[int, int]] = None
    separator: str = "\n\n"

    @classmethod
    def from_dict(cls, data, where: str = "text", base: Optional[Path] = None) -> "TextSource":
        """From plain data (a study's ``text:`` block); a relative ``path`` resolves against ``base``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping with path or dataset")
        check_keys(data, {f.name for f in fields(cls)}, where)
        data = dict(data)
        if data.get("path") and base is not None and not Path(data["path"]).expanduser().is_absolute():
            data["path"] = str((Path(base) / data["path"]).resolve())
        rows = data.get("rows")
        if rows is not None:
            if not (isinstance(rows, (list, tuple)) and len(rows) == 2 and all(isinstance(r, int) for r in rows)):
                raise ValueError(f"{where}.rows: expected [first, end], got {rows!r}")
            data["rows"] = tuple(rows)
        return cls(**data)

    def read(self) -> str:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("perplexity.text: give exactly one of path and dataset")
        if self.path is not None:
            p = Path(self.path).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"perplexity.text.path: no such file {str(p)!r}")
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
            raise ValueError(f"perplexity.text.field: rows have no field {self.field!r}") from None


def token_windows(tokenizer, text: str, window: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """``(n_windows, window)`` token ids: the first ``max_tokens`` tokens cut into whole windows."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"perplexity: text has {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean NLL) of ``model`` over all predicted tokens of ``windows`` (each window alone)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
