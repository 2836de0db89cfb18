"""Latency tables: what each projection costs, dense and at each rank, on this device, measured once.

A :class:`LatencyTable` holds, for one device, dtype, torch version, thread count and
:class:`Workload`, the milliseconds of every distinct projection shape of a model, dense and as two
factors at a grid of ranks (interpolated between), for a decode step (``batch`` tokens) and for a
prefill (``prefill_batch`` × ``prompt`` tokens), plus the rest of the model (attention, norms,
embeddings, head: the measured end-to-end time less its dense projections). A plan's predicted
latency is the rest plus each projection's time (:meth:`LatencyTable.predict`): free and free of
noise, so every sampler and allocation budget can use it.

Weights are timed cold, as a forward pass reads them: each measurement cycles through copies of
the factors that together exceed the last-level cache, so a GEMV streams from memory as it does
in a model too big for the cache. From the grid come each shape's *break-even* rank (from which
two factors are no faster than the dense matrix) and its fast rank *step* (ranks one below a
multiple of it measured slower: ``align: auto`` rounds ranks to it).

Tables are cached as JSON (:func:`latency_table`), keyed by everything they depend on; a table
measured elsewhere is refused with the field that differs.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import ConfigError, PlanError
from ..core.io import atomic_write_text
from ..core.validate import check_keys, integer, mapping, read_json
from ..model import input_device
from ..model.timing import cpu_name, decode, prefill, sync, threads, timed
from .methods import get_method
from .plan import Plan, align_rank

TABLE_FORMAT = 1
PHASES = ("decode", "prefill")
STEP_CANDIDATES = (64, 32, 16, 8)
MEASURE_ATTEMPTS = 3


@dataclass(frozen=True)
class Workload:
    """A decode step of ``batch`` sequences, and a prefill of ``prefill_batch`` prompts of ``prompt`` tokens."""

    batch: int = 1
    prompt: int = 128
    prefill_batch: int = 1

    def __post_init__(self):
        for name in ("batch", "prompt", "prefill_batch"):
            integer(getattr(self, name), f"latency_table.{name}", 1)

    def tokens(self, phase: str) -> int:
        return self.batch if phase == "decode" else self.prefill_batch * self.prompt


@dataclass(frozen=True)
class TableSpec:
    """A study's ``latency_table:`` section: the workload, and a table file to use instead of
    measuring (``path``; it must have been measured on this device, dtype, torch and threads)."""

    workload: Workload = Workload()
    path: Optional[str] = None

    @classmethod
    def from_dict(cls, data, base: Optional[Path] = None) -> "TableSpec":
        data = mapping(data or {}, "latency_table", allowed=("batch", "prompt", "prefill_batch", "path"))
        path = data.pop("path", None)
        if path is not None:
            path = str((Path(base) / path).resolve() if base and not Path(path).is_absolute() else Path(path))
        return cls(Workload(**data), path)


def environment(device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    """What a table's timings depend on besides the model: device, dtype, torch version, threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"
    return {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": threads(),
    }


@dataclass
class ShapeCost:
    """Milliseconds of one ``out × in`` projection shape per phase: ``dense``, and ``lowrank`` at ``ranks``."""

    out_features: int
    in_features: int
    ranks: List[int]
    dense: Dict[str, float]
    lowrank: Dict[str, List[float]]
    step: int = 1

    def __post_init__(self):
        self._envelope: Dict[str, np.ndarray] = {}  # per phase, built once (not a field: not saved)
        self._break_even: Dict[str, int] = {}

    def envelope(self, phase: str = "decode") -> np.ndarray:
        """The lower envelope of the measurements, ``min`` over the measured ranks at or above each
        rank: non-decreasing in rank, and a time inflated by another process's load (noise only
        ever adds time) is replaced by the faster time of a larger rank."""
        if phase not in self._envelope:
            self._envelope[phase] = np.minimum.accumulate(np.asarray(self.lowrank[phase])[::-1])[::-1]
        return self._envelope[phase]

    def at(self, rank, phase: str = "decode"):
        """Milliseconds of the two factors at ``rank``, interpolated on the :meth:`envelope`; an
        array of ranks gives an array."""
        times = np.interp(rank, self.ranks, self.envelope(phase))
        return float(times) if np.ndim(times) == 0 else times

    def break_even(self, phase: str = "decode") -> int:
        """The smallest rank at which two factors are measured no faster than the dense matrix
        (``min(out, in) + 1`` if every rank is faster)."""
        if phase not in self._break_even:
            full = min(self.out_features, self.in_features)
            slower = self.at(np.arange(1, full + 1), phase) >= self.dense[phase]
            self._break_even[phase] = int(np.argmax(slower)) + 1 if slower.any() else full + 1
        return self._break_even[phase]


