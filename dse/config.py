"""Study configuration: the YAML a user writes under ``studies/``, validated into dataclasses.

Every error is one line naming the field (``study.sampler: unknown 'tpee'; choose one of ...``).
Relative paths (space file, data directory, text files, storage file) resolve against the
study file's folder, so a study runs the same from any working directory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

from .methods import make_config

# objective name -> (optuna direction, trial attribute it reads)
OBJECTIVES = {
    "accuracy": ("maximize", "accuracy"),
    "params": ("minimize", "params_ratio"),
    "perplexity": ("minimize", "perplexity"),
    "latency": ("minimize", "latency_ms_per_token"),
}
SAMPLERS = ("tpe", "nsga2", "gp", "random")


class ConfigError(ValueError):
    """A bad study or space file; the message names the field."""


def read_yaml(path, what: str, error: type = ConfigError) -> Dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad syntax or a non-mapping raise ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{what}: YAML syntax error{where} in {path}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def check_keys(data: Mapping, allowed, where: str, error: type = ConfigError) -> None:
    """Raise ``error`` naming the first key of ``data`` that is not in ``allowed``."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise error(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})")


def typed(data: Mapping, key: str, kind, where: str, default=None, *, positive=False):
    """``data[key]`` checked against ``kind`` (a type or tuple), or ``default`` when absent/None."""
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{where}.{key}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {_kind_name(kind)}, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where}.{key}: must be > 0, got {value!r}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false",
                        "list": "a list", "dict": "a mapping"}.get(k.__name__, k.__name__) for k in kinds)


