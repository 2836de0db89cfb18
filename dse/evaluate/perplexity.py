"""Perplexity of the in-memory model over token windows (:func:`dse.model.token_windows`):
PPL = exp(mean token NLL over every predicted token of every window, each window alone)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, prefix=None) -> float:
    """exp(mean NLL) of ``model`` over all predicted tokens of ``windows`` (each window alone);
    with a :class:`~dse.evaluate.prefix.PrefixStore`, from the first changed layer on.

    Imported by the face at once (it shares its module's name), so it imports torch when it runs."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from ..model.devices import input_device
    from .prefix import reusing

    device = input_device(model)
    layer = prefix.start() if prefix is not None else 0
    total, count = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            with reusing(prefix, layer, batch):
                logits = model(batch).logits[:, :-1].float()
            labels = batch[:, 1:].to(logits.device)  # a spread model returns logits where its head is
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)
