"""How fast a model runs and how much memory it takes: what ``dse speed`` reports.

For one in-memory model (dense, decomposed or loaded compressed) :func:`measure_speed` times, after
warm-up and with the device synchronised (:func:`dse.model.timing.timed`):

- ``prefill``: one forward pass over ``batch`` prompts of ``prompt`` tokens (tokens/s);
- ``ttft``: time to first token, a batch-1 prefill and the first greedy token (ms);
- ``decode`` at batch 1 and at ``batch``: ``new_tokens`` single-token steps with the KV cache after a
  prefill that is not timed (tokens/s, all sequences counted); eager over a dynamic cache, or with
  ``compile`` gpt-fast's way (:class:`dse.model.timing.CompiledDecode`: a static cache and the step
  compiled once per batch size, the compilation outside the clock and reported as
  ``compile_seconds``; prefill and time to first token stay eager);

and reports the weight bytes, the peak memory of the runs (host resident set; CUDA max allocated on
a GPU), the device, dtype and CPU threads, and each timing's median and spread over ``repeats``.
Decoding reads every weight once per step, so batch-1 decode speed is bounded by memory
bandwidth: :func:`copy_bandwidth` measures the machine's, and a report's ``attained_bandwidth`` is
weight bytes × decode steps per second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Dict, Tuple

import torch

from ..core.validate import boolean, integer
from ..model import input_device, model_bytes
from ..model.timing import (
    CompiledDecode,
    Timing,
    cpu_name,
    decode,
    peak_memory,
    prefill,
    reset_peak_memory,
    threads,
    timed,
)
from .latency import prompt_ids


@dataclass(frozen=True)
class SpeedConfig:
    """The workload: ``batch`` prompts of ``prompt`` tokens, ``new_tokens`` decode steps, timed
    ``repeats`` times after ``warmup`` runs; ``compile``: decode compiled over a static cache."""

    prompt: int = 128
    batch: int = 8
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    compile: bool = False

    def __post_init__(self):
        for name, low in (("prompt", 1), ("batch", 1), ("new_tokens", 1), ("repeats", 1), ("warmup", 0)):
            integer(getattr(self, name), f"speed.{name}", low)
        boolean(self.compile, "speed.compile")


@dataclass
class SpeedReport:
    """One model's measurements (see the module doc). Rates are medians; ``*_spread`` is
    (slowest − fastest) / median of the times."""

    label: str
    weight_bytes: int
    prefill_tokens_per_s: float
    ttft_ms: float
    decode_tokens_per_s: float
    decode_batch_tokens_per_s: float
    host_peak_bytes: int
    device: str
    dtype: str
    threads: int
    config: SpeedConfig
    spreads: Dict[str, float] = field(default_factory=dict)
    device_peak_bytes: int = 0
    compile_seconds: float = 0.0

    @property
    def decode_ms_per_token(self) -> float:
        return 1000.0 / self.decode_tokens_per_s

    @property
    def attained_bandwidth(self) -> float:
        """Bytes per second batch-1 decoding reads if every step reads every weight once."""
        return self.weight_bytes * self.decode_tokens_per_s

    def row(self) -> Dict[str, object]:
        """Flat data for JSON and CSV."""
        out = asdict(self)
        config, spreads = out.pop("config"), out.pop("spreads")
        out.update({f"{k}_spread": v for k, v in spreads.items()})
        out.update({f"workload_{k}": v for k, v in config.items()})
        out["decode_ms_per_token"] = self.decode_ms_per_token
        out["attained_bandwidth"] = self.attained_bandwidth
        return out


def measure_speed(model, tokenizer, config: SpeedConfig = SpeedConfig(), label: str = "model") -> SpeedReport:
    """Time ``model`` as it is now (see the module doc); the prompt is text when there is a
    ``tokenizer``, else fixed random token ids."""
    device = input_device(model)
    vocab = model.config.vocab_size
    one = prompt_ids(tokenizer, config.prompt, 1, vocab).to(device)
    batch = prompt_ids(tokenizer, config.prompt, config.batch, vocab).to(device)
    kw = dict(repeats=config.repeats, warmup=config.warmup)
    reset_peak_memory(device)
    runs: Dict[str, Timing] = {
        "prefill": timed(lambda: prefill(model, batch), device, **kw),
        "ttft": timed(lambda: decode(model, prefill(model, one), 0).logits[:, -1].argmax(-1), device, **kw),
    }
    runs["decode"], compile_one = _decode_timing(model, one, config)
    runs["decode_batch"], compile_batch = _decode_timing(model, batch, config)
    memory = peak_memory(device)
    dtype = next(model.parameters()).dtype
    return SpeedReport(
        label=label,
        weight_bytes=model_bytes(model),
        prefill_tokens_per_s=config.batch * config.prompt / runs["prefill"].median,
        ttft_ms=1000.0 * runs["ttft"].median,
        decode_tokens_per_s=config.new_tokens / runs["decode"].median,
        decode_batch_tokens_per_s=config.batch * config.new_tokens / runs["decode_batch"].median,
        host_peak_bytes=memory["host_peak_bytes"],
        device_peak_bytes=memory.get("device_peak_bytes", 0),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        dtype=str(dtype).removeprefix("torch."),
        threads=threads(),
        config=config,
        spreads={name: t.spread for name, t in runs.items()},
        compile_seconds=compile_one + compile_batch,
    )


def _decode_timing(model, ids: torch.Tensor, config: SpeedConfig) -> Tuple[Timing, float]:
    """The timing of ``config.new_tokens`` decode steps after a prefill of ``ids`` (not timed), and
    the seconds of compiling the step (0 eager)."""
    device, kw = ids.device, dict(repeats=config.repeats, warmup=config.warmup)
    fill, steps, compile_seconds = partial(prefill, model), partial(decode, model), 0.0
    if config.compile:
        compiled = CompiledDecode(model, config.prompt + config.new_tokens)
        fill, steps = compiled.prefill, compiled.decode
        compile_seconds = timed(
            lambda out: steps(out, 1), device, repeats=1, warmup=0, setup=lambda: fill(ids)
        ).median  # the first step compiles
    return timed(lambda out: steps(out, config.new_tokens), device, setup=lambda: fill(ids), **kw), compile_seconds


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (each byte read once and written once), the median of
    ``repeats``: the memory bandwidth a memory-bound decode can at best reach."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = timed(lambda: dst.copy_(src), device, repeats=repeats, warmup=1)
    return 2 * src.numel() * src.element_size() / timing.median