@dataclass(frozen=True)
class Constraints:
    """Feasibility limits: ``max_drop`` in accuracy points (fraction, 0.10 = 10 points) below the
    undecomposed baseline, ``max_params`` as a fraction of the model's parameters."""

    max_drop: Optional[float] = None
    max_params: Optional[float] = None
    max_perplexity: Optional[float] = None

    def violations(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> List[float]:
        """Optuna's convention: one value per constraint, feasible when <= 0."""
        out = []
        if self.max_drop is not None:
            out.append((baseline["accuracy"] - self.max_drop) - metrics["accuracy"])
        if self.max_params is not None:
            out.append(metrics["params_ratio"] - self.max_params)
        if self.max_perplexity is not None:
            out.append(metrics["perplexity"] - self.max_perplexity)
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


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: Optional[Path]  # the YAML file, or None for a config built in code
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "float32"
    space: Any = None  # dse.space.Space or dse.allocation.AllocationSpace
    method: str = "svd"
    method_options: Dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # dse.calibration.CalibrationSpec or None
    evaluation: Any = None  # dse.evaluate.EvalConfig
    objectives: tuple = ("accuracy", "params")
    sampler: str = "tpe"
    seed: int = 0
    n_trials: int = 20
    timeout: Optional[float] = None
    storage: Optional[str] = None
    constraints: Constraints = Constraints()
    baselines: tuple = ()
    cache_dir: Optional[str] = None
    heartbeat_s: int = 30  # RDB storage: a worker's liveness signal
    grace_s: int = 120  # a RUNNING trial silent this long is failed and re-queued once
    multi_fidelity: Optional[MultiFidelity] = None

    @property
    def directions(self) -> List[str]:
        return [OBJECTIVES[o][0] for o in self.objectives]

    @property
    def storage_url(self) -> str:
        """The storage URL; by default a SQLite file beside the study file."""
        if self.storage:
            return self.storage
        folder = self.path.parent if self.path else Path.cwd()
        return f"sqlite:///{(folder / 'runs' / f'{self.name}.db').resolve()}"


STUDY_KEYS = {f.name for f in dataclasses.fields(StudyConfig)} - {"path"}


def load_study_config(path) -> StudyConfig:
    path = Path(path).resolve()
    return study_config_from_dict(read_yaml(path, "study"), path)


def study_config_from_dict(data: Mapping[str, Any], path: Optional[Path] = None) -> StudyConfig:
    """Validate a study mapping; ``path`` (the YAML file) anchors relative paths."""
    from .evaluate import EvalConfig
    from .space import load_space, space_from_dict

    where = "study"
    base = path.parent if path else Path.cwd()
    check_keys(data, STUDY_KEYS, where)
    name = typed(data, "name", str, where, default=path.stem if path else None)
    if not name:
        raise ConfigError("study.name: required")

    space = data.get("space")
    if isinstance(space, str):
        space = load_space(_resolve(base, space))
    elif isinstance(space, Mapping):
        space = space_from_dict(space)
    else:
        raise ConfigError("study.space: expected a path to a space YAML or an inline mapping")

    method = typed(data, "method", str, where, default="svd")
    method_options = typed(data, "method_options", dict, where, default={})
    try:
        method_config = make_config(method, method_options)
    except ValueError as e:
        raise ConfigError(f"study.{e}") from None

    calibration = data.get("calibration")
    if calibration is not None:
        calibration = _calibration_spec(calibration, base)
    if method_config.needs_calibration and calibration is None:
        raise ConfigError(f"study.calibration: method {method} needs calibration data; add a calibration: section")
    if space.needs_importance and calibration is None:
        raise ConfigError("study.calibration: an allocation space (budget:) needs calibration data (its "
                          "loss gradients rank the components); add a calibration: section")

    evaluation = typed(data, "evaluation", dict, where, default={})
    evaluation = dict(evaluation)
    if evaluation.get("data_dir"):
        evaluation["data_dir"] = str(_resolve(base, str(evaluation["data_dir"])))
    if isinstance(evaluation.get("perplexity"), Mapping):
        from .perplexity import TextSource

        ppl = dict(evaluation["perplexity"])
        ppl["text"] = TextSource.from_dict(ppl.get("text"), "evaluation.perplexity.text", base)
        evaluation["perplexity"] = ppl
    evaluation = EvalConfig.from_dict(evaluation)

    objectives = data.get("objectives", ["accuracy", "params"])
    if not isinstance(objectives, list) or not objectives:
        raise ConfigError("study.objectives: expected a non-empty list")
    for i, o in enumerate(objectives):
        if o not in OBJECTIVES:
            raise ConfigError(f"study.objectives[{i}]: unknown {o!r}; choose from {', '.join(OBJECTIVES)}")
    if len(set(objectives)) != len(objectives):
        raise ConfigError("study.objectives: listed twice")
    if "accuracy" in objectives and not evaluation.tasks:
        raise ConfigError("study.objectives: 'accuracy' needs evaluation.tasks")
    if "perplexity" in objectives and evaluation.perplexity is None:
        raise ConfigError("study.objectives: 'perplexity' needs evaluation.perplexity")
    if "sensitivity" in getattr(space, "starts", ()) and not {"perplexity", "accuracy"} & set(objectives):
        raise ConfigError("space.starts: 'sensitivity' measures the perplexity or accuracy objective; "
                          "the study has neither")
    if "latency" in objectives and not evaluation.latency:
        raise ConfigError("study.objectives: 'latency' needs evaluation.latency: true")

    sampler = typed(data, "sampler", str, where, default="tpe")
    if sampler not in SAMPLERS:
        raise ConfigError(f"study.sampler: unknown {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    timeout = typed(data, "timeout", (int, float), where, positive=True)

    cons = typed(data, "constraints", dict, where, default={})
    check_keys(cons, {f.name for f in dataclasses.fields(Constraints)}, "study.constraints")
    constraints = Constraints(**{k: float(typed(cons, k, (int, float), "study.constraints")) for k in cons})
    if constraints.max_params is not None and not 0 < constraints.max_params <= 1:
        raise ConfigError(f"study.constraints.max_params: a fraction in (0, 1], got {constraints.max_params}")
    if constraints.max_drop is not None and not 0 <= constraints.max_drop <= 1:
        raise ConfigError(f"study.constraints.max_drop: a fraction in [0, 1] (0.1 = 10 points), got {constraints.max_drop}")
    if constraints.max_drop is not None and not evaluation.tasks:
        raise ConfigError("study.constraints.max_drop: needs evaluation.tasks")

    from .baselines import parse_baseline

    baselines = list(typed(data, "baselines", list, where, default=[]))  # a copy: the caller's data stays as given
    for i, b in enumerate(baselines):
        kind, value = parse_baseline(b, f"study.baselines[{i}]", base)
        if kind == "sensitivity":  # the file's path, resolved against the study's folder
            baselines[i] = {**b, "characterization": value["characterization"]}

    storage = typed(data, "storage", str, where)
    if storage is not None and storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        storage = f"sqlite:///{_resolve(base, storage[len('sqlite:///'):])}"
    cache_dir = typed(data, "cache_dir", str, where)
    device = typed(data, "device", str, where, default="cpu")
    dtype = typed(data, "dtype", str, where, default="float32")
    from .models import DTYPES

    if dtype not in DTYPES:
        raise ConfigError(f"study.dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise ConfigError(f"study.device: expected cpu, cuda, cuda:N or auto, got {device!r}")

    multi_fidelity = _multi_fidelity(data.get("multi_fidelity"), evaluation, objectives)

    return StudyConfig(
        name=name, path=path, model=typed(data, "model", str, where, default="smollm2-135m"),
        device=device, dtype=dtype, space=space, method=method, method_options=method_options,
        calibration=calibration, evaluation=evaluation, objectives=tuple(objectives), sampler=sampler,
        seed=typed(data, "seed", int, where, default=0),
        n_trials=typed(data, "n_trials", int, where, default=20, positive=True), timeout=timeout,
        storage=storage, constraints=constraints, baselines=tuple(baselines),
        cache_dir=str(_resolve(base, cache_dir)) if cache_dir else None,
        heartbeat_s=typed(data, "heartbeat_s", int, where, default=30, positive=True),
        grace_s=typed(data, "grace_s", int, where, default=120, positive=True), multi_fidelity=multi_fidelity)


def _multi_fidelity(data, evaluation, objectives) -> Optional[MultiFidelity]:
    where = "study.multi_fidelity"
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping {{first: F, margin: M}}, got {data!r}")
    check_keys(data, [f.name for f in dataclasses.fields(MultiFidelity)], where)
    first, margin = data.get("first", 0.25), data.get("margin", 0.05)
    if isinstance(first, bool) or not isinstance(first, (int, float)) or not 0 < first < 1:
        raise ConfigError(f"{where}.first: the share of each task's rows scored first, in (0, 1), got {first!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 1:
        raise ConfigError(f"{where}.margin: accuracy points as a fraction in [0, 1], got {margin!r}")
    if "accuracy" not in objectives or not evaluation.tasks:
        raise ConfigError(f"{where}: needs the accuracy objective and evaluation.tasks")
    return MultiFidelity(float(first), float(margin))


def _calibration_spec(data, base: Path):
    from .calibration import CalibrationSpec

    try:
        return CalibrationSpec.from_dict(data, base)
    except ValueError as e:
        raise ConfigError(f"study.{e}") from None


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
