"""Calibration: per-module input statistics for data-aware methods (``asvd``, ``svdllm``).

``calibrate`` runs the model once over random token windows of a text and gathers, for the input
``x`` of every decomposable projection, in float64: the mean ``|x|`` per channel and the second
moment ``XᵀX / N`` (``N`` tokens); with ``gradients=True`` also the mean squared loss gradient of
every projection's output channels (for :mod:`dse.allocation`). Projections that read the same
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
from typing import Dict, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import find_projections
from .config import check_keys
from .cache import model_fingerprint
from .io import atomic_path
from .perplexity import TextSource

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
            raise ValueError(f"calibration.text: expected a TextSource, got {type(self.text).__name__}")
        for name, low in (("n_samples", 1), ("seq_len", 2), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"calibration.{name}: must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"calibration.{name}: must be >= {low}, got {value}")

    @classmethod
    def from_dict(cls, data, base=None) -> "CalibrationSpec":
        """From plain data, e.g. a study's ``calibration:`` block; ``base`` anchors a relative text path."""
        if not isinstance(data, Mapping):
            raise ValueError(f"calibration: expected a mapping, got {type(data).__name__}")
        check_keys(data, {f.name for f in fields(cls)}, "calibration")
        return cls(**{**data, "text": TextSource.from_dict(data.get("text"), "calibration.text", base)})

    def windows(self, tokenizer) -> torch.Tensor:
        """``(n_samples, seq_len)`` token ids: windows at random starts in the text's token stream."""
        ids = tokenizer(self.text.read(), return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() < self.seq_len:
            raise ValueError(f"calibration.seq_len: the text has {ids.numel()} tokens, "
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

    def to(self, device) -> "InputStats":
        return InputStats(self.abs_mean.to(device), self.xtx.to(device), self.tokens)


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
            raise ValueError(f"calibration file {path}: format {data.get('format')!r} is not supported")
        stats = {n: InputStats(s["abs_mean"], s["xtx"], int(s["tokens"])) for n, s in data["stats"].items()}
        return cls(data["key"], stats, dict(data["aliases"]), dict(data.get("grads", {})))


class _StopForward(Exception):
    """Raised once every projection has seen its input: the rest of the model is not needed."""


def calibration_key(model: nn.Module, spec: CalibrationSpec, windows: torch.Tensor) -> str:
    """``<model fingerprint>-<hash of spec and token ids>`` (names the input statistics, so factor
    caches are shared by calibrations with and without gradients)."""
    table = find_projections(model)
    h = hashlib.sha256(repr(spec).encode())
    h.update(windows.to(torch.int64).cpu().numpy().tobytes())
    return f"{model_fingerprint(model, table)}-{h.hexdigest()[:12]}"


def collect_stats(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, gradients: bool = False,
                  progress: bool = False) -> tuple[Dict[str, InputStats], Dict[str, str], Dict[str, torch.Tensor]]:
    """``(stats, aliases, grads)`` of every projection over ``windows`` (one pass; see
    :class:`Calibration`). Without ``gradients`` the forward pass stops after the last projection
    and ``grads`` is empty; with them the next-token loss is back-propagated (weights get no
    gradients) and the squared output gradients are summed per channel."""
    from .decompose import is_decomposed

    if is_decomposed(model):
        raise RuntimeError("calibration: model is decomposed; calibrate the dense model (dse.restore_ first)")
    table = find_projections(model)
    device = next(model.parameters()).device
    stats: Dict[str, InputStats] = {}
    aliases: Dict[str, str] = {}
    grads: Dict[str, torch.Tensor] = {}
    state = {"last_input": None, "last_owner": None, "seen": 0}

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            if x is state["last_input"]:  # same tensor object as the previous projection's input
                aliases[name] = state["last_owner"]
            else:
                if name not in stats:
                    stats[name] = InputStats.zeros(x.shape[-1], device=x.device)
                stats[name].add(x)
                state["last_input"], state["last_owner"] = x, name
            state["seen"] += 1
            if state["seen"] == len(table) and not gradients:
                raise _StopForward
        return hook

    def grad_hook_for(name):
        def hook(module, grad_input, grad_output):
            g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).float()
            grads[name] = grads.get(name, 0) + g.pow(2).sum(0).double()
        return hook

    modules = {name: model.get_submodule(name) for name in table}
    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    if gradients:
        handles += [m.register_full_backward_hook(grad_hook_for(name)) for name, m in modules.items()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrate", disable=not progress,
                          leave=False):
            state.update(last_input=None, last_owner=None, seen=0)
            ids = windows[start:start + batch_size].to(device)
            if gradients:
                with torch.enable_grad():
                    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    loss = getattr(model(inputs_embeds=embeds, labels=ids), "loss", None)
                    if loss is None:
                        raise ValueError("calibration: gradients need a model that returns a language-"
                                         f"modeling loss; {type(model).__name__} returns none")
                    loss.backward()
                continue
            try:
                with torch.no_grad():
                    model(ids)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    tokens = windows.numel()
    return {n: s.finish() for n, s in stats.items()}, aliases, {n: g / tokens for n, g in grads.items()}


def calibrate(model: nn.Module, tokenizer, spec: CalibrationSpec, cache_dir: Optional[str | Path] = None,
              *, gradients: bool = False, batch_size: int = 8, progress: bool = True) -> Calibration:
    """Input statistics (and with ``gradients``, output-gradient statistics) of ``model``'s
    projections over ``spec``'s windows, cached in ``cache_dir``."""
    start = time.perf_counter()
    windows = spec.windows(tokenizer)
    key = calibration_key(model, spec, windows)
    path = Path(cache_dir) / f"calibration-{key}{'-grads' if gradients else ''}.pt" if cache_dir else None
    if path is not None and path.exists():
        try:
            cal = Calibration.load(path, device=next(model.parameters()).device)
            cal.seconds = time.perf_counter() - start
            return cal
        except Exception:  # a torn or foreign file: recompute and overwrite it
            pass
    stats, aliases, grads = collect_stats(model, windows, batch_size=batch_size, gradients=gradients,
                                          progress=progress)
    cal = Calibration(key, stats, aliases, grads, time.perf_counter() - start)
    if path is not None:
        cal.save(path)
    return cal
