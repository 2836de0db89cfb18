"""What an evaluation measures: :class:`EvalConfig` (tasks, perplexity, latency, encoder measures)
and its parts.

Built from the ``evaluation:`` section of a study (:meth:`EvalConfig.from_dict`) or in code; every
bad value is a one-line :class:`~dse.core.errors.ConfigError` naming its ``evaluation.`` field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..core.errors import ConfigError
from ..core.validate import boolean, byte_size, integer, mapping, resolve_path
from ..model import TextSource, text_section
from .encoder import TextSet

METRICS = ("acc", "acc_norm")
ENGINES = ("fast", "hflm")  # the lm-eval models of dse.evaluate.engine


@dataclass
class PerplexityConfig:
    """Perplexity of ``text``: its first ``max_tokens`` tokens (all if None) in windows of ``window``."""

    text: TextSource
    window: int = 512
    max_tokens: Optional[int] = None
    batch_size: int = 4

    def __post_init__(self):
        where = "evaluation.perplexity"
        if not isinstance(self.text, TextSource):
            raise ConfigError(f"{where}.text: expected a mapping with path or dataset")
        integer(self.window, f"{where}.window", 2)
        if self.max_tokens is not None:
            integer(self.max_tokens, f"{where}.max_tokens", self.window)
        integer(self.batch_size, f"{where}.batch_size", 1)

    @classmethod
    def from_dict(cls, data, base: Optional[Path] = None) -> "PerplexityConfig":
        return cls(**text_section(data, "evaluation.perplexity", {f.name for f in fields(cls)}, base))


@dataclass
class EvalConfig:
    """What one evaluation measures.

    ``tasks``: lm-eval task names, each scored by ``metrics[task]`` (``acc`` or ``acc_norm``;
    default ``acc_norm`` where the task reports it, else ``acc``) on its first ``limit`` rows.
    ``data_dir``: a folder of local copies of the tasks' datasets (see :mod:`dse.evaluate.tasks`);
    tasks with a copy there read it instead of the hub. ``include_path``: a folder of the user's
    lm-eval task YAMLs, whose tasks ``tasks`` may name. A group or tag in ``tasks``
    stands for its tasks. ``max_length`` caps the context lm-eval gives the model. ``engine``
    scores the tasks: ``fast`` (each context run once, the head only where a score is read) or
    ``hflm`` (lm-eval's plain ``HFLM``); both give the same loglikelihoods (:mod:`dse.evaluate.engine`).
    ``similarity`` and ``pseudo_perplexity`` (:class:`~dse.evaluate.encoder.TextSet`) are the encoder
    measures (:mod:`dse.evaluate.encoder`); a study section that names one and no ``tasks`` has none.
    ``reuse_prefix`` starts each perplexity batch and each ``fast`` engine batch at the model's
    first changed layer, from the hidden states the first run gave there (:mod:`dse.evaluate.prefix`),
    keeping at most ``prefix_memory`` of them (bytes or a size such as ``2GB``): ``auto`` where
    the model is a causal LM of a known family, ``true`` or a one-line error, ``false`` never.
    """

    tasks: List[str] = field(default_factory=lambda: ["hellaswag", "arc_easy", "piqa", "winogrande"])
    limit: Optional[int] = 100
    batch_size: int = 16
    data_dir: Optional[str] = None
    include_path: Optional[str] = None
    perplexity: Optional[PerplexityConfig] = None
    similarity: Optional[TextSet] = None
    pseudo_perplexity: Optional[TextSet] = None
    latency: bool = False
    metrics: Dict[str, str] = field(default_factory=dict)
    max_length: int = 2048
    engine: str = "fast"
    reuse_prefix: Any = "auto"
    prefix_memory: Any = "2GB"

    def __post_init__(self):
        if not isinstance(self.tasks, (list, tuple)) or not all(isinstance(t, str) for t in self.tasks):
            raise ConfigError(f"evaluation.tasks: expected a list of task names, got {self.tasks!r}")
        self.tasks = list(self.tasks)
        duplicate = next((t for i, t in enumerate(self.tasks) if t in self.tasks[:i]), None)
        if duplicate:
            raise ConfigError(f"evaluation.tasks: {duplicate!r} is listed twice")
        if self.limit is not None:
            integer(self.limit, "evaluation.limit", 1)
        integer(self.batch_size, "evaluation.batch_size", 1)
        integer(self.max_length, "evaluation.max_length", 1)
        if self.engine not in ENGINES:
            raise ConfigError(f"evaluation.engine: must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not (isinstance(self.reuse_prefix, bool) or self.reuse_prefix == "auto"):
            raise ConfigError(f"evaluation.reuse_prefix: must be true, false or auto, got {self.reuse_prefix!r}")
        byte_size(self.prefix_memory, "evaluation.prefix_memory")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ConfigError(f"evaluation.data_dir: no such folder {self.data_dir!r}")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise ConfigError(f"evaluation.include_path: no such folder {self.include_path!r} (a folder of task YAMLs)")
        for key in ("similarity", "pseudo_perplexity"):
            value = getattr(self, key)
            if isinstance(value, Mapping):
                setattr(self, key, value := TextSet.from_dict(value, f"evaluation.{key}"))
            if value is not None and not isinstance(value, TextSet):
                raise ConfigError(f"evaluation.{key}: expected a mapping with text, got {value!r}")
        if isinstance(self.perplexity, Mapping):
            self.perplexity = PerplexityConfig.from_dict(self.perplexity)
        if self.perplexity is not None and not isinstance(self.perplexity, PerplexityConfig):
            raise ConfigError(f"evaluation.perplexity: expected a mapping, got {self.perplexity!r}")
        boolean(self.latency, "evaluation.latency")
        self.metrics = mapping(self.metrics, "evaluation.metrics")
        for task, metric in self.metrics.items():
            if task not in self.tasks:
                raise ConfigError(f"evaluation.metrics.{task}: not one of evaluation.tasks")
            if metric not in METRICS:
                raise ConfigError(f"evaluation.metrics.{task}: must be one of {', '.join(METRICS)}, got {metric!r}")
        if not (self.tasks or self.perplexity or self.latency or self.similarity or self.pseudo_perplexity):
            raise ConfigError(
                "evaluation: nothing to measure (no tasks, perplexity, latency, similarity or pseudo_perplexity)"
            )

    @property
    def prefix_bytes(self) -> int:
        """``prefix_memory`` in bytes."""
        return byte_size(self.prefix_memory, "evaluation.prefix_memory")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Optional[Path] = None) -> "EvalConfig":
        """From the ``evaluation:`` section of a study file (unknown keys are errors); ``base``
        anchors relative paths (the study file's folder)."""
        data = mapping(data, "evaluation", allowed={f.name for f in fields(cls)})
        for key in ("data_dir", "include_path"):
            if data.get(key) is not None:
                data[key] = str(resolve_path(base, data[key], f"evaluation.{key}"))
        if isinstance(data.get("perplexity"), Mapping):
            data["perplexity"] = PerplexityConfig.from_dict(data["perplexity"], base)
        for key in ("similarity", "pseudo_perplexity"):
            if isinstance(data.get(key), Mapping):
                data[key] = TextSet.from_dict(data[key], f"evaluation.{key}", base)
        if "tasks" not in data and (data.get("similarity") or data.get("pseudo_perplexity")):
            data["tasks"] = []  # an encoder evaluation: lm-eval's tasks need a causal LM
        return cls(**data)

    def check_tasks(self) -> List[str]:
        """Check task names against lm-eval (groups expanded) and that each task's dataset can be
        read: its local copy in ``data_dir``, else loaded once now. Returns the tasks."""
        from .tasks import check_tasks

        return check_tasks(self.tasks, self.data_dir, self.include_path)
