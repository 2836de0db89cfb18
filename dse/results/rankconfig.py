"""Rank configs: a plan exported as versioned JSON for the model it was found for.

A rank config names the model (id as given to :func:`dse.load_model`, its fingerprint, dtype
and architecture family), holds the plan (method, options, module -> rank), the measured sizes and metrics of the
trial it came from, and that trial's study. :func:`load_config_file` refuses a truncated or
foreign file with a one-line error naming the field, and :meth:`RankConfig.check` a model other
than the one the config was found for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from .. import __version__
from ..core.errors import ExportError, PlanError
from ..core.io import atomic_write_text
from ..core.validate import read_json
from ..decompose import Plan
from ..model import FAMILIES, find_projections

CONFIG_FORMAT = 1


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
    family: Optional[str] = None  # the family the plan's module names come from (None: the one recognised)

    def to_dict(self) -> Dict[str, Any]:
        model = {"id": self.model, "fingerprint": self.fingerprint, "dtype": self.dtype}
        if self.family is not None:
            model["family"] = self.family
        out = {
            "format": CONFIG_FORMAT,
            "dse_version": self.dse_version,
            "model": model,
            "plan": self.plan.to_dict(),
            "metrics": dict(self.metrics),
            "source": dict(self.source),
        }
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> "RankConfig":
        if not isinstance(data, dict):
            raise ExportError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != CONFIG_FORMAT:
            raise ExportError(
                f"{where}.format: {data.get('format')!r} is not a dse rank config format "
                f"(this dse reads {CONFIG_FORMAT})"
            )
        model = data.get("model")
        for key in ("id", "fingerprint", "dtype"):
            if not isinstance(model, dict) or not isinstance(model.get(key), str):
                raise ExportError(f"{where}.model.{key}: required (a string)")
        family = model.get("family")
        if family is not None:
            FAMILIES.get(family, f"{where}.model.family", ExportError)
        try:
            plan = Plan.from_dict(data.get("plan"))
        except PlanError as e:
            raise ExportError(f"{where}.{e}") from None
        calibration = data.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise ExportError(f"{where}.calibration: expected an object (a calibration spec)")
        return cls(
            model["id"],
            model["fingerprint"],
            model["dtype"],
            plan,
            dict(data.get("metrics") or {}),
            dict(data.get("source") or {}),
            str(data.get("dse_version", "?")),
            calibration,
            family,
        )

    def save(self, path) -> Path:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    def check(self, model, where: str = "config") -> None:
        """Refuse ``model`` unless it is the one this config was found for and the plan fits it."""
        from ..decompose import model_fingerprint

        table = find_projections(model, self.family)
        fingerprint = model_fingerprint(model, table)
        if fingerprint != self.fingerprint:
            raise ExportError(
                f"{where}.model.fingerprint: the config was exported for model {self.model!r} "
                f"({self.dtype}, fingerprint {self.fingerprint}); this model's fingerprint is "
                f"{fingerprint}"
            )
        try:
            self.plan.validate(table)
        except PlanError as e:
            raise ExportError(f"{where}.{e}") from None


def load_config_file(path, model=None) -> RankConfig:
    """Read a rank config; with ``model``, also check it is that model's (fingerprint, plan)."""
    data = read_json(path, "config", ExportError, "; truncated, or not written by `dse export`?")
    config = RankConfig.from_dict(data, "config")
    if model is not None:
        config.check(model)
    return config
