"""In-process evaluation of an in-memory model: lm-eval tasks, perplexity, decode speed, and for
encoders embedding similarity to the dense model and pseudo-perplexity.

:class:`Evaluator` is built once per study from an :class:`~dse.evaluate.EvalConfig`: it wraps the
model in an lm-eval model (``evaluation.engine``, :mod:`dse.evaluate.engine`; never reloading
it), loads the tasks' datasets and tokenizes the perplexity windows once. :meth:`Evaluator.run`
then measures the model as it is at that moment, so a caller can ``decompose_`` and ``restore_``
it in place between runs::

    evaluator = Evaluator(model, tokenizer, EvalConfig(tasks=["piqa"], limit=100, data_dir=BENCH))
    decompose_(model, plan)
    metrics = evaluator.run()   # {"acc/piqa": ..., "accuracy": ..., "eval_seconds": ...}
    restore_(model)
"""

from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager
from functools import partial
from typing import Callable, Dict, Optional

from tqdm.auto import tqdm

from ..core.errors import ConfigError
from ..model import is_causal_lm, is_masked_lm, token_windows
from .config import EvalConfig
from .encoder import embedding_similarity, pseudo_perplexity, sentence_embeddings
from .latency import prompt_ids, tokens_per_second
from .perplexity import perplexity
from .tasks import load_tasks


def _chosen_metric(task_name: str, available, chosen: Optional[str]) -> str:
    if chosen is None:
        chosen = next((m for m in ("acc_norm", "acc") if m in available), None)
        if chosen is None:
            raise ConfigError(
                f"evaluation.tasks: task {task_name!r} reports neither acc nor acc_norm "
                f"(it reports {', '.join(available)})"
            )
    if chosen not in available:
        raise ConfigError(f"evaluation.metrics.{task_name}: the task reports {', '.join(available)}, not {chosen}")
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


def _lm(model, tokenizer, config: EvalConfig, verbose: bool, prefix):
    """The lm-eval model ``evaluation.engine`` names over the in-memory model (:mod:`dse.evaluate.engine`)."""
    from .engine import InMemoryLM, SharedContextLM

    kind = SharedContextLM if config.engine == "fast" else InMemoryLM
    lm = kind(model, tokenizer, batch_size=config.batch_size, max_length=config.max_length, verbose=verbose)
    if kind is SharedContextLM:
        lm.prefix = prefix
    return lm


def _prefix_store(model, config: EvalConfig):
    """The :class:`~dse.evaluate.prefix.PrefixStore` of ``evaluation.reuse_prefix``, or None (off,
    or ``auto`` where it cannot apply); ``true`` where it cannot apply is a one-line error."""
    if config.reuse_prefix is False:
        return None
    from .prefix import PrefixStore

    if not is_causal_lm(model):
        why = f"the model is not a causal LM ({type(model).__name__})"
    elif config.perplexity is None and not (config.tasks and config.engine == "fast"):
        why = "only perplexity and the tasks of evaluation.engine fast start at a later layer"
    else:
        try:
            return PrefixStore(model, config.prefix_bytes)
        except ConfigError as e:  # no family knows the model's layers
            why = str(e)
    if config.reuse_prefix is True:
        raise ConfigError(f"evaluation.reuse_prefix: {why}")
    return None


def _check_model(model, tokenizer, config: EvalConfig) -> None:
    """One line naming the field when the model cannot give a measure the evaluation asks for."""
    kind = type(model).__name__
    if not is_causal_lm(model):
        for key, on in (("tasks", config.tasks), ("perplexity", config.perplexity), ("latency", config.latency)):
            if on:
                raise ConfigError(
                    f"evaluation.{key}: the model is an encoder ({kind}), and lm-eval tasks, "
                    "perplexity and latency need a causal LM; measure it with evaluation.similarity "
                    "(or evaluation.pseudo_perplexity for a masked-LM checkpoint) and tasks: []"
                )
    if config.pseudo_perplexity and (not is_masked_lm(model) or tokenizer.mask_token_id is None):
        raise ConfigError(
            f"evaluation.pseudo_perplexity: needs a masked-LM checkpoint with a mask token; the model is {kind}"
        )


