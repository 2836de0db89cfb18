"""Calibration: per-module statistics for data-aware methods (``asvd``, ``svdllm``, ``twosided``).

``calibrate`` runs the model over random token windows of a text and gathers, for the input ``x``
of every decomposable projection, in float64: the mean ``|x|`` per channel and the second moment
``XᵀX / N`` (``N`` tokens); with ``gradients=True`` also the mean squared loss gradient of every
projection's output channels (for :mod:`dse.space.allocation`); with ``grad_moments=True`` the
whole second moment ``GᵀG / N`` of every projection's output gradients (``G``: the next-token
loss's gradient with respect to the projection's output, one row per token; ``(out, out)``, for
``twosided``; its diagonal is the mean squared gradient, so it gives ``gradients`` too).
Projections that read the same input tensor (q/k/v, gate/up) share one input statistic: the first
one called holds it and the others alias it, so a llama layer has four input statistics, not
seven; each projection has its own output-gradient moment.

Two walks give the same statistics (the tests check it):

* **at once** (default): one forward pass per batch, stopped after the last projection (no LM
  head); every statistic is held in memory until the end (float64: about 800 MB for
  SmolLM2-135M, 44 GB for Llama-2-7B).
* **streamed** (``CalibrationSpec(streamed=True)``, a study's ``calibration.streamed``): layer by
  layer, as GPTQ-style tools walk a big model. The inputs of the first layer, and the arguments
  the model calls each layer with, are captured once; then layer ``l`` runs on the cached inputs
  of layer ``l`` with hooks on its projections, its statistics are final (``on_layer`` may
  factorize that layer there), written to the statistics store and released, and its outputs are
  the inputs of layer ``l + 1``. Memory: one layer's statistics and two copies of one layer's
  inputs. Loss gradients, when asked for, take one more pass (forward and backward) that
  records only them; output-gradient moments are gathered in that pass *before* the walk, so that
  ``on_layer`` can use them, and each layer's are written to the store after it (that pass holds
  every projection's moment at once: about 1.4 GB in float64 for SmolLM2-135M).

Statistics on disk (:class:`dse.decompose.stats.StatsStore`) are float32, the upper triangle of
``XᵀX`` (and of ``GᵀG``) only, in a folder ``calibration-<key>`` of ``cache_dir`` keyed by the
model fingerprint and a hash of the spec and of the sampled token ids; a streamed calibration
without ``cache_dir`` keeps them in a temporary folder for as long as the :class:`Calibration`
lives. Every file is written atomically, the index last.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError, ModelError
from ..core.validate import boolean, integer
from ..model import TextSource, find_projections, input_device, text_section, token_ids
from .cache import model_fingerprint
from .stats import InputStats, ProjectionStats, StatsStore, add_gram, mirror


@dataclass(frozen=True)
class CalibrationSpec:
    """What to run the model on: ``n_samples`` random windows of ``seq_len`` tokens (``seed``);
    ``streamed`` picks the layer-by-layer walk (same statistics, so not part of the key)."""

    text: TextSource
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    streamed: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.text, TextSource):
            raise ConfigError(f"calibration.text: expected a TextSource, got {type(self.text).__name__}")
        for name, low in (("n_samples", 1), ("seq_len", 2), ("seed", 0)):
            integer(getattr(self, name), f"calibration.{name}", low)
        boolean(self.streamed, "calibration.streamed")

    @classmethod
    def from_dict(cls, data, base=None) -> "CalibrationSpec":
        """From plain data, e.g. a study's ``calibration:`` block; ``base`` anchors a relative text path."""
        return cls(**text_section(data, "calibration", {f.name for f in fields(cls)}, base))

    def to_dict(self) -> dict:
        """The spec as plain data (:meth:`from_dict` reads it back)."""
        out = {"text": self.text.to_dict(), "n_samples": self.n_samples, "seq_len": self.seq_len, "seed": self.seed}
        return {**out, "streamed": True} if self.streamed else out

    def windows(self, tokenizer) -> torch.Tensor:
        """``(n_samples, seq_len)`` token ids: windows at random starts in the text's token stream."""
        ids = token_ids(tokenizer, self.text.read())
        if ids.numel() < self.seq_len:
            raise ConfigError(
                f"calibration.seq_len: the text has {ids.numel()} tokens, fewer than one window of {self.seq_len}"
            )
        gen = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, ids.numel() - self.seq_len + 1, (self.n_samples,), generator=gen)
        return torch.stack([ids[s : s + self.seq_len] for s in starts.tolist()])


