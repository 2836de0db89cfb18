"""In-process evaluation of an in-memory model: lm-eval tasks, perplexity and decode speed.

``EvalConfig`` says what to measure. ``Evaluator`` is built once per study: it wraps the model in
lm-eval's ``HFLM`` (never reloading it), loads the tasks' datasets and tokenizes the perplexity
windows once. ``Evaluator.run()`` then measures the model as it is at that moment, so a caller can
``decompose_`` and ``restore_`` it in place between runs::

    evaluator = Evaluator(model, tokenizer, EvalConfig(tasks=["piqa"], limit=100, data_dir=BENCH))
    decompose_(model, plan)
    metrics = evaluator.run()   # {"acc/piqa": ..., "accuracy": ..., "eval_seconds": ...}
    restore_(model)
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from tqdm.auto import tqdm

from .config import check_keys
from .latency import prompt_ids, tokens_per_second
from .perplexity import TextSource, perplexity, token_windows
from .tasks import check_tasks, load_tasks

METRICS = ("acc", "acc_norm")


def _known_keys(cls, data, where: str) -> Dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    check_keys(data, {f.name for f in fields(cls)}, where)
    return dict(data)


def _check_int(where: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: must be an integer >= {minimum}, got {value!r}")


@dataclass
class PerplexityConfig:
    """Perplexity of ``text``: its first ``max_tokens`` tokens (all if None) in windows of ``window``."""

    text: TextSource
    window: int = 512
    max_tokens: Optional[int] = None
    batch_size: int = 4

    def __post_init__(self):
        where = "evaluation.perplexity"
        if isinstance(self.text, Mapping):
            self.text = TextSource.from_dict(self.text, f"{where}.text")
        if not isinstance(self.text, TextSource):
            raise ValueError(f"{where}.text: expected a mapping with path or dataset")
        if (self.text.path is None) == (self.text.dataset is None):
            raise ValueError(f"{where}.text: give exactly one of path and dataset")
        if self.text.path is not None and not Path(self.text.path).expanduser().is_file():
            raise ValueError(f"{where}.text.path: no such file {self.text.path!r}")
        _check_int(f"{where}.window", self.window, 2)
        if self.max_tokens is not None:
            _check_int(f"{where}.max_tokens", self.max_tokens, self.window)
        _check_int(f"{where}.batch_size", self.batch_size)


@dataclass
class EvalConfig:
    """What one evaluation measures.

    ``tasks``: lm-eval task names, each scored by ``metrics[task]`` (``acc`` or ``acc_norm``;
    default ``acc_norm`` where the task reports it, else ``acc``) on its first ``limit`` rows.
    ``data_dir``: a folder laid out like the shared ``benchmarks/``; tasks with a local copy there
    read it instead of the hub. ``max_length`` caps the context lm-eval gives the model.
    """

    tasks: List[str] = field(default_factory=lambda: ["hellaswag", "arc_easy", "piqa", "winogrande"])
    limit: Optional[int] = 100
    batch_size: int = 16
    data_dir: Optional[str] = None
    perplexity: Optional[PerplexityConfig] = None
    latency: bool = False
    metrics: Dict[str, str] = field(default_factory=dict)
    max_length: int = 2048

    def __post_init__(self):
        if not isinstance(self.tasks, (list, tuple)) or not all(isinstance(t, str) for t in self.tasks):
            raise ValueError(f"evaluation.tasks: expected a list of task names, got {self.tasks!r}")
        self.tasks = list(self.tasks)
        duplicate = next((t for i, t in enumerate(self.tasks) if t in self.tasks[:i]), None)
        if duplicate:
            raise ValueError(f"evaluation.tasks: {duplicate!r} is listed twice")
        if self.limit is not None:
            _check_int("evaluation.limit", self.limit)
        _check_int("evaluation.batch_size", self.batch_size)
        _check_int("evaluation.max_length", self.max_length)
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ValueError(f"evaluation.data_dir: no such folder {self.data_dir!r}")
        if isinstance(self.perplexity, Mapping):
            ppl = _known_keys(PerplexityConfig, self.perplexity, "evaluation.perplexity")
            if "text" not in ppl:
                raise ValueError("evaluation.perplexity.text: required (a mapping with path or dataset)")
            self.perplexity = PerplexityConfig(**ppl)
        if not isinstance(self.latency, bool):
            raise ValueError(f"evaluation.latency: expected true or false, got {self.latency!r}")
        if not isinstance(self.metrics, Mapping):
            raise ValueError(f"evaluation.metrics: expected a mapping of task -> metric, got {self.metrics!r}")
        self.metrics = dict(self.metrics)
        for task, metric in self.metrics.items():
            if task not in self.tasks:
                raise ValueError(f"evaluation.metrics.{task}: not one of evaluation.tasks")
            if metric not in METRICS:
                raise ValueError(f"evaluation.metrics.{task}: must be one of {', '.join(METRICS)}, got {metric!r}")
        if not self.tasks and self.perplexity is None and not self.latency:
            raise ValueError("evaluation: nothing to measure (no tasks, no perplexity, no latency)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalConfig":
        """From the ``evaluation:`` section of a study file (unknown keys are errors)."""
        return cls(**_known_keys(cls, data, "evaluation"))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def check_tasks(self) -> None:
        """Check task names against lm-eval and local copies against ``data_dir`` (a few seconds)."""
        check_tasks(self.tasks, self.data_dir)


def _chosen_metric(task_name: str, available, chosen: Optional[str]) -> str:
    if chosen is None:
        chosen = next((m for m in ("acc_norm", "acc") if m in available), None)
        if chosen is None:
            raise ValueError(f"evaluation.tasks: task {task_name!r} reports neither acc nor acc_norm "
                             f"(it reports {', '.join(available)})")
    if chosen not in available:
        raise ValueError(f"evaluation.metrics.{task_name}: the task reports {', '.join(available)}, not {chosen}")
    return chosen


@contextmanager
def _quiet(verbose: bool):
    """Silence lm-eval's logging and progress bars, and those of datasets, for the duration."""
    if verbose:
        yield
        return
    import datasets
    import lm_eval.api.task

    logger = logging.getLogger("lm_eval")
    level, bars, task_tqdm = logger.level, datasets.is_progress_bar_enabled(), lm_eval.api.task.tqdm
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    lm_eval.api.task.tqdm = partial(tqdm, disable=True)  # its per-task "building requests" bar
    try:
        yield
    finally:
        logger.setLevel(level)
        lm_eval.api.task.tqdm = task_tqdm
        if bars:
            datasets.enable_progress_bars()


