"""Decode speed: median tokens/s of greedy generation with the KV cache from a fixed prompt.

A run is one prefill of the prompt and ``new_tokens - 1`` single-token decode steps; its speed is
``new_tokens`` over its wall time. Warm-up runs come first, and on CUDA the device is
synchronised before the clock starts and before it stops.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..model import input_device

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
          "Within fifty years printers worked in more than two hundred cities across Europe, and the "
          "number of books grew from thousands of handwritten copies to millions of printed ones.")


def prompt_ids(tokenizer, length: int = 64) -> torch.Tensor:
    """``(1, length)`` token ids: the start of ``PROMPT`` (repeated if the tokenizer needs more)."""
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = ids.repeat(-(-length // ids.numel()))[:length]
    return ids.unsqueeze(0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _generate(model, prompt: torch.Tensor, new_tokens: int) -> None:
    out = model(prompt, use_cache=True)
    for _ in range(new_tokens - 1):
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, past_key_values=out.past_key_values, use_cache=True)


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3,
                      warmup: int = 1) -> float:
    """Median over ``repeats`` runs of greedy ``new_tokens``-token generation from ``prompt``."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"latency: new_tokens and repeats must be >= 1, got {new_tokens}, {repeats}")
    device = input_device(model)
    prompt = prompt.to(device)
    for _ in range(warmup):
        _generate(model, prompt, new_tokens)
    speeds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        _generate(model, prompt, new_tokens)
        sync(device)
        speeds.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(speeds)