@dataclass
class Calibration:
    """Input statistics of a model's projections; ``key`` names model and data (for cache keys).

    ``stats`` holds the :class:`InputStats` kept in memory, one per distinct input, under the name
    of the first projection that reads it; ``aliases`` maps every other projection to that name;
    ``store`` (a :class:`StatsStore`) holds the others on disk, read on demand by
    :meth:`stats_for`. ``grads`` (only when calibrated with ``gradients=True``) holds, per
    projection, the mean squared gradient of the next-token loss with respect to each output
    channel (``(out,)``): a diagonal Fisher estimate of how much an error in that output costs.
    ``grad_moments`` (only with ``grad_moments=True``) holds in memory, per projection, the whole
    second moment ``GᵀG / N`` of those gradients (``(out, out)``); the store may hold them instead.
    ``peak_bytes`` is the most the statistics (and, streamed, the cached layer inputs) held in
    memory at once while they were gathered, counted from the live tensors.
    """

    key: str
    stats: Dict[str, InputStats]
    aliases: Dict[str, str] = field(default_factory=dict)
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    store: Optional[StatsStore] = None
    peak_bytes: int = 0
    grad_moments: Dict[str, torch.Tensor] = field(default_factory=dict)

    def stats_for(self, name: str, grad_moment: bool = False):
        """The :class:`InputStats` of projection ``name``'s input; with ``grad_moment`` a
        :class:`ProjectionStats` of those and of its output-gradient moment."""
        owner = self.aliases.get(name, name)
        if owner in self.stats:
            inputs = self.stats[owner]
        elif self.store is not None and self.store.has(owner):
            inputs = self.store.read(owner)
        else:
            raise KeyError(
                f"calibration: no statistics for module {name!r} (was the calibration computed on this model?)"
            )
        if not grad_moment:
            return inputs
        if name in self.grad_moments:
            return ProjectionStats(inputs, self.grad_moments[name], name)
        if self.store is not None and self.store.has_grad_moment(name):
            return ProjectionStats(inputs, self.store.read_grad_moment(name), name)
        raise KeyError(
            f"calibration: no output-gradient moment for module {name!r} "
            "(was the calibration computed with grad_moments=True?)"
        )

    def has_grad_moments(self) -> bool:
        """Whether the output-gradient moments were gathered (in memory, or complete in the store)."""
        return bool(self.grad_moments) or (self.store is not None and self.store.has_grad_moments())

    def save(self, directory) -> StatsStore:
        """Write the statistics held in memory, the gradients and the index to a store at ``directory``."""
        store = StatsStore(directory)
        for owner, stats in self.stats.items():
            store.write(owner, stats)
        self.save_gradients(store)
        store.write_index(self.key, self.aliases, grad_moments=self.has_grad_moments())
        return store

    def save_gradients(self, store: StatsStore) -> None:
        """Write the gradients and output-gradient moments held in memory to ``store``."""
        store.write_grads(self.grads)
        for name, moment in self.grad_moments.items():
            store.write_grad_moment(name, moment)

    @classmethod
    def load(cls, directory) -> Optional["Calibration"]:
        """The calibration in a complete store at ``directory`` (statistics read on demand), or None."""
        store = StatsStore(directory)
        index = store.read_index()
        if index is None:
            return None
        return cls(index["key"], {}, dict(index["aliases"]), store.read_grads(), store=store)


class _StopForward(Exception):
    """Raised once every projection has seen its input: the rest of the model is not needed."""


