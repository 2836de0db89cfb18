"""Calibration: per-module input statistics for data-aware methods (``asvd``, ``svdllm``).

``calibrate`` runs the model once over random token windows of a text and gathers, for the input
``x`` of every decomposable projection, in float64: the mean ``|x|`` per channel and the second
moment ``XᵀX / N`` (``N`` tokens); with ``gradients=True`` also the mean squared loss gradient of
every projection's output channels (for :mod:`dse.space.allocation`). Projections that read the same
input tensor (q/k/v, gate/up) share one statistic: the first one called holds it and the others
alias it, so a llama layer has four statistics, not seven. Without gradients the forward pass
stops after the last projection (no LM head).

Results are cached on disk, keyed by the model fingerprint and a hash of the spec and of the
sampled token ids, and written atomically.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError, ModelError
from ..core.io import atomic_path
from ..core.validate import integer
from ..model import TextSource, find_projections, text_section, token_ids
from .cache import model_fingerprint

CALIBRATION_FORMAT = 1


@dataclass(frozen=True)
class CalibrationSpec:
    """What to run the model on: ``n_samples`` random windows of ``seq_len`` tokens (``seed``)."""

    text: TextSource
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.text, TextSource):
            raise ConfigError(f"calibration.text: expected a TextSource, got {type(self.text).__name__}")
        for name, low in (("n_samples", 1), ("seq_len", 2), ("seed", 0)):
            integer(getattr(self, name), f"calibration.{name}", low)

    @classmethod
    def from_dict(cls, data, base=None) -> "CalibrationSpec":
        """From plain data, e.g. a study's ``calibration:`` block; ``base`` anchors a relative text path."""
        return cls(**text_section(data, "calibration", {f.name for f in fields(cls)}, base))

    def to_dict(self) -> dict:
        """The spec as plain data (:meth:`from_dict` reads it back)."""
        return {"text": self.text.to_dict(), "n_samples": self.n_samples, "seq_len": self.seq_len, "seed": self.seed}

    def windows(self, tokenizer) -> torch.Tensor:
        """``(n_samples, seq_len)`` token ids: windows at random starts in the text's token stream."""
        ids = token_ids(tokenizer, self.text.read())
        if ids.numel() < self.seq_len:
            raise ConfigError(f"calibration.seq_len: the text has {ids.numel()} tokens, "
                              f"fewer than one window of {self.seq_len}")
        gen = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, ids.numel() - self.seq_len + 1, (self.n_samples,), generator=gen)
        return torch.stack([ids[s:s + self.seq_len] for s in starts.tolist()])


@dataclass
class InputStats:
    """Statistics of one projection input over ``tokens`` tokens (float64).

    ``abs_mean``: mean ``|x|`` per input channel, ``(n,)``; ``xtx``: ``XᵀX / tokens``, ``(n, n)``.
    """

    abs_mean: torch.Tensor
    xtx: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, n: int, device=None) -> "InputStats":
        return cls(torch.zeros(n, dtype=torch.float64, device=device),
                   torch.zeros(n, n, dtype=torch.float64, device=device))

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
        h = x.shape[1] // 2  # XᵀX is symmetric: three of its four blocks, mirrored in finish()
        a, b = x[:, :h], x[:, h:]
        self.xtx[:h, :h] += (a.T @ a).double()
        self.xtx[:h, h:] += (a.T @ b).double()
        self.xtx[h:, h:] += (b.T @ b).double()
        self.tokens += x.shape[0]

    def finish(self) -> "InputStats":
        """Turn the accumulated sums into means."""
        h = self.xtx.shape[0] // 2
        self.xtx[h:, :h] = self.xtx[:h, h:].T
        self.abs_mean /= max(self.tokens, 1)
        self.xtx /= max(self.tokens, 1)
        return self


