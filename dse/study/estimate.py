"""``dse estimate STUDY``: the memory, disk and time a study will need, before it starts.

Everything comes from the model's config alone (the model is built on the meta device,
:func:`dse.model.shapes.meta_model`; the space's ``model_config`` if it has one, so a 70B study is
estimated on a laptop) and from the study's settings. With ``b`` the bytes of the study's dtype:

* **model weights**: every parameter times ``b``, where the study puts the model (a GPU for
  ``device: cuda`` or a ``device_map``, else the host).
* **calibration at once**: per distinct projection input (q/k/v share one, gate/up one) of
  ``n`` channels, ``XᵀX`` and the mean ``|x|`` in float64, ``8 (n² + n)`` bytes, all held together;
  with loss gradients (allocation spaces) also ``8 · out`` per projection; with output-gradient
  moments (a method that needs them, ``twosided``) ``8 (out² + out)`` per projection.
* **calibration streamed**: the largest layer's statistics, plus its cached inputs and outputs,
  ``2 · tokens · hidden · b`` (``tokens = n_samples · seq_len``); output-gradient moments are
  gathered for every projection before the walk and released layer by layer, so all of them too.
* **statistics on disk**: float32, the upper triangle of ``XᵀX``: ``4 (n (n + 1) / 2 + n)`` per input;
  the upper triangle of each output-gradient moment, ``4 out (out + 1) / 2`` per projection.
* **factor cache**: every projection the study may decompose (its space's and its baselines'),
  full rank ``k = min(m, n)``: ``b (m k + k + k n)`` each, in memory where ``cache.memory`` says
  and on disk with ``cache.dir``.
* **one trial**: the factors of the largest plan the study can make (each space module at its
  largest rank, the budget of an allocation space, each baseline), plus the perplexity
  evaluation's logits, a float32 copy of the shifted logits and their log-softmax,
  ``batch · window · vocab · (b + 8)``. lm-eval tasks add their own batches, not estimated here.
* **prefix store** (``evaluation.reuse_prefix``): at most ``evaluation.prefix_memory``; per
  start layer ``hidden · b`` per input position of the evaluation (the perplexity windows' share
  is printed when ``max_tokens`` bounds them), on the device where the layers compute.
* **a heal** (the study's ``heal:`` recipe, else :class:`~dse.decompose.HealConfig`'s defaults)
  of the largest plan, for each ``train`` choice, beyond the weights and factors above:
  :func:`dse.decompose.heal_memory` (gradients, AdamW moments and a rollback copy of what trains,
  activations kept for the backward pass, logits). Rough: an upper bound for most plans.
* **per-trial seconds**: the median of the study's completed trials (decompose, evaluate, restore),
  else the dense model's evaluation, when the study has run before; otherwise unknown.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from ..core.errors import DseError
from ..decompose import HealConfig, Plan, get_method, heal_memory
from ..decompose.heal import CHOICES
from ..model import find_projections, resolve_dtype
from ..model.shapes import meta_model
from .config import StudyConfig

SHARED_INPUTS = (("q", "k", "v"), ("gate", "up"))  # tensor types that read one input tensor


@dataclass(frozen=True)
class Line:
    """One figure of an estimate: bytes on the host, on the device(s) and on disk."""

    what: str
    host: int = 0
    device: int = 0
    disk: int = 0


@dataclass
class Estimate:
    title: str
    lines: List[Line]
    trial_seconds: Optional[float] = None
    seconds_from: str = "no trial has run yet"
    split: str = ""  # where a trial's time goes (dse.results.status.time_split), once trials have run

    def line(self, what: str) -> Line:
        return next(line for line in self.lines if line.what == what)

    def format(self) -> str:
        width = max(len(line.what) for line in self.lines)
        rows = [self.title, f"{'':{width}}  {'host':>10}  {'device':>10}  {'disk':>10}"]
        for line in self.lines:
            cells = [size(v) if v else "-" for v in (line.host, line.device, line.disk)]
            rows.append(f"{line.what:{width}}  " + "  ".join(f"{c:>10}" for c in cells))
        seconds = "unknown" if self.trial_seconds is None else f"{self.trial_seconds:.1f} s"
        rows.append(f"per trial: {seconds} ({self.seconds_from})")
        if self.split:
            rows.append(self.split)
        return "\n".join(rows)


def size(n: float) -> str:
    """Bytes in decimal units: ``538.1 MB``, ``13.5 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def input_owners(table: Mapping) -> Dict[int, List[int]]:
    """Per layer, the channel count of each distinct projection input (shared inputs once)."""
    out: Dict[int, List[int]] = {}
    seen = set()
    for p in table.values():
        group = next((g for g in SHARED_INPUTS if p.type in g), (p.type, p.name))
        if (p.layer, group) not in seen:
            seen.add((p.layer, group))
            out.setdefault(p.layer, []).append(p.in_features)
    return out