def calibration_key(model: nn.Module, spec: CalibrationSpec, windows: torch.Tensor, table=None) -> str:
    """``<model fingerprint>-<hash of spec and token ids>`` (names the input statistics, so factor
    caches are shared by calibrations with and without gradients)."""
    table = table if table is not None else find_projections(model)
    h = hashlib.sha256(repr(spec).encode())
    h.update(windows.to(torch.int64).cpu().numpy().tobytes())
    return f"{model_fingerprint(model, table)}-{h.hexdigest()[:12]}"


class _InputRecorder:
    """Forward pre-hooks that add each projection's input to its :class:`InputStats`.

    A projection whose input is the very tensor the previous projection read (q/k/v, gate/up) is
    recorded as an alias of it. With ``stop_after`` the forward pass is cut (:class:`_StopForward`)
    once that many projections have seen their input.
    """

    def __init__(self, stop_after: Optional[int]):
        self.stats: Dict[str, InputStats] = {}
        self.aliases: Dict[str, str] = {}
        self.stop_after = stop_after
        self.new_batch()

    def new_batch(self) -> None:
        self.last_input, self.last_owner, self.seen = None, None, 0

    def hook(self, name: str):
        def record(module, args):
            x = args[0]
            if x is self.last_input:
                self.aliases[name] = self.last_owner
            else:
                if name not in self.stats:
                    self.stats[name] = InputStats.zeros(x.shape[-1], device=x.device)
                self.stats[name].add(x)
                self.last_input, self.last_owner = x, name
            self.seen += 1
            if self.seen == self.stop_after:
                raise _StopForward

        return record


class _GradRecorder:
    """Full backward hooks that sum each projection's squared output gradient per channel or, with
    ``moments``, the whole ``gᵀg`` over tokens (whose diagonal is that sum)."""

    def __init__(self, moments: bool):
        self.sums: Dict[str, torch.Tensor] = {}
        self.moments = moments

    def hook(self, name: str):
        def record(module, grad_input, grad_output):
            g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).float()
            if not self.moments:
                self.sums[name] = self.sums.get(name, 0) + g.pow(2).sum(0).double()
                return
            if name not in self.sums:
                self.sums[name] = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64, device=g.device)
            add_gram(self.sums[name], g)

        return record


def _forward(model: nn.Module, ids: torch.Tensor, gradients: bool) -> None:
    """One batch: a forward pass (cut short when every input is seen), or forward and backward of
    the next-token loss with respect to the input embeddings (weights get no gradients)."""
    if not gradients:
        try:
            with torch.no_grad():
                model(ids)
        except _StopForward:
            pass
        return
    with torch.enable_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = getattr(model(inputs_embeds=embeds, labels=ids), "loss", None)
        if loss is None:
            raise ModelError(
                f"calibration: gradients need a model that returns a language-modeling loss; "
                f"{type(model).__name__} returns none"
            )
        loss.backward()


def _check_dense(model: nn.Module) -> None:
    from .surgery import is_decomposed

    if is_decomposed(model):
        raise RuntimeError("calibration: model is decomposed; calibrate the dense model (dse.restore_ first)")


def collect_stats(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    gradients: bool = False,
    inputs: bool = True,
    progress: bool = False,
    table=None,
) -> tuple[Dict[str, InputStats], Dict[str, str], Dict[str, torch.Tensor]]:
    """``(stats, aliases, grads)`` of every projection of ``table`` (default: the model's family's)
    over ``windows`` (one pass; see :func:`collect_calibration`, which takes the same arguments)."""
    cal = collect_calibration(
        model, windows, batch_size=batch_size, gradients=gradients, inputs=inputs, progress=progress, table=table
    )
    return cal.stats, cal.aliases, cal.grads


