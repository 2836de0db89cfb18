"""lm-eval tasks by name, from the hub or from local JSONL copies of their datasets.

With a ``data_dir``, each registered **task source** (:data:`TASK_SOURCES`, in registration
order) may name the file in it that holds a task's dataset and the split the file is; the first
file that exists is used. The task keeps its built-in lm-eval configuration (prompt,
``process_docs``, metrics) and only its dataset is redirected, so results are reported under the
plain task name. Without a ``data_dir`` every task loads its hub dataset, as lm-eval does.

The built-in source, ``benchmarks``, knows the layout of the shared benchmarks folder
(:data:`BENCHMARK_FILES`). A source is one function ``(task name, data_dir) -> LocalCopy or None``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

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
_SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def benchmarks_source(name: str, data_dir: Path) -> Optional[LocalCopy]:
    """The shared benchmarks folder's layout (one file per task, named by its source)."""
    return BENCHMARK_FILES.get(name)


@lru_cache(maxsize=1)
def task_manager():
    """lm-eval's index of built-in tasks (built once per process: it scans thousands of YAMLs)."""
    import lm_eval.tasks  # noqa: F401  (TaskManager needs the package imported first)
    from lm_eval.tasks import TaskManager

    return TaskManager()


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
        raise TaskNotFoundError(f"evaluation.data_dir: no local copy of task {name!r} in {data_dir} "
                                f"(expected {' or '.join(c.file for c in candidates)})")
    return None


def check_tasks(names: Sequence[str], data_dir=None) -> None:
    """Raise a one-line :class:`TaskNotFoundError` for a name lm-eval does not know or a missing
    local copy."""
    manager = task_manager()
    known = set(manager.all_subtasks)
    for i, name in enumerate(names):
        if name not in known:
            if name in manager.all_groups or name in manager.all_tags:
                raise TaskNotFoundError(f"evaluation.tasks[{i}]: {name!r} is a group of tasks; list its tasks instead")
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TaskNotFoundError(f"evaluation.tasks[{i}]: unknown task {name!r}{hint}")
        local_copy(name, data_dir)


def local_config(name: str, path: Path, split: str) -> Dict[str, Any]:
    """``name``'s built-in configuration with its dataset pointed at the local JSONL ``path``.

    The same as a task YAML that ``include:``s the built-in one and overrides the dataset; splits
    the file does not hold are set to null so lm-eval never asks the hub for them.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(task_manager().task_index[name].yaml_path, resolve_func=True, recursive=True)
    config.update({key: (split if s == split else None) for s, key in _SPLIT_KEYS.items()})
    config.update(task=name, dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(path)}})
    return config


def load_tasks(names: Sequence[str], data_dir=None) -> Mapping[str, Any]:
    """``{name: lm-eval Task}`` in the order given, each task's dataset loaded once."""
    check_tasks(names, data_dir)
    specs = []
    for name in names:
        copy = local_copy(name, data_dir)
        specs.append(local_config(name, *copy) if copy else name)
    loaded = task_manager().load(specs)["tasks"]
    return {name: loaded[name] for name in names}
