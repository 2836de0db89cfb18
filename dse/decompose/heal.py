"""Healing: a short fine-tune of a decomposed model, in place (:func:`heal_`).

The recipe (:class:`HealConfig`) says what trains: the ``LowRankLinear`` factors themselves
(``factors``: sizes unchanged), or PEFT LoRA adapters on each factor, merged into the factors at
the end (``lora``); optionally the norms. The loss is next-token cross-entropy (``lm``) or the KL
divergence to the dense model's logits (``distill``). ``freeze: sequential`` trains one factor of
every module at a time, switching every ``switch_every`` steps (Hajimolahoseini et al., arXiv
2309.03824). A heal checkpoints and resumes to the same weights; a failure (a NaN loss, Ctrl-C)
leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError, HealError, ModelError
from ..core.io import atomic_path
from ..core.validate import boolean, check_keys, integer, mapping, number
from ..model import input_device, is_causal_lm
from .lowrank import LowRankLinear
from .methods import as_pair, get_method
from .plan import Plan
from .surgery import dense_modules, is_decomposed, swap_module

CHOICES = {
    "schedule": ("constant", "cosine"),
    "train": ("factors", "lora"),
    "loss": ("lm", "distill"),
    "freeze": ("none", "sequential"),
}
DEFAULT_STEPS = 100
ADAPTER = "heal"
CHECKPOINT_FILE = "heal.pt"
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class HealConfig:
    """A healing recipe. Give ``steps`` or ``tokens`` (rounded up to whole batches), not both.

    ``warmup`` steps ramp the learning rate linearly; ``grad_clip`` 0 clips nothing;
    ``switch_every`` is the phase length of ``freeze: sequential``; ``lora_rank`` and
    ``lora_alpha`` are the adapters' of ``train: lora``; ``norms`` also trains every norm;
    ``recompute`` keeps only each layer's input for the backward pass and recomputes the rest
    (transformers' activation checkpointing: less memory, a second forward pass).
    """

    steps: Optional[int] = None
    tokens: Optional[int] = None
    seq_len: int = 256
    batch: int = 4
    lr: float = 1e-4
    schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train: str = "factors"
    norms: bool = False
    recompute: bool = False
    loss: str = "lm"
    freeze: str = "none"
    switch_every: int = 10
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0

    def __post_init__(self):
        if self.steps is not None and self.tokens is not None:
            raise ConfigError("heal.tokens: give steps or tokens, not both")
        if self.steps is None and self.tokens is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)
        for name in ("steps", "tokens", "seq_len", "batch", "switch_every", "lora_rank"):
            if getattr(self, name) is not None:
                integer(getattr(self, name), f"heal.{name}", minimum=2 if name == "seq_len" else 1)
        integer(self.warmup, "heal.warmup", minimum=0)
        integer(self.seed, "heal.seed")
        number(self.lr, "heal.lr", 0, 1, open_low=True)
        number(self.weight_decay, "heal.weight_decay", 0, 1)
        number(self.grad_clip, "heal.grad_clip", 0)
        number(self.lora_alpha, "heal.lora_alpha", 0, open_low=True)
        boolean(self.norms, "heal.norms")
        boolean(self.recompute, "heal.recompute")
        for name, known in CHOICES.items():
            if getattr(self, name) not in known:
                raise ConfigError(f"heal.{name}: expected one of {', '.join(known)}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data, where: str = "heal") -> "HealConfig":
        """From plain data (a study's ``heal:`` block, the command line's options)."""
        data = mapping(data, where)
        check_keys(data, {f.name for f in fields(cls)}, where)
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else math.ceil(self.tokens / (self.batch * self.seq_len))

    def lr_factor(self, step: int) -> float:
        """The learning rate of ``step`` as a fraction of ``lr``: linear warmup, then the schedule."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / max(1, self.total_steps - self.warmup)))

    def phase(self, step: int, slots: int) -> Optional[int]:
        """The factor index every module trains at ``step`` (``None``: all of them)."""
        return None if self.freeze == "none" else (step // self.switch_every) % slots


@dataclass
class HealReport:
    """What a heal did: its steps and tokens (resumed ones included), training seconds, the loss
    of every step, and the peak memory (``peak_memory_of`` says of what) where measurable."""

    steps: int
    tokens: int
    seconds: float
    losses: List[float] = field(default_factory=list)
    resumed_from: int = 0
    peak_memory: Optional[int] = None
    peak_memory_of: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def heal_memory(model: nn.Module, table: Mapping, plan: Plan, config: HealConfig, b: int) -> Dict[str, int]:
    """Rough bytes a heal of ``plan`` needs beyond the decomposed model's weights, by part
    (``model`` may be a meta model; ``b`` bytes per element):

    * ``trained``: each trained tensor's gradient and AdamW's two moments, plus the copy that
      restores a failed heal (``factors``: the factors) or the adapters themselves (``lora``:
      ``lora_rank`` times the in and out sizes of every factor); norms if trained;
    * ``activations``: what the backward pass keeps, after Korthikanti et al. (arXiv 2205.05198):
      ``s·h·34`` bytes per layer and window at 2 bytes an element, scaled to ``b``, plus
      ``5·a·s²`` for the attention scores where attention is ``eager`` (SDPA keeps none); with
      ``recompute``, each layer's input and one layer's activations;
    * ``logits``: the logits, their float32 log-softmax and gradient (``distill``: the teacher's too).
    """
    method = get_method(plan.method)
    hf = model.config
    norms = sum(p.numel() for _, p in _norms(model)) if config.norms else 0
    if config.train == "factors":
        trained = 4 * (
            sum(method.params(r, table[n].out_features, table[n].in_features) for n, r in plan.ranks.items()) + norms
        )
    else:
        inner = {n: sum(as_pair(r)) if method.pair_ranks else r for n, r in plan.ranks.items()}
        adapters = sum(
            config.lora_rank * (table[n].in_features + table[n].out_features + 2 * inner[n]) for n in plan.ranks
        )
        trained = 4 * (adapters + norms)
    s, h, heads = config.seq_len, hf.hidden_size, hf.num_attention_heads
    scores = 5 * heads * s * s if getattr(hf, "_attn_implementation", "eager") == "eager" else 0
    layer = config.batch * (34 * s * h + scores) * b // 2
    layers = hf.num_hidden_layers
    activations = layers * config.batch * s * h * b + layer if config.recompute else layers * layer
    per_logit = b + 12 + (b + 4 if config.loss == "distill" else 0)
    return {"trained": trained * b, "activations": activations, "logits": config.batch * s * hf.vocab_size * per_logit}


def _norms(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every norm (a module whose class name says norm)."""
    for name, m in model.named_modules():
        if "norm" in type(m).__name__.lower():
            for pname, p in m.named_parameters(recurse=False):
                yield f"{name}.{pname}", p


def low_rank_modules(model: nn.Module) -> Dict[str, LowRankLinear]:
    """Every ``LowRankLinear`` of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _chain(module: LowRankLinear) -> nn.Sequential:
    """``module`` as ``nn.Linear`` layers that share its factor (and bias) parameters."""
    layers = []
    for i, factor in enumerate(module.factors):
        bias = module.bias if i == len(module.factors) - 1 else None
        layer = nn.Linear(factor.shape[1], factor.shape[0], bias=bias is not None, device="meta")
        layer.weight = factor
        if bias is not None:
            layer.bias = bias
        layers.append(layer)
    return nn.Sequential(*layers)


def add_lora(model: nn.Module, modules: Dict[str, LowRankLinear], rank: int, alpha: float):
    """Put a PEFT LoRA adapter on every factor of ``modules``: each module becomes a chain of
    ``nn.Linear`` sharing its factors, which PEFT adapts as it adapts any linear layer.
    Returns the ``LoraModel``; :func:`remove_lora` undoes it."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    for name, module in modules.items():
        swap_module(model, name, _chain(module))
    targets = [f"{name}.{i}" for name, m in modules.items() for i in range(len(m.factors))]
    return LoraModel(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0), ADAPTER)


def remove_lora(model: nn.Module, lora, modules: Dict[str, LowRankLinear], merge: bool) -> None:
    """Merge the adapters into the factors they adapt (or drop them) and put every
    ``LowRankLinear`` back in its place."""
    if merge:
        lora.merge_and_unload()
    else:
        lora.unload()
    for name, module in modules.items():
        swap_module(model, name, module)


@contextmanager
def _trainable(model: nn.Module, modules: Dict[str, LowRankLinear], config: HealConfig):
    """Yield ``(params, slots, saved)``: what the recipe trains by name, made trainable, the factor
    index of each (``None``: every phase) and the starting values of those trained in place.
    Afterwards every flag and the mode are as before and LoRA is merged; after an exception the
    model is as it was."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mode = model.training
    params: Dict[str, nn.Parameter] = {}
    slots: Dict[str, Optional[int]] = {}
    saved: Dict[str, torch.Tensor] = {}
    lora = None
    try:
        if config.train == "lora":
            with torch.random.fork_rng(devices=[]):  # the adapters' initialisation follows the recipe's seed
                torch.manual_seed(config.seed)
                lora = add_lora(model, modules, config.lora_rank, config.lora_alpha)
            for name, m in modules.items():
                for i in range(len(m.factors)):
                    layer = model.get_submodule(f"{name}.{i}")
                    for pname, p in layer.named_parameters():
                        if "lora_" in pname:
                            params[f"{name}.{i}.{pname}"], slots[f"{name}.{i}.{pname}"] = p, i
        else:
            for name, m in modules.items():
                for i, factor in enumerate(m.factors):
                    params[f"{name}.factors.{i}"], slots[f"{name}.factors.{i}"] = factor, i
        if config.norms:
            for name, p in _norms(model):
                params[name], slots[name] = p, None
        saved = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
        model.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        model.train()
        if config.recompute:
            _recompute(model, True)
        yield params, slots, saved
        if lora is not None:
            remove_lora(model, lora, modules, merge=True)
    except BaseException:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)
        if lora is not None:
            remove_lora(model, lora, modules, merge=False)
        raise
    finally:
        if config.recompute:
            _recompute(model, False)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        model.train(mode)


def _recompute(model: nn.Module, on: bool) -> None:
    """transformers' activation checkpointing on or off (non-reentrant: the frozen embeddings need
    no gradient); ``activation_*`` since transformers 5, ``gradient_*`` before."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{name}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{name}_checkpointing_disable")()


def _dense_teacher(
    model: nn.Module,
    modules: Dict[str, LowRankLinear],
    params: Dict[str, nn.Parameter],
    saved: Dict[str, torch.Tensor],
) -> Callable:
    """Logits of the dense model the decomposed ``model`` came from: the originals its low-rank
    ``modules`` keep swapped in (over a LoRA chain too), and the starting values of whatever else
    trains."""

    def logits(ids: torch.Tensor) -> torch.Tensor:
        current = {n: params[n].data for n in saved}
        try:
            for n, value in saved.items():
                params[n].data = value
            with dense_modules(model, modules):
                model.eval()
                return model(ids, use_cache=False).logits
        finally:
            for n, value in current.items():
                params[n].data = value
            model.train()

    return logits


def _loss(logits: torch.Tensor, ids: torch.Tensor, teacher_logits: Optional[torch.Tensor]) -> torch.Tensor:
    logits = logits.float()
    if teacher_logits is None:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(logits.device))
    return F.kl_div(
        F.log_softmax(logits, -1).flatten(0, 1),
        F.log_softmax(teacher_logits.float().to(logits.device), -1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    )


def _batch(windows: torch.Tensor, config: HealConfig, step: int) -> torch.Tensor:
    """The windows of ``step``: each epoch is a fresh permutation (from the seed and the epoch)."""
    per_epoch = len(windows) // config.batch
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    return windows[order[i * config.batch : (i + 1) * config.batch]]


def _peak_memory(device: torch.device) -> Tuple[Optional[int], str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda allocated"
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    except ImportError:  # not on Unix
        return None, ""


def heal_(
    model: nn.Module,
    windows: torch.Tensor,
    config: HealConfig,
    *,
    teacher: Optional[Callable] = None,
    checkpoint_dir=None,
    checkpoint_every: int = 50,
    progress: bool = True,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> HealReport:
    """Fine-tune the decomposed ``model`` in place on ``windows`` (``(n, config.seq_len)`` token ids)
    by ``config``; return what was done.

    ``teacher(ids) -> logits`` is the ``distill`` target; it defaults to the dense model the
    decomposed ``model`` holds. With ``checkpoint_dir``, the state is written there every
    ``checkpoint_every`` steps (atomically) and a heal found there resumes. ``on_step(step, loss)``
    is called after each step. Any exception leaves the model as it was.
    """
    if not is_causal_lm(model):
        raise ModelError(
            f"model: healing trains next-token prediction; {type(model).__name__} is not a causal language model"
        )
    if config.recompute and not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"heal.recompute: {type(model).__name__} does not support activation checkpointing")
    modules = low_rank_modules(model)
    if not modules:
        raise ModelError("model: has no low-rank modules to heal (decompose it first)")
    if windows.dim() != 2 or windows.shape[1] != config.seq_len:
        raise ConfigError(
            f"heal.seq_len: expected windows of {config.seq_len} tokens, got shape {tuple(windows.shape)}"
        )
    if len(windows) < config.batch:
        raise ConfigError(
            f"heal.batch: the text gives {len(windows)} windows of {config.seq_len} tokens, "
            f"fewer than one batch of {config.batch}"
        )
    if config.loss == "distill" and teacher is None and not is_decomposed(model):
        raise ConfigError(
            "heal.loss: distill needs the dense model's logits: decompose the model with "
            "dse.decompose_ (its originals are the teacher) or pass teacher="
        )
    integer(checkpoint_every, "checkpoint_every", minimum=1)
    total, device = config.total_steps, input_device(model)
    slots = max(len(m.factors) for m in modules.values())
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    run = {"config": config.to_dict(), "windows": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _trainable(model, modules, config) as (params, param_slots, saved):
        if config.loss == "distill" and teacher is None:
            teacher = _dense_teacher(model, modules, params, saved)
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: config.lr_factor(step))
        report = HealReport(0, 0, 0.0)
        if path is not None and path.is_file():
            report = _resume(path, run, params, optimizer, scheduler)
        bar = tqdm(total=total, initial=report.steps, desc="heal", disable=not progress, leave=False)
        for step in range(report.steps, total):
            start = time.perf_counter()
            phase = config.phase(step, slots)
            for n, p in params.items():
                p.requires_grad_(param_slots[n] is None or phase is None or param_slots[n] == phase)
            ids = _batch(windows, config, step).to(device)
            target = None
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(ids)
            loss = _loss(model(ids, use_cache=False).logits, ids, target)
            if not torch.isfinite(loss):
                raise HealError(
                    f"heal: the loss became {loss.item()} at step {step}; the model is left as it "
                    "was (try a lower heal.lr)"
                )
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            report.steps, report.tokens = step + 1, report.tokens + ids.numel()
            report.seconds += time.perf_counter() - start
            report.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{report.losses[-1]:.3f}", tok_s=f"{report.tokens_per_s:.0f}")
            if on_step is not None:
                on_step(step, report.losses[-1])
            if path is not None and (report.steps % checkpoint_every == 0 or report.steps == total):
                _save(path, run, params, optimizer, scheduler, report)
        bar.close()
    report.peak_memory, report.peak_memory_of = _peak_memory(device)
    return report


@contextmanager
def temporarily_healed(
    model: nn.Module, windows: torch.Tensor, config: HealConfig, progress: bool = True
) -> Iterator[HealReport]:
    """``with temporarily_healed(model, windows, config) as report:`` the decomposed ``model``
    healed for the block (see :func:`heal_`), then put back as it was: the heal trains private
    copies of the factors (a factor cache they were truncated from is never changed) and the norms
    it trains are restored bit-exact afterwards, also on an exception."""
    modules = low_rank_modules(model)
    for module in modules.values():
        for factor in module.factors:
            factor.data = factor.data.clone()
    norms = {name: p.detach().clone() for name, p in _norms(model)} if config.norms else {}
    try:
        yield heal_(model, windows, config, progress=progress)
    finally:
        with torch.no_grad():
            for name, p in _norms(model):
                if name in norms:
                    p.copy_(norms[name])


def _save(path: Path, run: dict, params, optimizer, scheduler, report: HealReport) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "run": run,
        "params": {n: p.detach().cpu() for n, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "report": {k: v for k, v in asdict(report).items() if k not in ("peak_memory", "peak_memory_of")},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path, run: dict, params, optimizer, scheduler) -> HealReport:
    """Load the checkpoint at ``path`` into the trained tensors and the optimizer; its report."""
    state = torch.load(path, weights_only=True)
    if (
        state.get("format") != CHECKPOINT_FORMAT
        or state.get("run") != run
        or set(state.get("params", {})) != set(params)
    ):
        raise ConfigError(
            f"checkpoint_dir: {path} holds a heal of another recipe, text or model; remove it or choose another folder"
        )
    with torch.no_grad():
        for n, value in state["params"].items():
            params[n].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    report = HealReport(**state["report"])
    report.resumed_from = report.steps
    return report
