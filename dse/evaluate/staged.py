"""A staged evaluation (multi-fidelity): score the first share of every task, ask whether to go on,
then score the rest, so that a trial already far behind stops early.

:func:`staged_run` gives the same metrics as :meth:`Evaluator.run` when it is not stopped: the
accuracy of each task is the mean over all its rows, the two stages weighted by their row counts.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, Optional

from .evaluator import Evaluator

EarlyStopRule = Callable[[Dict[str, float]], Optional[str]]  # first-stage metrics -> a reason to stop, or None


class EarlyStop(Exception):
    """A staged evaluation stopped after its first stage: ``reason`` and the ``metrics`` so far."""

    def __init__(self, reason: str, metrics: Dict[str, float]):
        super().__init__(reason)
        self.reason, self.metrics = reason, metrics


def staged_run(
    evaluator: Evaluator, first: float, early_stop: EarlyStopRule, progress: bool = True
) -> Dict[str, float]:
    """Score every task on its first ``first`` share of rows; ``early_stop`` sees those metrics
    (``acc/<task>``, ``accuracy``) and may return a reason to stop, raising :class:`EarlyStop`;
    otherwise the other rows are scored and combined, and the remaining measures run."""
    start = time.perf_counter()
    heads = {name: max(1, math.ceil(first * evaluator.n_docs(name))) for name in evaluator.tasks}
    head = {f"acc/{name}": evaluator.accuracy(name, range(k)) for name, k in heads.items()}
    if heads:
        head["accuracy"] = statistics.fmean(head.values())
    reason = early_stop(dict(head))
    if reason:
        raise EarlyStop(reason, {**head, "eval_seconds": time.perf_counter() - start})

    def combined(name: str) -> float:
        n, k, acc = evaluator.n_docs(name), heads[name], head[f"acc/{name}"]
        return acc if k >= n else (acc * k + evaluator.accuracy(name, range(k, n)) * (n - k)) / n

    out = evaluator.run(progress, accuracy=combined)
    out["eval_seconds"] = time.perf_counter() - start
    return out
