"""Input statistics of a projection (:class:`InputStats`), what a two-sided method sees of one
projection (:class:`ProjectionStats`) and the folder that keeps them on disk (:class:`StatsStore`).

On disk a statistic is float32 and ``XᵀX / N`` (like the output-gradient moment ``GᵀG / N``) is
symmetric, so only its upper triangle is kept (row by row): a quarter of the bytes of the float64
matrix. The rounding to float32 (relative 6e-8) is far below the ridge ``svdllm`` and
``twosided`` add anyway.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from ..core.io import atomic_path

STORE_FORMAT = 2
INDEX = "index.pt"
GRADS = "grads.pt"
GRAD_MOMENT = "grad-moment-"  # + projection name: its output-gradient second moment


def add_gram(sums: torch.Tensor, x: torch.Tensor) -> None:
    """Add ``xᵀx`` of a ``(tokens, n)`` batch to the float64 ``(n, n)`` ``sums``: computed in ``x``'s
    dtype, three of its four blocks (it is symmetric; :func:`mirror` fills the fourth)."""
    h = x.shape[1] // 2
    a, b = x[:, :h], x[:, h:]
    sums[:h, :h] += (a.T @ a).double()
    sums[:h, h:] += (a.T @ b).double()
    sums[h:, h:] += (b.T @ b).double()


def mirror(sums: torch.Tensor) -> torch.Tensor:
    """Fill the block :func:`add_gram` leaves out, in place."""
    h = sums.shape[0] // 2
    sums[h:, :h] = sums[:h, h:].T
    return sums


@dataclass
class InputStats:
    """Statistics of one projection input over ``tokens`` tokens (float64 while accumulated).

    ``abs_mean``: mean ``|x|`` per input channel, ``(n,)``; ``xtx``: ``XᵀX / tokens``, ``(n, n)``.
    """

    abs_mean: torch.Tensor
    xtx: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, n: int, device=None) -> "InputStats":
        return cls(
            torch.zeros(n, dtype=torch.float64, device=device), torch.zeros(n, n, dtype=torch.float64, device=device)
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.abs_mean, self.xtx))

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``(..., n)`` as sums (see :meth:`finish`).

        The batch's sums are computed in the input's dtype (half the cost of float64 on CPU for
        float32 models) and added to the float64 sums; its relative rounding (about 1e-6 for float32
        and a batch of a few thousand tokens) is below the regularizer ``svdllm`` adds anyway.
        Half-precision inputs are raised to float32 first.
        """
        x = x.detach().reshape(-1, x.shape[-1])
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        self.abs_mean += x.abs().sum(0).double()
        add_gram(self.xtx, x)
        self.tokens += x.shape[0]

    def finish(self) -> "InputStats":
        """Turn the accumulated sums into means."""
        mirror(self.xtx)
        self.abs_mean /= max(self.tokens, 1)
        self.xtx /= max(self.tokens, 1)
        return self


@dataclass
class ProjectionStats:
    """What a two-sided method sees of projection ``name``: the statistics of its input (shared
    with the projections that read the same input) and its own output-gradient second moment
    ``grad_moment`` = ``GᵀG / N``, ``(out, out)``, ``G`` the loss gradients of its outputs per token."""

    inputs: InputStats
    grad_moment: torch.Tensor
    name: str = ""


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric ``(n, n)`` matrix, row by row: ``n (n + 1) / 2`` values."""
    return torch.cat([matrix[i, i:] for i in range(matrix.shape[0])])


def unpack_symmetric(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``(n, n)`` matrix :func:`pack_symmetric` packed."""
    out = torch.empty(n, n, dtype=packed.dtype, device=packed.device)
    start = 0
    for i in range(n):
        row = packed[start : start + n - i]
        out[i, i:] = row
        out[i:, i] = row
        start += n - i
    return out


class StatsStore:
    """A folder of float32 statistics: one file per distinct input, ``grads.pt`` for output
    gradients, one ``grad-moment-<projection>.pt`` per projection when output-gradient second
    moments were gathered, and ``index.pt`` (written last, so a folder without it is incomplete).
    Reads are on demand; the last statistic read is kept, since projections that share an input
    are factorized one after another."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._last: Optional[tuple] = None

    @classmethod
    def temporary(cls) -> "StatsStore":
        """A store in a new temporary folder, removed when the store is garbage collected."""
        store = cls(tempfile.mkdtemp(prefix="dse-calibration-"))
        weakref.finalize(store, shutil.rmtree, str(store.directory), True)
        return store

    def _file(self, owner: str) -> Path:
        return self.directory / f"{owner}.pt"

    def has(self, owner: str) -> bool:
        return self._file(owner).exists()

    def write(self, owner: str, stats: InputStats) -> None:
        data = {
            "abs_mean": stats.abs_mean.float().cpu(),
            "xtx": pack_symmetric(stats.xtx).float().cpu(),
            "n": stats.xtx.shape[0],
            "tokens": stats.tokens,
        }
        with atomic_path(self._file(owner)) as tmp:
            torch.save(data, tmp)

    def read(self, owner: str) -> InputStats:
        if self._last is None or self._last[0] != owner:
            data = torch.load(self._file(owner), weights_only=True)
            stats = InputStats(data["abs_mean"], unpack_symmetric(data["xtx"], int(data["n"])), int(data["tokens"]))
            self._last = (owner, stats)
        return self._last[1]

    def write_grads(self, grads: Dict[str, torch.Tensor]) -> None:
        with atomic_path(self.directory / GRADS) as tmp:
            torch.save({n: g.float().cpu() for n, g in grads.items()}, tmp)

    def read_grads(self) -> Dict[str, torch.Tensor]:
        path = self.directory / GRADS
        return dict(torch.load(path, weights_only=True)) if path.exists() else {}

    def write_grad_moment(self, name: str, moment: torch.Tensor) -> None:
        data = {"moment": pack_symmetric(moment).float().cpu(), "n": moment.shape[0]}
        with atomic_path(self.directory / f"{GRAD_MOMENT}{name}.pt") as tmp:
            torch.save(data, tmp)

    def has_grad_moment(self, name: str) -> bool:
        return (self.directory / f"{GRAD_MOMENT}{name}.pt").exists()

    def has_grad_moments(self) -> bool:
        """Whether the index says every projection's output-gradient moment is written."""
        return bool((self.read_index() or {}).get("grad_moments"))

    def read_grad_moment(self, name: str) -> torch.Tensor:
        data = torch.load(self.directory / f"{GRAD_MOMENT}{name}.pt", weights_only=True)
        return unpack_symmetric(data["moment"], int(data["n"]))

    def write_index(self, key: str, aliases: Dict[str, str], grad_moments: bool = False) -> None:
        """The index; ``grad_moments`` says every projection's output-gradient moment is written."""
        data = {"format": STORE_FORMAT, "key": key, "aliases": dict(aliases), "grad_moments": grad_moments}
        with atomic_path(self.directory / INDEX) as tmp:
            torch.save(data, tmp)

    def read_index(self) -> Optional[dict]:
        """The index of a complete store of this format, or None."""
        path = self.directory / INDEX
        try:
            data = torch.load(path, weights_only=True)
        except Exception:  # missing, torn or foreign: the calibration is computed again
            return None
        return data if isinstance(data, dict) and data.get("format") == STORE_FORMAT else None

    def nbytes(self) -> int:
        """Bytes of the store's files on disk."""
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