def _lm(model, tokenizer, config: EvalConfig, verbose: bool):
    """lm-eval's ``HFLM`` over the in-memory model; its per-request progress bars only if ``verbose``."""
    from lm_eval.models.huggingface import HFLM

    class InMemoryLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = not verbose):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = not verbose):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = not verbose):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    return InMemoryLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size,
                      max_length=config.max_length)


class EarlyStop(Exception):
    """A multi-fidelity evaluation stopped after its first stage: ``reason`` and the ``metrics`` so far."""

    def __init__(self, reason: str, metrics: Dict[str, float]):
        super().__init__(reason)
        self.reason, self.metrics = reason, metrics


class Evaluator:
    """Measures one in-memory model, as it is at each ``run()``, under one ``EvalConfig``."""

    def __init__(self, model, tokenizer, config: EvalConfig, *, verbose: bool = False):
        self.model, self.config, self.verbose = model, config, verbose
        self.timings: Dict[str, float] = {}  # seconds per metric of the last run
        with _quiet(verbose):
            self.tasks = load_tasks(config.tasks, config.data_dir)
            self.metrics = {name: _chosen_metric(name, list(task.aggregation()), config.metrics.get(name))
                            for name, task in self.tasks.items()}
            self.lm = _lm(model, tokenizer, config, verbose) if self.tasks else None
        ppl = config.perplexity
        self.windows = token_windows(tokenizer, ppl.text.read(), ppl.window, ppl.max_tokens) if ppl else None
        self.prompt = prompt_ids(tokenizer) if config.latency else None

    def n_docs(self, name: str) -> int:
        """Rows of task ``name`` an evaluation scores: its first ``limit`` (or all)."""
        n = len(self.tasks[name].eval_docs)
        return n if self.config.limit is None else min(n, self.config.limit)

    def _accuracy(self, name: str, docs: Optional[range] = None) -> float:
        """Accuracy on the first ``limit`` rows, or on rows ``docs``."""
        from lm_eval.evaluator import evaluate

        task_dict = {"tasks": {name: self.tasks[name]}, "groups": {}, "group_map": {}}
        rows = dict(limit=self.config.limit) if docs is None else dict(samples={name: list(docs)})
        result = evaluate(self.lm, task_dict, bootstrap_iters=0, log_samples=False, **rows)
        return float(result["results"][name][f"{self.metrics[name]},none"])

    def _two_stage_accuracy(self, name: str, first: int, head: float) -> float:
        """Accuracy on rows ``[0, limit)`` measured as ``[first, limit)`` after ``[0, first)`` (whose
        accuracy is ``head``): the mean over rows, weighted by their counts."""
        n = self.n_docs(name)
        return head if first >= n else (head * first + self._accuracy(name, range(first, n)) * (n - first)) / n

    def run(self, progress: bool = True, *, first: Optional[float] = None,
            early_stop: Optional[Callable[[Dict[str, float]], Optional[str]]] = None) -> Dict[str, float]:
        """Flat metrics of the model now: ``acc/<task>``, ``accuracy`` (their mean), ``perplexity``,
        ``latency_tokens_per_s`` (each only if configured) and ``eval_seconds``.

        Multi-fidelity: with ``first`` (a fraction), every task is scored on its first ``first``
        share of rows, ``early_stop`` sees those metrics (``acc/<task>``, ``accuracy``) and may return
        a reason to stop, raising :class:`EarlyStop`; otherwise the other rows are scored and
        combined, so the result equals a one-stage run's. ``self.timings`` then holds the seconds
        each measure took.
        """
        head: Dict[str, float] = {}
        start = time.perf_counter()
        heads = {}
        if first is not None and self.tasks:
            heads = {name: max(1, math.ceil(first * self.n_docs(name))) for name in self.tasks}
            with _quiet(self.verbose):
                for name, k in heads.items():
                    head[f"acc/{name}"] = self._accuracy(name, range(k))
            head["accuracy"] = statistics.fmean(head[f"acc/{n}"] for n in self.tasks)
            reason = early_stop(dict(head)) if early_stop else None
            if reason:
                raise EarlyStop(reason, {**head, "eval_seconds": time.perf_counter() - start})
        measures = [(f"acc/{name}", partial(self._two_stage_accuracy, name, heads[name], head[f"acc/{name}"]) if heads
                     else partial(self._accuracy, name)) for name in self.tasks]
        if self.windows is not None:
            batch = self.config.perplexity.batch_size
            measures.append(("perplexity", partial(perplexity, self.model, self.windows, batch)))
        if self.prompt is not None:
            measures.append(("latency_tokens_per_s", partial(tokens_per_second, self.model, self.prompt)))
        out: Dict[str, float] = {}
        self.timings = {}
        with _quiet(self.verbose), tqdm(measures, desc="evaluate", disable=not progress, leave=False) as bar:
            for key, measure in bar:
                bar.set_postfix_str(key)
                t = time.perf_counter()
                out[key] = measure()
                self.timings[key] = time.perf_counter() - t
        if self.tasks:
            out["accuracy"] = statistics.fmean(out[f"acc/{name}"] for name in self.tasks)
        out["eval_seconds"] = time.perf_counter() - start
        return out
