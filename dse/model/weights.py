"""A model's weights: how many parameters, and how many bytes its parameters and buffers take."""

from __future__ import annotations

from torch import nn


def param_count(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameters and buffers, as gpt-fast counts model size."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_meta else t.data_ptr()  # offloaded tensors are all at address 0
        if key in seen and t.numel():
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
