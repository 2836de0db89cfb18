"""Rank configs: a front trial's plan exported as versioned JSON, read back and checked against a model.

A rank config names the model it was found for (id as given to :func:`dse.load_model`, its
fingerprint and dtype), holds the plan (method, options, module -> rank) and the trial's measured
sizes and metrics, and says which study and trial it came from. :func:`select_trial` picks one
config of a study's feasible front by a rule; :func:`load_config_file` refuses a file written for
another model, and a truncated or foreign file, with a one-line error naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import __version__
from .io import atomic_dir
from .plan import Plan, PlanError
from .results import ResultsError, front_trials, quality_key, require_completed
from .worker import TRIAL_ONLY

CONFIG_FORMAT = 1
class ExportError(ValueError):
    """A rank config that cannot be written, read or used; the message names the field."""


@dataclass
class RankConfig:
    model: str
    fingerprint: str
    dtype: str
    plan: Plan
    metrics: Dict[str, Any] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)  # study, trial number, baseline label, tasks
    dse_version: str = __version__
    calibration: Optional[Dict[str, Any]] = None  # the study's CalibrationSpec as plain data

    def to_dict(self) -> Dict[str, Any]:
        out = {"format": CONFIG_FORMAT, "dse_version": self.dse_version,
               "model": {"id": self.model, "fingerprint": self.fingerprint, "dtype": self.dtype},
               "plan": self.plan.to_dict(), "metrics": dict(self.metrics), "source": dict(self.source)}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> "RankConfig":
        if not isinstance(data, dict):
            raise ExportError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != CONFIG_FORMAT:
            raise ExportError(f"{where}.format: {data.get('format')!r} is not a dse rank config format "
                              f"(this dse reads {CONFIG_FORMAT})")
        model = data.get("model")
        for key in ("id", "fingerprint", "dtype"):
            if not isinstance(model, dict) or not isinstance(model.get(key), str):
                raise ExportError(f"{where}.model.{key}: required (a string)")
        try:
            plan = Plan.from_dict(data.get("plan"))
        except PlanError as e:
            raise ExportError(f"{where}.{e}") from None
        calibration = data.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise ExportError(f"{where}.calibration: expected an object (a calibration spec)")
        return cls(model["id"], model["fingerprint"], model["dtype"], plan, dict(data.get("metrics") or {}),
                   dict(data.get("source") or {}), str(data.get("dse_version", "?")), calibration)

    def save(self, path) -> Path:
        from .io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    def check(self, model, where: str = "config") -> None:
        """Refuse ``model`` unless it is the one this config was found for and the plan fits it."""
        from .arch import find_projections
        from .cache import model_fingerprint

        table = find_projections(model)
        fingerprint = model_fingerprint(model, table)
        if fingerprint != self.fingerprint:
            raise ExportError(f"{where}.model.fingerprint: the config was exported for model {self.model!r} "
                              f"({self.dtype}, fingerprint {self.fingerprint}); this model's fingerprint is "
                              f"{fingerprint}")
        try:
            self.plan.validate(table)
        except PlanError as e:
            raise ExportError(f"{where}.{e}") from None


def rank_config(study, trial) -> RankConfig:
    """The rank config of ``trial`` (a FrozenTrial of ``study``)."""
    meta = study.user_attrs.get("dse") or {}
    missing = [k for k in ("model", "fingerprint") if k not in meta]
    if missing:
        raise ResultsError(f"study {study.study_name!r}: metadata lacks {missing[0]!r} (was it run by `dse run`?)")
    attrs = trial.user_attrs
    if "plan" not in attrs:
        raise ResultsError(f"trial {trial.number}: no plan recorded")
    return RankConfig(
        meta["model"], meta["fingerprint"], meta.get("dtype", "float32"), Plan.from_dict(attrs["plan"]),
        {k: v for k, v in attrs.items() if k not in TRIAL_ONLY},
        {"study": study.study_name, "trial": trial.number, "baseline": attrs.get("baseline"),
         "objectives": meta.get("objectives"), "tasks": meta.get("tasks"), "limit": meta.get("limit")},
        calibration=meta.get("calibration"))


def select_trial(study, *, max_params: Optional[float] = None, min_accuracy: Optional[float] = None,
                 max_drop: Optional[float] = None):
    """One trial of the feasible front, by rule.

    Keep the front configs with ``params_ratio <= max_params``, ``accuracy >= min_accuracy`` and
    ``accuracy >= baseline accuracy - max_drop`` (each rule only when given). With an accuracy rule
    the smallest of those is chosen; with only ``max_params``, the best on the study's quality
    objective (highest accuracy, else lowest perplexity or latency). A single-objective study
    (e.g. over an allocation space, where every plan has the same size) needs no rule: its best
    trial is chosen.
    """
    no_rule = max_params is None and min_accuracy is None and max_drop is None
    if no_rule and len(study.directions) > 1:
        raise ExportError("export: no rule given for a study of several objectives: set max_params, "
                          "min_accuracy or max_drop (--max-params, --min-accuracy, --max-drop), or export the "
                          "whole front (--front)")
    require_completed(study)
    front = front_trials(study)
    if not front:
        raise ResultsError(f"study {study.study_name!r}: no feasible completed trial (all violate the constraints)")
    if no_rule:
        return front[0]
    floor = min_accuracy
    if max_drop is not None:
        base = (study.user_attrs.get("baseline") or {}).get("accuracy")
        if base is None:
            raise ExportError("max_drop: the study has no baseline accuracy")
        floor = max(floor if floor is not None else -1.0, base - max_drop)
    if floor is not None and any("accuracy" not in t.user_attrs for t in front):
        raise ExportError("min_accuracy: the study does not measure accuracy (no evaluation tasks)")
    chosen = [t for t in front if (max_params is None or t.user_attrs["params_ratio"] <= max_params)
              and (floor is None or t.user_attrs["accuracy"] >= floor)]
    if not chosen:
        ratios = [t.user_attrs["params_ratio"] for t in front]
        acc = [t.user_attrs.get("accuracy", float("nan")) for t in front]
        rule = " and ".join(([f"params_ratio <= {max_params:g}"] if max_params is not None else [])
                            + ([f"accuracy >= {floor:.4g}"] if floor is not None else []))
        raise ExportError(f"export: no front config has {rule}; the front spans params_ratio "
                          f"{min(ratios):.3f}..{max(ratios):.3f}, accuracy {min(acc):.3f}..{max(acc):.3f}")
    if floor is not None:
        return min(chosen, key=lambda t: (t.user_attrs["params_ratio"], -t.user_attrs["accuracy"]))
    key, maximize = quality_key(study)
    return min(chosen, key=lambda t: (-t.user_attrs[key] if maximize else t.user_attrs[key],
                                      t.user_attrs["params_ratio"]))


def export_front(study, out_dir) -> List[Path]:
    """Every feasible front config as ``out_dir/trial-<number>.json``, written all or nothing."""
    require_completed(study)
    front = front_trials(study)
    if not front:
        raise ResultsError(f"study {study.study_name!r}: no feasible completed trial (all violate the constraints)")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for trial in front:
            rank_config(study, trial).save(tmp / f"trial-{trial.number:04d}.json")
    return [out_dir / f"trial-{t.number:04d}.json" for t in front]


def load_config_file(path, model=None) -> RankConfig:
    """Read a rank config; with ``model``, also check it is that model's (fingerprint, plan)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"config: {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          "truncated, or not written by `dse export`?") from None
    config = RankConfig.from_dict(data, "config")
    if model is not None:
        config.check(model)
    return config