@dataclass
class Calibration:
    """Input statistics of a model's projections; ``key`` names model and data (for cache keys).

    ``stats`` holds one :class:`InputStats` per distinct input, under the name of the first
    projection that reads it; ``aliases`` maps every other projection to that name. ``grads``
    (only when calibrated with ``gradients=True``) holds, per projection, the mean squared
    gradient of the next-token loss with respect to each output channel (float64, ``(out,)``): a
    diagonal Fisher estimate of how much an error in that output costs.
    """

    key: str
    stats: Dict[str, InputStats]
    aliases: Dict[str, str] = field(default_factory=dict)
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def stats_for(self, name: str) -> InputStats:
        owner = self.aliases.get(name, name)
        if owner not in self.stats:
            raise KeyError(f"calibration: no statistics for module {name!r} "
                           "(was the calibration computed on this model?)")
        return self.stats[owner]

    def save(self, path) -> None:
        data = {"format": CALIBRATION_FORMAT, "key": self.key, "aliases": self.aliases,
                "stats": {n: {"abs_mean": s.abs_mean.cpu(), "xtx": s.xtx.cpu(), "tokens": s.tokens}
                          for n, s in self.stats.items()},
                "grads": {n: g.cpu() for n, g in self.grads.items()}}
        with atomic_path(path) as tmp:
            torch.save(data, tmp)

    @classmethod
    def load(cls, path, device=None) -> "Calibration":
        data = torch.load(path, map_location=device, weights_only=True)
        if data.get("format") != CALIBRATION_FORMAT:
            raise ConfigError(f"calibration file {path}: format {data.get('format')!r} is not supported")
        stats = {n: InputStats(s["abs_mean"], s["xtx"], int(s["tokens"])) for n, s in data["stats"].items()}
        return cls(data["key"], stats, dict(data["aliases"]), dict(data.get("grads", {})))


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
    """Full backward hooks that sum each projection's squared output gradient per channel."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}

    def hook(self, name: str):
        def record(module, grad_input, grad_output):
            g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).float()
            self.sums[name] = self.sums.get(name, 0) + g.pow(2).sum(0).double()
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
            raise ModelError(f"calibration: gradients need a model that returns a language-modeling loss; "
                             f"{type(model).__name__} returns none")
        loss.backward()


def collect_stats(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, gradients: bool = False,
                  progress: bool = False, table=None) -> tuple[Dict[str, InputStats], Dict[str, str], Dict[str, torch.Tensor]]:
    """``(stats, aliases, grads)`` of every projection of ``table`` (default: the family found on
    ``model``) over ``windows`` (one pass; see :class:`Calibration`). Without ``gradients`` the forward pass stops after the last projection
    and ``grads`` is empty; with them the next-token loss is back-propagated and the squared output
    gradients are summed per channel."""
    from .surgery import is_decomposed

    if is_decomposed(model):
        raise RuntimeError("calibration: model is decomposed; calibrate the dense model (dse.restore_ first)")
    table = table if table is not None else find_projections(model)
    device = next(model.parameters()).device
    inputs, grads = _InputRecorder(None if gradients else len(table)), _GradRecorder()
    modules = {name: model.get_submodule(name) for name in table}
    handles = [m.register_forward_pre_hook(inputs.hook(name)) for name, m in modules.items()]
    if gradients:
        handles += [m.register_full_backward_hook(grads.hook(name)) for name, m in modules.items()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrate", disable=not progress,
                          leave=False):
            inputs.new_batch()
            _forward(model, windows[start:start + batch_size].to(device), gradients)
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    tokens = windows.numel()
    return ({n: s.finish() for n, s in inputs.stats.items()}, inputs.aliases,
            {n: g / tokens for n, g in grads.sums.items()})


def calibrate(model: nn.Module, tokenizer, spec: CalibrationSpec, cache_dir: Optional[str | Path] = None,
              *, gradients: bool = False, batch_size: int = 8, progress: bool = True, table=None) -> Calibration:
    """Input statistics (and with ``gradients``, output-gradient statistics) of the projections of
    ``table`` (default: the family found on ``model``) over ``spec``'s windows, cached in ``cache_dir``."""
    start = time.perf_counter()
    windows = spec.windows(tokenizer)
    key = calibration_key(model, spec, windows, table)
    path = Path(cache_dir) / f"calibration-{key}{'-grads' if gradients else ''}.pt" if cache_dir else None
    if path is not None and path.exists():
        try:
            cal = Calibration.load(path, device=next(model.parameters()).device)
            cal.seconds = time.perf_counter() - start
            return cal
        except Exception:  # a torn or foreign file: recompute and overwrite it
            pass
    stats, aliases, grads = collect_stats(model, windows, batch_size=batch_size, gradients=gradients,
                                          progress=progress, table=table)
    cal = Calibration(key, stats, aliases, grads, time.perf_counter() - start)
    if path is not None:
        cal.save(path)
    return cal