def collect_calibration(
    model: nn.Module,
    windows: torch.Tensor,
    key: str = "",
    *,
    batch_size: int = 8,
    gradients: bool = False,
    grad_moments: bool = False,
    inputs: bool = True,
    progress: bool = False,
    table=None,
) -> Calibration:
    """The :class:`Calibration` (held in memory, named ``key``) of every projection of ``table``
    (default: the model's family's) over ``windows``, in one pass. Without gradients the forward
    pass stops after the last projection and ``grads`` is empty; with ``gradients`` the next-token
    loss is back-propagated and the squared output gradients are summed per channel; with
    ``grad_moments`` their whole second moments are summed (and ``grads`` is their diagonal).
    ``inputs=False`` records the gradients alone."""
    _check_dense(model)
    table = table if table is not None else find_projections(model)
    gradients = gradients or grad_moments
    recorder, grads = _InputRecorder(None if gradients else len(table)), _GradRecorder(grad_moments)
    modules = {name: model.get_submodule(name) for name in table}
    handles = [m.register_forward_pre_hook(recorder.hook(name)) for name, m in modules.items()] if inputs else []
    if gradients:
        handles += [m.register_full_backward_hook(grads.hook(name)) for name, m in modules.items()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = input_device(model)
    try:
        for p in trainable:
            p.requires_grad_(False)
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrate", disable=not progress, leave=False):
            recorder.new_batch()
            _forward(model, windows[start : start + batch_size].to(device), gradients)
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    tokens = windows.numel()
    stats = {n: s.finish() for n, s in recorder.stats.items()}
    if grad_moments:
        moments = {n: mirror(g) / tokens for n, g in grads.sums.items()}
        per_channel = {n: m.diagonal().clone() for n, m in moments.items()}
    else:
        moments, per_channel = {}, {n: g / tokens for n, g in grads.sums.items()}
    held = sum(s.nbytes for s in stats.values()) + _nbytes(per_channel.values()) + _nbytes(moments.values())
    return Calibration(key, stats, recorder.aliases, per_channel, peak_bytes=held, grad_moments=moments)


class _LayerCall(nn.Module):
    """Stands in for one layer while the first layer's inputs are captured: records the arguments
    the model calls it with (after the hidden states) and passes the hidden states on; the last one
    ends the forward pass. Other attributes are the layer's (a model may read them in its loop)."""

    def __init__(self, layer: nn.Module, calls: list, first_inputs: Optional[list], last: bool):
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: the layer is not part of the shim
        self.calls, self.first_inputs, self.last = calls, first_inputs, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_layer" not in self.__dict__:
                raise
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args, **kwargs):
        if not args:
            raise ModelError(
                "calibration.streamed: the model calls its layers without positional hidden states; "
                "calibrate with streamed: false"
            )
        if self.first_inputs is not None:
            self.first_inputs.append(args[0])
        self.calls.append((args[1:], kwargs))
        if self.last:
            raise _StopForward
        return args[0]


