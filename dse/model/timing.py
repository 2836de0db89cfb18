"""Honest timing of a model (gpt-fast's way): warm-up first, the device synchronised before the clock
starts and before it stops, several repeats, the median and the spread; and peak memory.

Shared by per-trial decode timing and ``dse speed`` (:mod:`dse.evaluate`) and by the latency
tables of :mod:`dse.decompose.latency`. :func:`prefill` and :func:`decode` run the model eager over
transformers' dynamic KV cache; :class:`CompiledDecode` is gpt-fast's loop: a static cache and the
single-token step compiled once.
"""

from __future__ import annotations

import inspect
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .devices import input_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds of ``repeats`` runs: the median, the fastest and the slowest."""

    median: float
    low: float
    high: float
    repeats: int

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median."""
        return (self.high - self.low) / self.median if self.median else 0.0


def timed(
    run: Callable[[], object],
    device: torch.device,
    *,
    repeats: int = 5,
    warmup: int = 1,
    setup: Optional[Callable[[], object]] = None,
) -> Timing:
    """Wall seconds of ``run()`` after ``warmup`` unmeasured runs; ``setup()``, if given, runs before
    each call outside the clock and its result is passed to ``run``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"timing: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    seconds: List[float] = []
    for i in range(warmup + repeats):
        arg = setup() if setup else None
        sync(device)
        start = time.perf_counter()
        run(arg) if setup else run()
        sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), repeats)


@torch.no_grad()
def prefill(model, ids: torch.Tensor):
    """One forward pass over ``ids`` that fills the KV cache; returns the model output. As in
    ``generate``, only the last position's logits are computed when the model can skip the others."""
    return model(ids, use_cache=True, **_last_logits(model))


@torch.no_grad()
def decode(model, out, steps: int):
    """``steps`` greedy single-token steps from ``out`` (a prefill's or a step's output)."""
    return _greedy_steps(model, cache_keyword(model), out, steps)


def _greedy_steps(forward, keyword: str, out, steps: int):
    """``steps`` calls of ``forward`` on the greedy token of the last output and its cache."""
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        out = forward(token, use_cache=True, **{keyword: cache_of(out)})
    return out


class CompiledDecode:
    """Decoding the way gpt-fast does: a static KV cache of ``max_len`` positions, allocated once,
    and the model's forward compiled for single-token steps (``torch.compile`` with
    ``dynamic=False``; on CUDA also with CUDA graphs, ``mode="reduce-overhead"``). The first
    :meth:`decode` compiles (seconds to minutes); :meth:`prefill` runs eager into the cache and
    starts it afresh. A static cache takes the batch of its first prefill: one object per batch size.

    Making one resets torch's compiler state (``torch._dynamo.reset()``): transformers wraps every
    model's forward in one shared function, and past its recompile limit (8 models or shapes)
    torch would silently run it eager; the steps are run so that hitting the limit is an error.
    """

    def __init__(self, model, max_len: int):
        from transformers import StaticCache

        torch._dynamo.reset()
        self.model, self.max_len = model, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.keyword = cache_keyword(model)
        mode = "reduce-overhead" if input_device(model).type == "cuda" else None
        self.step = torch.compile(model.forward, dynamic=False, mode=mode)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor):
        """The eager forward pass over ``ids`` that fills the emptied cache (cf. :func:`prefill`)."""
        if ids.shape[1] >= self.max_len:
            raise ValueError(
                f"compiled decode: a {ids.shape[1]}-token prompt leaves no room in a {self.max_len}-position cache"
            )
        self.cache.reset()
        return self.model(ids, use_cache=True, **{self.keyword: self.cache}, **_last_logits(self.model))

    @torch.no_grad()
    def decode(self, out, steps: int):
        """``steps`` greedy steps of the compiled forward from ``out`` (cf. :func:`decode`)."""
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return _greedy_steps(self.step, self.keyword, out, steps)


def _forward_parameters(model) -> set:
    return set(inspect.signature(model.forward).parameters)


def _last_logits(model) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def cache_keyword(model) -> str:
    """``cache`` (transformers 5) or ``past_key_values`` (4.x)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def cache_of(out):
    """The KV cache a forward pass returned."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the host's resident-set high-water mark (Linux) and CUDA's max allocated."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak since the process started
        pass


def peak_memory(device: torch.device) -> dict:
    """``host_peak_bytes`` (resident set high-water mark) and, on CUDA, ``device_peak_bytes``."""
    out = {"host_peak_bytes": _host_peak()}
    if device.type == "cuda":
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _host_peak() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def threads() -> int:
    """The CPU threads torch uses."""
    return torch.get_num_threads()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
