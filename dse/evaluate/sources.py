"""Where a task's dataset lives on disk: task sources and the local copy they name.

With a ``data_dir``, each registered **task source** (:data:`TASK_SOURCES`, in registration
order) may name the file in it that holds a task's dataset and the split the file is; the first
file that exists is used. A source is one function ``(task name, data_dir) -> LocalCopy or None``.
The built-in ones (registered in :mod:`dse.evaluate`): ``benchmarks``, the shared benchmarks
folder's layout (:data:`BENCHMARK_FILES`), and ``convention``, ``data_dir/<task>/<split>.jsonl``
for any built-in lm-eval task (:func:`dse.evaluate.tasks.convention_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..core.errors import TaskNotFoundError
from ..core.registry import Registry


@dataclass(frozen=True)
class LocalCopy:
    """A task's dataset in ``data_dir``: the file (relative to ``data_dir``) and the split it holds."""

    file: str
    split: str


TaskSource = Callable[[str, Path], Optional[LocalCopy]]
TASK_SOURCES: Registry[TaskSource] = Registry("task source")

BENCHMARK_FILES: Dict[str, LocalCopy] = {
    "hellaswag": LocalCopy("hellaswag/hellaswag_val.jsonl", "validation"),
    "arc_easy": LocalCopy("arc_easy/arc_easy_test.jsonl", "test"),
    "arc_challenge": LocalCopy("arc_challenge/arc_challenge_test.jsonl", "test"),
    "piqa": LocalCopy("piqa/piqa_valid.jsonl", "validation"),
    "winogrande": LocalCopy("winogrande/winogrande_xl_dev.jsonl", "validation"),
    "boolq": LocalCopy("boolq/boolq_val.jsonl", "validation"),
    "lambada_openai": LocalCopy("lambada_openai/lambada_test.jsonl", "test"),
}


def benchmarks_source(name: str, data_dir: Path) -> Optional[LocalCopy]:
    """The shared benchmarks folder's layout (one file per task, named by its source)."""
    return BENCHMARK_FILES.get(name)


def _candidates(name: str, data_dir) -> List[LocalCopy]:
    if data_dir is None:
        return []
    data_dir = Path(data_dir).expanduser()
    return [copy for source in TASK_SOURCES.values() if (copy := source(name, data_dir)) is not None]


def local_copy(name: str, data_dir) -> Optional[tuple]:
    """``(absolute path, split)`` of ``name``'s local copy in ``data_dir``; None if no source names
    one. A copy named but missing everywhere is a :class:`TaskNotFoundError`."""
    candidates = _candidates(name, data_dir)
    for copy in candidates:
        path = (Path(data_dir).expanduser() / copy.file).resolve()
        if path.is_file():
            return path, copy.split
    if candidates:
        raise TaskNotFoundError(
            f"evaluation.data_dir: no local copy of task {name!r} in {data_dir} "
            f"(expected {' or '.join(c.file for c in candidates)}, or {name}/<split>.jsonl)"
        )
    return None
