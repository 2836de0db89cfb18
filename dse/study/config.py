"""Study configuration: the YAML a user writes under ``studies/``, validated into a :class:`StudyConfig`.

Each section is parsed once, by the part of ``dse`` that owns it (the space by
:func:`dse.space.load_space`, the method by :func:`dse.decompose.make_config`, the evaluation by
:meth:`dse.evaluate.EvalConfig.from_dict`, the sampler by :func:`dse.study.samplers.parse_sampler`
...), and the parsed objects are kept. Every error is one line naming the field
(``sampler: unknown sampler 'tpee' (did you mean 'tpe'?); ...``). Relative paths (space file, data
directory, text files, storage file, cache) resolve against the study file's folder, so a study
runs the same from any working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..core.errors import ConfigError
from ..core.validate import check_keys, integer, mapping, number, read_yaml, resolve_path, string
from ..decompose import CalibrationSpec, HealConfig, MethodConfig, SVDConfig, check_memory, make_config
from ..decompose.latency import TableSpec
from ..evaluate import OBJECTIVES, EvalConfig
from ..model import DTYPES, FAMILIES, DeviceMap, TextSource, parse_device_map, parse_max_memory, text_section
from ..space import STARTS, AnySpace, Baseline, load_space, parse_baseline, space_from_dict
from .samplers import SamplerConfig, parse_sampler

KEYS = (
    "name",
    "model",
    "family",
    "device",
    "device_map",
    "max_memory",
    "offload_dir",
    "dtype",
    "space",
    "method",
    "method_options",
    "calibration",
    "evaluation",
    "objectives",
    "sampler",
    "seed",
    "n_trials",
    "timeout",
    "storage",
    "constraints",
    "baselines",
    "cache",
    "cache_dir",
    "heartbeat_s",
    "grace_s",
    "multi_fidelity",
    "latency_table",
    "heal",
)


@dataclass(frozen=True)
class Constraints:
    """Feasibility limits: ``max_drop`` in accuracy points (fraction, 0.10 = 10 points) below the
    undecomposed baseline, ``max_params`` as a fraction of the model's parameters, ``max_perplexity``."""

    max_drop: Optional[float] = None
    max_params: Optional[float] = None
    max_perplexity: Optional[float] = None

    def violations(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> List[float]:
        """Optuna's convention: one value per constraint, feasible when <= 0 (each metric read where
        its objective keeps it)."""
        accuracy, params, perplexity = (OBJECTIVES.get(o).attribute for o in ("accuracy", "params", "perplexity"))
        out = []
        if self.max_drop is not None:
            out.append((baseline[accuracy] - self.max_drop) - metrics[accuracy])
        if self.max_params is not None:
            out.append(metrics[params] - self.max_params)
        if self.max_perplexity is not None:
            out.append(metrics[perplexity] - self.max_perplexity)
        return out

    def __bool__(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


@dataclass(frozen=True)
class MultiFidelity:
    """Stop a trial after the first ``first`` share of each task's rows when its mean accuracy there
    is more than ``margin`` (0.05 = 5 points) below the best completed trial of the same size or
    smaller; the trial is recorded as pruned, with the reason in its ``pruned`` attribute."""

    first: float = 0.25
    margin: float = 0.05


HEAL_TRIALS = ("front", "all")


@dataclass(frozen=True)
class StudyHeal:
    """A study's ``heal:`` block: the recipe (:class:`~dse.decompose.HealConfig`'s fields), the
    ``text`` it trains on (apart from the evaluation's perplexity text) and which ``trials`` are
    healed after their plain measurement: ``front`` (those that join the current front of the
    plain measures) or ``all`` (needed to optimise a ``*_healed`` objective)."""

    recipe: HealConfig
    text: TextSource
    trials: str = "front"


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: Optional[Path]  # the YAML file, or None for a config built in code
    space: AnySpace
    evaluation: EvalConfig
    model: str = "smollm2-135m"
    family: Optional[str] = None  # the architecture family (dse.model.FAMILIES); None: the one recognised
    device: str = "cpu"
    device_map: Optional[DeviceMap] = None  # accelerate's placement over devices, instead of ``device``
    max_memory: Optional[Mapping] = None
    offload_dir: Optional[str] = None
    dtype: str = "float32"
    method: MethodConfig = SVDConfig()
    calibration: Optional[CalibrationSpec] = None
    objectives: Tuple[str, ...] = ("accuracy", "params")
    sampler: SamplerConfig = SamplerConfig()
    seed: int = 0
    n_trials: int = 20
    timeout: Optional[float] = None
    storage: Optional[str] = None
    constraints: Constraints = Constraints()
    baselines: Tuple[Baseline, ...] = ()
    cache_dir: Optional[str] = None  # factors, calibration statistics (cache.dir)
    cache_memory: str = "device"  # where the factor cache keeps full-rank forms (cache.memory)
    heartbeat_s: int = 30  # RDB storage: a worker's liveness signal
    grace_s: int = 120  # a RUNNING trial silent this long is failed and re-queued once
    multi_fidelity: Optional[MultiFidelity] = None
    latency_table: Optional[TableSpec] = None  # given, or implied by what needs one (see uses_latency)
    heal: Optional[StudyHeal] = None

    @property
    def placement(self) -> Dict[str, Any]:
        """Where and how the model loads: :func:`dse.model.load_model`'s keyword arguments."""
        keys = ("device", "dtype", "device_map", "max_memory", "offload_dir")
        return {key: getattr(self, key) for key in keys}

    @property
    def optimises_latency(self) -> bool:
        """A latency objective or a latency budget: sampled plans never keep a rank measured slower than dense."""
        return "latency" in self.objectives or self.space.spends_latency

    @property
    def uses_latency(self) -> bool:
        """Whether trials need a latency table: latency optimised, ``align: auto``, or a table given."""
        return self.optimises_latency or self.space.aligns_ranks or self.latency_table is not None

    @property
    def needs_importance(self) -> bool:
        """Whether trials read each component's importance (:func:`dse.space.importance`): an
        allocation space, or a sampler that proposes plans (its error model weighs them)."""
        return self.space.needs_importance or hasattr(self.sampler.unit.cls, "propose")

    @property
    def loss_metric(self) -> str:
        """What sensitivity probes and the error model measure loss by: perplexity if the study
        optimises it, else accuracy (a study that needs one has one of them: checked on load)."""
        return "perplexity" if "perplexity" in self.objectives else "accuracy"

    @property
    def directions(self) -> List[str]:
        return [OBJECTIVES.get(o).direction for o in self.objectives]

    @property
    def storage_url(self) -> str:
        """The storage URL; by default a SQLite file beside the study file."""
        if self.storage:
            return self.storage
        folder = self.path.parent if self.path else Path.cwd()
        return f"sqlite:///{(folder / 'runs' / f'{self.name}.db').resolve()}"


def load_study_config(path) -> StudyConfig:
    path = Path(path).resolve()
    return study_config_from_dict(read_yaml(path, "study"), path)


def study_config_from_dict(data: Mapping[str, Any], path: Optional[Path] = None) -> StudyConfig:
    """Validate a study mapping; ``path`` (the YAML file) anchors relative paths."""
    base = path.parent if path else Path.cwd()
    check_keys(data, KEYS, "")
    name = string(data.get("name", path.stem if path else None), "name")
    space = _space(data.get("space"), base)
    method = make_config(
        string(data.get("method", StudyConfig.method.name), "method"),
        mapping(data.get("method_options") or {}, "method_options"),
    )
    calibration = _calibration(data.get("calibration"), base, method, space)
    evaluation = EvalConfig.from_dict(data.get("evaluation") or {}, base)
    heal = _heal(data.get("heal"), base, evaluation)
    objectives = _objectives(data.get("objectives", list(StudyConfig.objectives)), evaluation, space, heal)
    constraints = _constraints(data.get("constraints") or {}, evaluation)
    sampler = parse_sampler(data.get("sampler"))
    _check_proposer(sampler, space, objectives, calibration)
    return StudyConfig(
        name=name,
        path=path,
        space=space,
        evaluation=evaluation,
        model=string(data.get("model", StudyConfig.model), "model"),
        family=_family(data.get("family"), space),
        device=_device(data.get("device", StudyConfig.device)),
        dtype=_dtype(data.get("dtype", StudyConfig.dtype)),
        method=method,
        **_placement(data, base),
        calibration=calibration,
        objectives=objectives,
        sampler=sampler,
        seed=integer(data.get("seed", StudyConfig.seed), "seed"),
        n_trials=integer(data.get("n_trials", StudyConfig.n_trials), "n_trials", 1),
        timeout=None if data.get("timeout") is None else number(data["timeout"], "timeout", 0, open_low=True),
        storage=_storage(data.get("storage"), base),
        constraints=constraints,
        baselines=_baselines(data.get("baselines") or [], base),
        **_cache(data, base),
        heartbeat_s=integer(data.get("heartbeat_s", StudyConfig.heartbeat_s), "heartbeat_s", 1),
        grace_s=integer(data.get("grace_s", StudyConfig.grace_s), "grace_s", 1),
        multi_fidelity=_multi_fidelity(data.get("multi_fidelity"), evaluation, objectives),
        latency_table=None if data.get("latency_table") is None else TableSpec.from_dict(data["latency_table"], base),
        heal=heal,
    )


def _space(data, base: Path) -> AnySpace:
    if isinstance(data, str):
        return load_space(resolve_path(base, data, "space"))
    if isinstance(data, Mapping):
        return space_from_dict(data)
    raise ConfigError("space: expected a path to a space YAML or an inline mapping")


def _family(family, space: AnySpace) -> Optional[str]:
    """The study's ``family``, else its space's; the two must agree when both are set."""
    if family is None:
        return space.family
    FAMILIES.get(string(family, "family"), "family")
    if space.family is not None and space.family != family:
        raise ConfigError(f"family: {family!r}, but the space says space.family: {space.family!r}")
    return family


def _calibration(data, base: Path, method: MethodConfig, space: AnySpace) -> Optional[CalibrationSpec]:
    calibration = None if data is None else CalibrationSpec.from_dict(data, base)
    if method.needs_calibration and calibration is None:
        raise ConfigError(f"calibration: method {method.name} needs calibration data; add a calibration: section")
    if space.needs_importance and calibration is None:
        raise ConfigError(
            "calibration: an allocation space (budget:) needs calibration data (its loss gradients "
            "rank the components); add a calibration: section"
        )
    return calibration


def _heal(data, base: Path, evaluation: EvalConfig) -> Optional[StudyHeal]:
    if data is None:
        return None
    data = text_section(data, "heal", {f.name for f in dataclasses.fields(HealConfig)} | {"text", "trials"}, base)
    text = data.pop("text")
    trials = data.pop("trials", StudyHeal.trials)
    if trials not in HEAL_TRIALS:
        raise ConfigError(f"heal.trials: expected one of {', '.join(HEAL_TRIALS)}, got {trials!r}")
    if evaluation.perplexity is not None:
        text.check_disjoint(evaluation.perplexity.text)
    return StudyHeal(HealConfig.from_dict(data), text, trials)


def _objectives(data, evaluation: EvalConfig, space: AnySpace, heal: Optional[StudyHeal]) -> Tuple[str, ...]:
    if not isinstance(data, list) or not data:
        raise ConfigError(f"objectives: expected a non-empty list of objective names, got {data!r}")
    for i, name in enumerate(data):
        objective = OBJECTIVES.get(name, f"objectives[{i}]")
        missing = objective.missing(evaluation)
        if missing:
            raise ConfigError(f"objectives[{i}]: {name!r} needs {missing}")
        if objective.healed and (heal is None or heal.trials != "all"):
            raise ConfigError(
                f"objectives[{i}]: {name!r} is measured after healing every trial; add heal: with trials: all"
            )
        if name in data[:i]:
            raise ConfigError(f"objectives[{i}]: {name!r} is listed twice")
    for i, start in enumerate(space.starts):
        if STARTS.get(start).measures and not {"perplexity", "accuracy"} & set(data):
            raise ConfigError(
                f"space.starts[{i}]: {start!r} measures the perplexity or accuracy objective; the study has neither"
            )
    return tuple(data)


def _check_proposer(sampler: SamplerConfig, space: AnySpace, objectives, calibration) -> None:
    """A sampler that proposes whole plans (``errormodel``) needs calibration data (the loss
    gradients that weigh its error model) and a loss to fit."""
    if not hasattr(sampler.unit.cls, "propose"):
        return
    if calibration is None:
        raise ConfigError(
            f"calibration: sampler {sampler.name} weighs each module's truncation error by the loss "
            "gradients of calibration data; add a calibration: section"
        )
    if not {"perplexity", "accuracy"} & set(objectives):
        raise ConfigError(f"sampler: {sampler.name} fits the perplexity or accuracy objective; the study has neither")


def _constraints(data, evaluation: EvalConfig) -> Constraints:
    data = mapping(data, "constraints", allowed=[f.name for f in dataclasses.fields(Constraints)])
    high = {"max_drop": 1, "max_params": 1, "max_perplexity": float("inf")}  # all from 0 (max_params above 0)
    values = {
        key: number(value, f"constraints.{key}", 0, high[key], open_low=key == "max_params")
        for key, value in data.items()
    }
    if "max_drop" in values and not evaluation.tasks:
        raise ConfigError("constraints.max_drop: needs evaluation.tasks")
    return Constraints(**values)


def _baselines(data, base: Path) -> Tuple[Baseline, ...]:
    if not isinstance(data, list):
        raise ConfigError(f"baselines: expected a list, got {data!r}")
    return tuple(parse_baseline(spec, f"baselines[{i}]", base) for i, spec in enumerate(data))


def _storage(url, base: Path) -> Optional[str]:
    if url is None:
        return None
    url = string(url, "storage")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{resolve_path(base, url[len('sqlite:///') :], 'storage')}"
    return url


def _device(device) -> str:
    device = string(device, "device")
    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise ConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}")
    return device


def _placement(data: Mapping[str, Any], base: Path) -> dict:
    """``device_map``, ``max_memory`` and ``offload_dir`` (the latter two only with a map)."""
    if data.get("device_map") is None:
        extra = next((k for k in ("max_memory", "offload_dir") if data.get(k) is not None), None)
        if extra:
            raise ConfigError(f"{extra}: only used with a device_map")
        return {}
    if "device" in data:
        raise ConfigError("device_map: the study also sets device; give one of them")
    out = {"device_map": parse_device_map(data["device_map"])}
    if data.get("max_memory") is not None:
        out["max_memory"] = parse_max_memory(data["max_memory"])
    if data.get("offload_dir") is not None:
        out["offload_dir"] = str(resolve_path(base, data["offload_dir"], "offload_dir"))
    return out


def _cache(data: Mapping[str, Any], base: Path) -> dict:
    """``cache_dir`` and ``cache_memory`` from ``cache: {memory, dir}``, or from ``cache_dir: PATH``
    (short for ``cache: {dir: PATH}``)."""
    if data.get("cache_dir") is not None and data.get("cache") is not None:
        raise ConfigError("cache_dir: the study also has a cache: block; write cache: {dir: ...} alone")
    if data.get("cache_dir") is not None:
        return {"cache_dir": str(resolve_path(base, data["cache_dir"], "cache_dir"))}
    cache = mapping(data.get("cache") or {}, "cache", allowed=("dir", "memory"))
    folder = None if cache.get("dir") is None else str(resolve_path(base, cache["dir"], "cache.dir"))
    return {"cache_dir": folder, "cache_memory": check_memory(cache.get("memory", StudyConfig.cache_memory))}


def _dtype(dtype) -> str:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def _multi_fidelity(data, evaluation: EvalConfig, objectives) -> Optional[MultiFidelity]:
    if data is None:
        return None
    data = mapping(data, "multi_fidelity", allowed=[f.name for f in dataclasses.fields(MultiFidelity)])
    first = number(data.get("first", MultiFidelity.first), "multi_fidelity.first", 0, 1, open_low=True, open_high=True)
    margin = number(data.get("margin", MultiFidelity.margin), "multi_fidelity.margin", 0, 1)
    if "accuracy" not in objectives or not evaluation.tasks:
        raise ConfigError("multi_fidelity: needs the accuracy objective and evaluation.tasks")
    return MultiFidelity(first, margin)