def check_inputs(config: StudyConfig) -> None:
    """Refuse, as ``dse run`` does, what would fail once a model is loaded: task names and their
    data, the text sources' files and fields, and baseline plans against the model's shapes."""
    config.evaluation.check_tasks()
    perplexity = config.evaluation.perplexity
    for text in (perplexity.text if perplexity else None, config.calibration.text if config.calibration else None):
        if text is not None:
            text.read()
    meta = meta_model(config.model, config.space.model_config)
    table = find_projections(meta, config.family)
    params = sum(p.numel() for p in meta.parameters())
    for baseline in config.baselines:
        baseline.plan(table, config.method, model_params=params).validate(table)


def estimate(config: StudyConfig, study=None) -> Estimate:
    """The :class:`Estimate` of ``config``; ``study`` (an Optuna study that ran before) times trials."""
    meta = meta_model(config.model, config.space.model_config)
    table = find_projections(meta)
    b = resolve_dtype(config.dtype).itemsize
    params = sum(p.numel() for p in meta.parameters())
    on_device = config.device_map is not None or config.device != "cpu"
    lines = [_where("model weights", params * b, on_device)]
    if config.calibration is not None:
        lines += _calibration(config, table, meta.config, b, on_device)
    modules = _modules(config, table, params)
    forms = sum(_form_bytes(table[n], b) for n in modules)
    memory = config.cache_memory
    held = 0 if memory == "none" else forms
    lines.append(_where(f"factor cache (memory: {memory})", held, on_device and memory == "device"))
    if config.cache_dir:
        lines.append(Line("factor cache on disk", disk=forms))
    lines.append(_where("one trial", _trial_bytes(config, table, meta.config, b, params), on_device))
    if config.evaluation.reuse_prefix is not False:
        lines.append(_prefix_store(config, meta.config, b, on_device))
    recipe = config.heal.recipe if config.heal is not None else HealConfig()
    largest, _ = _space_plan(config, table, params)
    for train in CHOICES["train"]:
        heal = heal_memory(meta, table, largest, dataclasses.replace(recipe, train=train), b)
        lines.append(
            _where(f"heal, train {train} ({recipe.batch} x {recipe.seq_len} tokens)", sum(heal.values()), on_device)
        )
    placed = (
        config.device
        if config.device_map is None
        else (
            f"device_map {config.device_map}"
            if isinstance(config.device_map, str)
            else f"an explicit device_map of {len(config.device_map)} entries"
        )
    )
    title = (
        f"dse estimate: study {config.name}, model {config.model} ({len(table)} projections in "
        f"{1 + max(p.layer for p in table.values())} layers, {params / 1e6:.1f} M parameters), "
        f"{config.dtype}, {placed}"
    )
    out = Estimate(title, lines)
    if study is not None:
        from ..results.status import time_split

        out.trial_seconds, out.seconds_from = _seconds(study)
        out.split = time_split(study.get_trials(deepcopy=False))
    return out


def _where(what: str, nbytes: int, on_device: bool) -> Line:
    return Line(what, device=nbytes) if on_device else Line(what, host=nbytes)


