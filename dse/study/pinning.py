"""Pinned local workers: each of ``dse run --workers N`` gets its own GPUs and its share of the cores.

Without pinning, N workers on one host all take ``cuda:0`` and all start one OpenMP thread per
core, so they fight over both (10-40x slower seen on a 2-core machine). :func:`worker_slots`
gives worker ``i``:

* GPUs: ``--devices cuda:0,cuda:1,...`` (or GPU indices, or ``auto`` for every visible GPU) are
  dealt out in contiguous blocks when there are at least as many as workers (4 GPUs, 2 workers:
  ``0,1`` and ``2,3``, for a study whose ``device_map`` spreads the model over them), else round
  robin (2 GPUs, 4 workers: two workers per GPU). A worker sees only its GPUs
  (``CUDA_VISIBLE_DEVICES``, as physical ids: indices count the GPUs this process sees), so the
  study's ``device: cuda`` is its first one. Without ``--devices`` the GPUs are left as they are.
* CPU: ``cores // N`` threads (at least one; ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, which torch
  reads at start) and, where the OS allows, affinity to that many cores of its own.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..core.errors import ConfigError

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Slot:
    """What one worker process gets: its environment overrides and the cores it may run on."""

    env: Dict[str, str]
    cores: tuple


def parse_devices(text: str, visible: Sequence[str]) -> List[str]:
    """The physical GPU ids ``--devices`` names (``auto``: all of ``visible``, the ids this process
    may use); ``cuda:N`` or ``N`` index ``visible``."""
    if text == "auto":
        return list(visible)
    out = []
    for item in (t.strip() for t in text.split(",")):
        index = item[5:] if item.startswith("cuda:") else item
        if not index.isdigit():
            raise ConfigError(f"--devices: expected auto or a list such as cuda:0,cuda:1, got {item!r}")
        if int(index) >= len(visible):
            raise ConfigError(f"--devices: {item} requested but this host has {len(visible)} visible GPU(s)")
        if visible[int(index)] in out:
            raise ConfigError(f"--devices: {item} is listed twice")
        out.append(visible[int(index)])
    return out


def visible_gpus() -> List[str]:
    """Physical ids of the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` if set)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in listed.split(",") if i.strip()] if listed is not None else [str(i) for i in range(count)]
    return ids[:count]


def available_cores() -> List[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def worker_slots(n_workers: int, gpus: Optional[Sequence[str]], cores: Sequence[int]) -> List[Slot]:
    """One :class:`Slot` per worker: ``gpus`` (physical ids, or None to leave GPUs alone) and
    ``cores`` dealt out as the module doc says."""
    if n_workers < 1:
        raise ConfigError(f"--workers: expected at least 1, got {n_workers}")
    share = max(1, len(cores) // n_workers)
    slots = []
    for i in range(n_workers):
        own = tuple(cores[(i * share + j) % len(cores)] for j in range(share))
        env = {name: str(share) for name in THREAD_VARIABLES}
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(_gpus_of(i, n_workers, list(gpus)))
        slots.append(Slot(env, own))
    return slots


def _gpus_of(i: int, n_workers: int, gpus: List[str]) -> List[str]:
    if not gpus:
        return []
    if len(gpus) >= n_workers:
        block = len(gpus) // n_workers
        return gpus[i * block : (i + 1) * block]
    return [gpus[i % len(gpus)]]


def start_pinned(cmd: List[str], slot: Slot, **popen) -> subprocess.Popen:
    """Start ``cmd`` with ``slot``'s environment and, where the OS allows, its cores."""
    pin = (lambda: os.sched_setaffinity(0, slot.cores)) if hasattr(os, "sched_setaffinity") else None
    return subprocess.Popen(cmd, env={**os.environ, **slot.env}, preexec_fn=pin, **popen)