def _capture(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int):
    """``(first-layer inputs per batch, per layer the (args, kwargs) it is called with per batch)``,
    from forward passes that skip every layer (embeddings, masks and positions only)."""
    calls: List[list] = [[] for _ in layers]
    first: list = []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _LayerCall(layer, calls[i], first if i == 0 else None, i == len(originals) - 1)
    device = input_device(model)
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                try:
                    model(windows[start : start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return first, calls


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


OnLayer = Callable[[List[str], "Calibration"], None]


def _layers(model: nn.Module, table) -> nn.ModuleList:
    """The module list that holds the layers of ``table`` (``model.layers.0.mlp.up_proj``: ``model.layers``)."""
    first = next(iter(table.values()))
    return model.get_submodule(first.name[: first.name.index(f".{first.layer}.")])


def _stream(
    model: nn.Module,
    windows: torch.Tensor,
    cal: Calibration,
    *,
    batch_size: int,
    on_layer: Optional[OnLayer],
    progress: bool,
    table=None,
) -> None:
    """Gather ``cal``'s statistics layer by layer into ``cal.store`` (see the module doc); the
    output-gradient moments ``cal`` holds (gathered before) go to the store layer by layer."""
    moments = bool(cal.grad_moments)
    table = table if table is not None else find_projections(model)
    layers = _layers(model, table)
    hidden, calls = _capture(model, layers, windows, batch_size)
    for index, layer in enumerate(tqdm(layers, desc="calibrate (streamed)", disable=not progress, leave=False)):
        names = [n for n, p in table.items() if p.layer == index]
        recorder, outputs = _InputRecorder(None), []
        handles = [model.get_submodule(n).register_forward_pre_hook(recorder.hook(n)) for n in names]
        try:
            with torch.no_grad():
                for x, (args, kwargs) in zip(hidden, calls[index]):
                    recorder.new_batch()
                    out = layer(x, *args, **kwargs)
                    outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            for handle in handles:
                handle.remove()
        stats = {n: s.finish() for n, s in recorder.stats.items()}
        held = _nbytes(hidden) + _nbytes(outputs) + sum(s.nbytes for s in stats.values())
        cal.peak_bytes = max(cal.peak_bytes, held + _nbytes(cal.grad_moments.values()) + _nbytes(cal.grads.values()))
        cal.stats.update(stats)
        cal.aliases.update(recorder.aliases)
        if on_layer is not None:
            on_layer(names, cal)
        for owner in stats:
            cal.store.write(owner, cal.stats.pop(owner))
        for name in set(names) & set(cal.grad_moments):
            cal.store.write_grad_moment(name, cal.grad_moments.pop(name))
        hidden = outputs
    cal.store.write_grads(cal.grads)
    cal.store.write_index(cal.key, cal.aliases, grad_moments=moments)


def calibrate(
    model: nn.Module,
    tokenizer,
    spec: CalibrationSpec,
    cache_dir: Optional[str | Path] = None,
    *,
    gradients: bool = False,
    grad_moments: bool = False,
    batch_size: int = 8,
    on_layer: Optional[OnLayer] = None,
    progress: bool = True,
    table=None,
) -> Calibration:
    """Input statistics (with ``gradients``, mean squared output gradients; with ``grad_moments``,
    output-gradient second moments) of the projections of ``table`` (default: the model's
    family's) over ``spec``'s windows, in a store in ``cache_dir`` (reused when complete; what it
    lacks is gathered and added).

    ``spec.streamed`` walks the model layer by layer; then ``on_layer(names, calibration)`` is
    called after each layer with its projections' names, while their statistics are still in
    memory in float64 (to factorize them before they are released).
    """
    _check_dense(model)
    start = time.perf_counter()
    windows = spec.windows(tokenizer)
    key = calibration_key(model, spec, windows, table)
    where = Path(cache_dir) / f"calibration-{key}" if cache_dir else None
    cal = Calibration.load(where) if where is not None else None

    def gradients_only() -> Calibration:
        return collect_calibration(
            model,
            windows,
            key,
            batch_size=batch_size,
            gradients=True,
            grad_moments=grad_moments,
            inputs=False,
            progress=progress,
            table=table,
        )

    if cal is None and spec.streamed:
        cal = Calibration(key, {}, store=StatsStore(where) if where is not None else StatsStore.temporary())
        if grad_moments:  # before the walk, so that on_layer has them
            got = gradients_only()
            cal.grads, cal.grad_moments, cal.peak_bytes = got.grads, got.grad_moments, got.peak_bytes
        _stream(model, windows, cal, batch_size=batch_size, on_layer=on_layer, progress=progress, table=table)
    elif cal is None:
        cal = collect_calibration(
            model,
            windows,
            key,
            batch_size=batch_size,
            gradients=gradients,
            grad_moments=grad_moments,
            progress=progress,
            table=table,
        )
        if where is not None:
            cal.store = cal.save(where)
    if (gradients and not cal.grads) or (grad_moments and not cal.has_grad_moments()):
        got = gradients_only()
        cal.grads, cal.grad_moments = got.grads, got.grad_moments
        if cal.store is not None:
            cal.save_gradients(cal.store)
            cal.store.write_index(cal.key, cal.aliases, grad_moments=cal.has_grad_moments())
    cal.seconds = time.perf_counter() - start
    return cal