class Evaluator:
    """Measures one in-memory model, as it is at each ``run()``, under one ``EvalConfig``.

    It is built on the dense model: the reference embeddings of ``similarity`` are taken then, and
    the key of its layers that prefix reuse compares each run's model with (``self.prefix``).
    """

    def __init__(self, model, tokenizer, config: EvalConfig, *, verbose: bool = False):
        self.model, self.config, self.verbose = model, config, verbose
        self.timings: Dict[str, float] = {}  # seconds per metric of the last run
        _check_model(model, tokenizer, config)
        self.prefix = _prefix_store(model, config)  # taken on the model as it is now: the dense one
        with _quiet(verbose):
            self.tasks = load_tasks(config.tasks, config.data_dir, config.include_path)
            self.metrics = {
                name: _chosen_metric(name, list(task.aggregation()), config.metrics.get(name))
                for name, task in self.tasks.items()
            }
            self.lm = _lm(model, tokenizer, config, verbose, self.prefix) if self.tasks else None
        ppl = config.perplexity
        self.windows = token_windows(tokenizer, ppl.text.read(), ppl.window, ppl.max_tokens) if ppl else None
        self.prompt = prompt_ids(tokenizer) if config.latency else None
        self.similarity = config.similarity.batches(tokenizer) if config.similarity else None
        self.reference = sentence_embeddings(model, self.similarity) if self.similarity else None
        self.masked = config.pseudo_perplexity.batches(tokenizer) if config.pseudo_perplexity else None
        self.mask_id = tokenizer.mask_token_id if self.masked else None

    def n_docs(self, name: str) -> int:
        """Rows of task ``name`` an evaluation scores: its first ``limit`` (or all)."""
        n = len(self.tasks[name].eval_docs)
        return n if self.config.limit is None else min(n, self.config.limit)

    def accuracy(self, name: str, docs: Optional[range] = None) -> float:
        """Accuracy of task ``name`` on its first ``limit`` rows, or on rows ``docs``."""
        from lm_eval.evaluator import evaluate

        task_dict = {"tasks": {name: self.tasks[name]}, "groups": {}, "group_map": {}}
        rows = dict(limit=self.config.limit) if docs is None else dict(samples={name: list(docs)})
        with _quiet(self.verbose):
            result = evaluate(self.lm, task_dict, bootstrap_iters=0, log_samples=False, **rows)
        return float(result["results"][name][f"{self.metrics[name]},none"])

    def run(self, progress: bool = True, *, accuracy: Optional[Callable[[str], float]] = None) -> Dict[str, float]:
        """Flat metrics of the model now: ``acc/<task>``, ``accuracy`` (their mean), ``perplexity``,
        ``latency_tokens_per_s``, ``embedding_similarity``, ``pseudo_perplexity`` (each only if
        configured), the seconds each took (``seconds/<task>``, ``seconds/perplexity`` ...) and
        ``eval_seconds`` (all of them).

        ``accuracy(name)`` replaces the scoring of each task (a staged evaluation,
        :func:`dse.evaluate.staged_run`, passes one). ``self.timings`` then holds the seconds each
        measure took.
        """
        score = accuracy or self.accuracy
        measures = [(f"acc/{name}", partial(score, name)) for name in self.tasks]
        if self.windows is not None:
            measures.append(
                (
                    "perplexity",
                    partial(
                        perplexity, self.model, self.windows, self.config.perplexity.batch_size, prefix=self.prefix
                    ),
                )
            )
        if self.prompt is not None:
            measures.append(("latency_tokens_per_s", partial(tokens_per_second, self.model, self.prompt)))
        if self.similarity is not None:
            measures.append(
                ("embedding_similarity", partial(embedding_similarity, self.model, self.similarity, self.reference))
            )
        if self.masked is not None:
            measures.append(("pseudo_perplexity", partial(pseudo_perplexity, self.model, self.masked, self.mask_id)))
        start = time.perf_counter()
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
        out.update({f"seconds/{key.removeprefix('acc/')}": seconds for key, seconds in self.timings.items()})
        out["eval_seconds"] = time.perf_counter() - start
        return out
