"""Decode speed of a trial: median tokens/s of greedy generation with the KV cache from a fixed prompt.

A run is one prefill of the prompt and ``new_tokens - 1`` single-token decode steps; its speed is
``new_tokens`` over its wall time (:func:`dse.model.timing.timed`: warm-up first, the device
synchronised around the clock). ``dse speed`` measures more (:mod:`dse.evaluate.speed`).
"""

from __future__ import annotations

import torch

from ..model import input_device, token_ids
from ..model.timing import decode, prefill, timed

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Within fifty years printers worked in more than two hundred cities across Europe, and the "
    "number of books grew from thousands of handwritten copies to millions of printed ones."
)


def prompt_ids(tokenizer, length: int = 64, batch: int = 1, vocab: int = 0) -> torch.Tensor:
    """``(batch, length)`` token ids: the start of ``PROMPT`` (repeated if the tokenizer needs more);
    without a tokenizer, fixed random ids below ``vocab`` (speed does not depend on which)."""
    if tokenizer is None:
        return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).repeat(batch, 1)
    ids = token_ids(tokenizer, PROMPT)
    ids = ids.repeat(-(-length // ids.numel()))[:length]
    return ids.unsqueeze(0).repeat(batch, 1)


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3, warmup: int = 1) -> float:
    """Median over ``repeats`` runs of greedy ``new_tokens``-token generation from ``prompt``."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"latency: new_tokens and repeats must be >= 1, got {new_tokens}, {repeats}")
    device = input_device(model)
    prompt = prompt.to(device)
    timing = timed(
        lambda: decode(model, prefill(model, prompt), new_tokens - 1), device, repeats=repeats, warmup=warmup
    )
    return new_tokens / timing.median