def _calibration(config: StudyConfig, table: Mapping, hf_config, b: int, on_device: bool) -> List[Line]:
    owners = input_owners(table)
    moments = config.method.needs_grad_moments
    grads = 8 * sum(p.out_features for p in table.values()) if config.needs_importance or moments else 0
    grad_moments = 8 * sum(p.out_features**2 for p in table.values()) if moments else 0
    at_once = sum(8 * (n * n + n) for layer in owners.values() for n in layer) + grads + grad_moments
    spec = config.calibration
    cached = 2 * spec.n_samples * spec.seq_len * hf_config.hidden_size * b
    streamed = (
        max(sum(8 * (n * n + n) for n in layer) for layer in owners.values())
        + cached
        + (grads + grad_moments if moments else 0)
    )  # the walk starts with every moment held
    disk = (
        sum(4 * (n * (n + 1) // 2 + n) for layer in owners.values() for n in layer)
        + grads // 2
        + sum(4 * (p.out_features * (p.out_features + 1) // 2) for p in table.values()) * moments
    )
    return [
        _where("calibration at once", at_once, on_device),
        _where("calibration streamed", streamed, on_device),
        Line("calibration statistics on disk", disk=disk),
    ]


def _form_bytes(p, b: int) -> int:
    k = p.full_rank
    return b * (p.out_features * k + k + k * p.in_features)


def _space_plan(config: StudyConfig, table: Mapping, params: int) -> Tuple[Plan, Optional[int]]:
    """The largest plan of the study's space (each module at its largest rank; an allocation
    space's modules at full rank) and the parameters an allocation space's budget keeps."""
    space = config.space
    if hasattr(space, "budget"):
        sel = space.selected(table)
        return Plan({n: p.full_rank for n, p in sel.items()}, config.method), space.budget.kept(sel, params)
    resolved = space.layout(table).resolved
    return Plan({n: max(r for r in rs if r) for n, rs in resolved.items()}, config.method), None


def _baseline_plans(config: StudyConfig, table: Mapping, params: int) -> List[Plan]:
    plans = []
    for baseline in config.baselines:
        try:
            plans.append(baseline.plan(table, config.method, model_params=params))
        except DseError:  # e.g. a sensitivity baseline whose characterization is not written yet
            continue
    return plans


def _modules(config: StudyConfig, table: Mapping, params: int) -> set:
    plan, _ = _space_plan(config, table, params)
    return set(plan.ranks).union(*(p.ranks for p in _baseline_plans(config, table, params)))


def _trial_bytes(config: StudyConfig, table: Mapping, hf_config, b: int, params: int) -> int:
    method = get_method(config.method.name)

    def factors(plan: Plan) -> int:
        return b * sum(method.params(r, table[n].out_features, table[n].in_features) for n, r in plan.ranks.items())

    plan, budget = _space_plan(config, table, params)
    largest = max(
        [b * budget if budget is not None else factors(plan)]
        + [factors(p) for p in _baseline_plans(config, table, params)]
    )
    ppl = config.evaluation.perplexity
    logits = 0
    if ppl is not None:
        logits = ppl.batch_size * ppl.window * hf_config.vocab_size * (b + 8)
    return largest + logits


def _prefix_store(config: StudyConfig, hf_config, b: int, on_device: bool) -> Line:
    """The prefix store's budget; per start layer it holds ``hidden · b`` bytes per input position:
    the perplexity windows' tokens (counted when ``max_tokens`` bounds them) and the tasks' padded
    context and continuation positions (not counted)."""
    per_token = hf_config.hidden_size * b
    ppl = config.evaluation.perplexity
    windows = (
        f", perplexity {size(ppl.max_tokens // ppl.window * ppl.window * per_token)}" if ppl and ppl.max_tokens else ""
    )
    what = f"prefix store, at most ({size(per_token)} per position and start layer{windows})"
    return _where(what, config.evaluation.prefix_bytes, on_device)


def _seconds(study) -> tuple:
    from optuna.trial import TrialState

    from ..results.record import TrialRecord

    records = [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    done = [r.metrics for r in records if r.duplicate_of is None and r.get("n_modules")]
    steps = ("decompose_seconds", "eval_seconds", "restore_seconds")
    times = [sum(a.get(step, 0.0) for step in steps) for a in done if "eval_seconds" in a]
    if times:
        return statistics.median(times), f"median of {len(times)} completed trials"
    base = study.user_attrs.get("baseline") or {}
    if "eval_seconds" in base:
        return base["eval_seconds"], "the dense model's evaluation; decomposition adds to it"
    return None, "no trial has run yet"
