"""Prefix reuse (``evaluation.reuse_prefix``): a run starts at the first layer that changed.

A plan that decomposes only layers ``>= k`` leaves every hidden state entering layer ``k`` as the
dense model gives it. A :class:`PrefixStore` is built on the model as it is first evaluated (the
dense model) and keeps a key of each layer and of everything outside them (embeddings, rotary
and position tables, the final norm and head): module types and, per tensor, name, shape, dtype,
device, version counter and a strided sample of values. At the start of each measure,
:meth:`PrefixStore.start` finds ``k``, the number of leading layers whose key is unchanged (0 when
anything outside the layers changed: another dtype or device map, an edited embedding; no reuse
when nothing changed). Any in-place change of a tensor (a heal's optimizer step, ``copy_``) bumps
its version counter, so a layer changed and put back (``heal.norms: true`` trains every norm) is
never started after again by this store: conservative, never stale.

Each batch of model calls (a perplexity window batch, the fast engine's context and continuation
passes) runs in :func:`reusing`: the first time, the hidden states entering layer ``k`` are
captured and kept, under a key of the batch's inputs; later, layers ``< k`` pass their input
through (a key/value cache gets stand-in entries of the right length, so positions and masks come
out the same) and layer ``k`` receives the kept states. Kept states count against a byte budget:
the least recently used start layers are dropped for a new one, and a start layer's batches past
the budget are not kept (counted in ``refused``).

A tensor offloaded by a device map (``meta`` between calls) is keyed by its name, shape, dtype
and placement, not its values: its store is not read.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..model import family_of

SAMPLE = 64  # values of each tensor read into its key (every one of a smaller tensor)


def _key(named: List[Tuple[str, torch.Tensor]], modules: List[nn.Module]) -> str:
    """A hash of module types, then each tensor's name, shape, dtype, device, version counter (bumped
    by every in-place change) and sampled values (changed by a new tensor)."""
    h = hashlib.sha256(" ".join(type(m).__name__ for m in modules).encode())
    samples = []
    for name, t in named:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device}".encode())
        if not t.is_meta and t.numel():  # an offloaded tensor's meta stand-in is new at each call
            h.update(str(t._version).encode())
            flat = t.detach().reshape(-1)
            samples.append(flat[:: max(1, flat.numel() // SAMPLE)].double().cpu())
    if samples:
        h.update(torch.cat(samples).numpy().tobytes())
    return h.hexdigest()


def _digest(inputs) -> str:
    """A hash of a batch's inputs (tensors by shape and values, anything else by ``repr``)."""
    h = hashlib.sha256()
    for part in inputs:
        if torch.is_tensor(part):
            h.update(repr(tuple(part.shape)).encode() + part.cpu().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def _nbytes(states: List[torch.Tensor]) -> int:
    return sum(s.numel() * s.element_size() for s in states)


class PrefixStore:
    """Hidden states entering a start layer of ``model``, per batch of inputs, within ``budget`` bytes."""

    def __init__(self, model: nn.Module, budget: int):
        self.model, self.budget = model, budget
        self.path = family_of(model).layers
        self.layers = model.get_submodule(self.path)
        self.reference = self._rest(), [self._layer(i) for i in range(len(self.layers))]
        self.kept: "OrderedDict[int, Dict[str, List[torch.Tensor]]]" = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.counts: Counter = Counter()  # hits, misses, refused

    def _rest(self) -> str:
        inside = self.path + "."
        named = [
            (n, t) for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if not n.startswith(inside)
        ]
        return _key(named, [m for n, m in self.model.named_modules() if not n.startswith(inside)])

    def _layer(self, i: int) -> str:
        layer = self.layers[i]
        return _key([*layer.named_parameters(), *layer.named_buffers()], list(layer.modules()))

    def start(self) -> int:
        """The layer runs of the model as it is now start from: the number of leading layers
        unchanged since the store was built; 0 (no reuse) when anything else changed or none did."""
        rest, layers = self.reference
        if self._rest() != rest:
            return 0
        k = next((i for i in range(len(layers)) if self._layer(i) != layers[i]), len(layers))
        if k == len(layers):
            return 0
        if k in self.kept:
            self.kept.move_to_end(k)
        return k

    @contextmanager
    def _reusing(self, start: int, key: str):
        stored = self.kept.get(start, {}).get(key)
        self.counts["hits" if stored is not None else "misses"] += 1
        captured: List[torch.Tensor] = []

        def enter(module, args, kwargs):
            if stored is None:
                captured.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
                return None
            states = stored[len(captured)]
            captured.append(states)
            return ((states, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": states})

        handle = self.layers[start].register_forward_pre_hook(enter, with_kwargs=True)
        skipped = range(start) if stored is not None else range(0)
        saved = [self.layers[i].__dict__.get("forward") for i in skipped]  # accelerate's hook, if any
        for i in skipped:
            self.layers[i].forward = _passing(i)
        try:
            yield
        finally:
            handle.remove()
            for i, forward in zip(skipped, saved):
                if forward is None:
                    del self.layers[i].forward
                else:
                    self.layers[i].forward = forward
        if stored is None:
            self._keep(start, key, captured)
        elif len(captured) != len(stored):
            raise RuntimeError(f"prefix reuse: {len(captured)} calls of layer {start}, {len(stored)} stored")

    def _keep(self, start: int, key: str, states: List[torch.Tensor]) -> None:
        size = _nbytes(states)
        while self.nbytes + size > self.budget and any(k != start for k in self.kept):
            oldest = next(k for k in self.kept if k != start)
            self.nbytes -= sum(_nbytes(s) for s in self.kept.pop(oldest).values())
        if self.nbytes + size > self.budget:
            self.counts["refused"] += 1
            return
        self.kept.setdefault(start, {})[key] = states
        self.nbytes += size


def _passing(index: int):
    """A layer's forward that returns its input, giving a cache it is passed a stand-in entry of
    the input's length (the cache's length sets later passes' positions and masks)."""

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = next((v for v in (*args[1:], *kwargs.values()) if isinstance(v, Cache)), None)
        if cache is not None:
            stub = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(stub, stub, index)
        return hidden

    return forward


def reusing(store: Optional[PrefixStore], start: int, *inputs):
    """The block's model calls on ``inputs`` started at layer ``start`` from kept states (kept the
    first time); a plain block without a store or with ``start`` 0."""
    if store is None or not start:
        return nullcontext()
    return store._reusing(start, _digest(inputs))