@dataclass
class LatencyTable:
    """Measured costs of a model's projection shapes (see the module doc)."""

    environment: Dict[str, object]
    workload: Workload
    model: str  # the model's shape key (:func:`shape_key`)
    rest: Dict[str, float]  # ms per phase of everything but the projections
    shapes: Dict[str, ShapeCost] = field(default_factory=dict)
    seconds: float = 0.0  # how long measuring took

    def consistent(self) -> bool:
        """False when the projections alone were measured slower than the whole model (a negative
        ``rest``): the machine was busy while the table was measured."""
        return all(ms >= 0 for ms in self.rest.values())

    def cost(self, p) -> ShapeCost:
        return self.shapes[_shape_name(p.out_features, p.in_features)]

    def module_ms(self, p, rank=None, phase: str = "decode") -> float:
        """Milliseconds of projection ``p`` (a table entry), dense when ``rank`` is None."""
        cost = self.cost(p)
        return cost.dense[phase] if rank is None else cost.at(rank, phase)

    def predict(self, plan: Plan, table: Mapping) -> Dict[str, float]:
        """The predicted milliseconds of one decode step (``predicted_decode_ms``: the workload's
        ``batch`` sequences, one token each) and of one prefill (``predicted_prefill_ms``) under ``plan``."""
        if get_method(plan.method).pair_ranks:
            raise PlanError(f"plan.method: latency tables model two factors; {plan.method} has three")
        out = {
            phase: self.rest[phase] + sum(self.module_ms(p, plan.ranks.get(n), phase) for n, p in table.items())
            for phase in PHASES
        }
        return {"predicted_decode_ms": out["decode"], "predicted_prefill_ms": out["prefill"]}

    def faster_plan(self, plan: Plan, table: Mapping, align: bool = False) -> Plan:
        """``plan`` with each rank rounded down to its shape's fast step (``align``), and every module
        whose rank is measured no faster than dense (at its break-even rank or above) left dense."""
        ranks = {}
        for name, rank in plan.ranks.items():
            cost = self.cost(table[name])
            if align:
                rank = align_rank(rank, cost.step)
            if rank < cost.break_even("decode"):
                ranks[name] = rank
        return plan.with_ranks(ranks)

    # --- files ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "environment": self.environment,
            "workload": asdict(self.workload),
            "model": self.model,
            "rest": self.rest,
            "seconds": self.seconds,
            "shapes": {k: asdict(v) for k, v in self.shapes.items()},
        }

    def save(self, path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "LatencyTable":
        data = read_json(path, "latency_table.path")
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise ConfigError(f"latency_table.path: {path} is not a dse latency table (format {TABLE_FORMAT})")
        check_keys(data, ("format", "environment", "workload", "model", "rest", "seconds", "shapes"), "latency_table")
        return cls(
            data["environment"],
            Workload(**data["workload"]),
            data["model"],
            data["rest"],
            {k: ShapeCost(**v) for k, v in data["shapes"].items()},
            data.get("seconds", 0.0),
        )

    def check(self, environment_now: Mapping, workload: Workload, model_key: str) -> None:
        """Refuse a table measured for another device, dtype, torch, thread count, workload or model."""
        for key, value in environment_now.items():
            if self.environment.get(key) != value:
                raise ConfigError(
                    f"latency_table.{key}: the table was measured with {key} "
                    f"{self.environment.get(key)!r}, this run has {value!r}; measure a new one"
                )
        if self.workload != workload:
            raise ConfigError(
                f"latency_table.workload: the table times {asdict(self.workload)}, the study "
                f"asks for {asdict(workload)}"
            )
        if self.model != model_key:
            raise ConfigError("latency_table.model: the table was measured for a model of other shapes")


def _shape_name(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def shape_key(model, table: Mapping) -> str:
    """A hash of the model's class, config and projection shapes: what the ``rest`` depends on."""
    config = getattr(model, "config", None)
    text = json.dumps(
        {
            "class": type(model).__name__,
            "config": config.to_dict() if config is not None else None,
            "shapes": [(n, p.out_features, p.in_features) for n, p in table.items()],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- measuring ---------------------------------------------------------------------------------


def rank_grid(full: int) -> List[int]:
    """Ranks a shape is timed at: 1, 8, 16, then steps of 32 up to the full rank (always included)."""
    grid = [1, 8, 16] + list(range(32, full, 32)) + [full]
    return sorted({r for r in grid if 1 <= r <= full})


@torch.no_grad()
def _chain_ms(factors: Sequence[Sequence[torch.Tensor]], x: torch.Tensor, repeats: int) -> float:
    """Milliseconds of applying one chain of factors to ``x``, cycling through the copies: the fastest
    of ``repeats`` passes (load from other processes only ever adds time)."""
    device = x.device

    def run():
        for chain in factors:
            y = x
            for f in chain:
                y = F.linear(y, f)

    timing = timed(run, device, repeats=repeats, warmup=1)
    return 1000.0 * timing.low / len(factors)


def _copies(shapes: Sequence[Tuple[int, int]], buffer: torch.Tensor) -> List[List[torch.Tensor]]:
    """Copies of a chain of weights of ``shapes``, as consecutive views of ``buffer`` (at least two)."""
    per = sum(a * b for a, b in shapes)
    count = max(2, min(1024, buffer.numel() // per))
    flat = buffer if count * per <= buffer.numel() else buffer.new_full((count * per,), buffer[0].item())
    chains, offset = [], 0
    for _ in range(count):
        chain = []
        for a, b in shapes:
            chain.append(flat[offset : offset + a * b].view(a, b))
            offset += a * b
        chains.append(chain)
    return chains


def measure_shape(
    out_features: int,
    in_features: int,
    workload: Workload,
    device,
    dtype,
    *,
    cold_bytes: int = 256 * 2**20,
    repeats: int = 3,
) -> ShapeCost:
    """Time one shape dense and at every rank of :func:`rank_grid`, in each phase."""
    full = min(out_features, in_features)
    ranks = rank_grid(full)
    element = torch.finfo(dtype).bits // 8
    buffers = {
        "decode": _buffer(cold_bytes // element, device, dtype),  # weights stream from memory
        "prefill": _buffer(0, device, dtype),
    }  # compute bound: two copies do
    dense, lowrank = {}, {}
    for phase in PHASES:
        x = torch.randn(workload.tokens(phase), in_features, device=device, dtype=dtype)
        dense[phase] = _chain_ms(_copies([(out_features, in_features)], buffers[phase]), x, repeats)
        lowrank[phase] = [
            _chain_ms(_copies([(r, in_features), (out_features, r)], buffers[phase]), x, repeats) for r in ranks
        ]
    step = _fast_step(out_features, in_features, workload, buffers["prefill"], repeats)
    return ShapeCost(out_features, in_features, ranks, dense, lowrank, step)


def _buffer(numel: int, device, dtype) -> torch.Tensor:
    """A flat buffer of small equal values (the timings do not depend on them)."""
    return torch.full((max(numel, 1),), 0.01, device=device, dtype=dtype)


def _fast_step(out_features: int, in_features: int, workload: Workload, buffer: torch.Tensor, repeats: int) -> int:
    """The largest of :data:`STEP_CANDIDATES` whose multiples are faster than one rank below them
    (a prefill's GEMM, where tiles matter), by more than 3 %; 1 if none is."""
    full = min(out_features, in_features)
    x = torch.randn(workload.tokens("prefill"), in_features, device=buffer.device, dtype=buffer.dtype)

    def ms(r):
        return _chain_ms(_copies([(r, in_features), (out_features, r)], buffer), x, repeats)

    for step in STEP_CANDIDATES:
        ratios = [ms(k * step - 1) / ms(k * step) for k in (2, 3, 4) if k * step <= full]
        if ratios and statistics.median(ratios) > 1.03:
            return step
    return 1


def _model_ms(model, workload: Workload, vocab: int, repeats: int) -> Dict[str, float]:
    """End-to-end milliseconds of the model now (fastest of ``repeats``): one decode step, one prefill."""
    device = input_device(model)
    gen = torch.Generator().manual_seed(0)
    one = torch.randint(0, vocab, (workload.batch, workload.prompt), generator=gen).to(device)
    many = torch.randint(0, vocab, (workload.prefill_batch, workload.prompt), generator=gen).to(device)
    steps = 8
    step = (
        timed(
            lambda out: decode(model, out, steps), device, repeats=repeats, warmup=1, setup=lambda: prefill(model, one)
        ).low
        / steps
    )
    fill = timed(lambda: prefill(model, many), device, repeats=repeats, warmup=1).low
    return {"decode": 1000.0 * step, "prefill": 1000.0 * fill}


def measure_table(
    model,
    table: Mapping,
    workload: Workload = Workload(),
    *,
    repeats: int = 3,
    cold_bytes: int = 256 * 2**20,
    progress: bool = False,
) -> LatencyTable:
    """Measure the :class:`LatencyTable` of ``model`` (dense, as it is) on its device and dtype."""
    start = time.perf_counter()
    device = input_device(model)
    dtype = next(model.parameters()).dtype
    distinct = dict.fromkeys((p.out_features, p.in_features) for p in table.values())
    shapes = {
        _shape_name(*shape): measure_shape(*shape, workload, device, dtype, cold_bytes=cold_bytes, repeats=repeats)
        for shape in tqdm(distinct, desc="latency table", unit="shape", disable=not progress, leave=False)
    }
    sync(device)
    whole = _model_ms(model, workload, model.config.vocab_size, repeats)
    lt = LatencyTable(environment(device, dtype), workload, shape_key(model, table), {}, shapes)
    lt.rest = {phase: whole[phase] - sum(lt.module_ms(p, None, phase) for p in table.values()) for phase in PHASES}
    lt.seconds = time.perf_counter() - start
    return lt


def latency_table(
    model, table: Mapping, spec: TableSpec = TableSpec(), cache_dir=None, *, progress: bool = False
) -> LatencyTable:
    """The latency table of ``model`` for ``spec``: the file ``spec.path`` (checked against this run),
    else a cached one in ``cache_dir`` for this environment, else measured now and cached once it is
    :meth:`~LatencyTable.consistent` (up to :data:`MEASURE_ATTEMPTS` measurements)."""
    device = input_device(model)
    env = environment(device, next(model.parameters()).dtype)
    key = shape_key(model, table)
    if spec.path is not None:
        loaded = LatencyTable.load(spec.path)
        loaded.check(env, spec.workload, key)
        return loaded
    name = hashlib.sha256(json.dumps([env, asdict(spec.workload), key], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latency-{name}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return LatencyTable.load(path)
        except ConfigError:  # a torn or foreign file: measure again and overwrite it
            pass
    for _ in range(MEASURE_ATTEMPTS):
        lt = measure_table(model, table, spec.workload, progress=progress)
        if lt.consistent():
            if path is not None:
                lt.save(path)
            return lt
    warnings.warn(
        f"latency table: measured {MEASURE_ATTEMPTS} times, the projections alone were slower than the "
        f"whole model each time (rest {lt.rest}): the machine is busy; the table is used but not cached"
    )
    return lt
