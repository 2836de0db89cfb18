"""lm-eval tasks by name: built-in, from the user's task YAMLs, from local copies or the hub.

``include_path`` (a folder of task YAMLs) is given to lm-eval's ``TaskManager`` beside
its built-in tasks; a relative ``data_files`` path in those YAMLs resolves against the YAML's folder
(lm-eval itself resolves it against the working directory). A group or tag of tasks is expanded
into its tasks (their mean accuracy is the study's, not the group's own aggregate). A task with a
local copy (:mod:`dse.evaluate.sources`) keeps its built-in lm-eval configuration (prompt,
``process_docs``, metrics) with only its dataset redirected, so results are reported under the
plain task name; any other task loads its dataset as lm-eval does, and :func:`check_tasks` loads
it once up front, so a dataset that cannot be reached fails before a study starts, in one line.
"""

from __future__ import annotations

import copy
import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..core.errors import TaskNotFoundError
from .sources import LocalCopy, local_copy

_SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def task_manager(include_path: Optional[str] = None):
    """lm-eval's index of built-in tasks and those under ``include_path`` (built once per path and
    process: it scans thousands of YAMLs)."""
    return _task_manager(include_path)  # one cache key per path, however it is passed


@lru_cache(maxsize=4)
def _task_manager(include_path: Optional[str]):
    import lm_eval.tasks  # noqa: F401  (TaskManager needs the package imported first)
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_config(name: str, include_path: Optional[str] = None) -> Dict[str, Any]:
    """The task's YAML configuration, its ``include:`` chain resolved (a fresh copy each call)."""
    return copy.deepcopy(_task_config(name, include_path))


@lru_cache(maxsize=256)
def _task_config(name: str, include_path: Optional[str]) -> Dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task_manager(include_path).task_index[name].yaml_path, resolve_func=True, recursive=True)


def convention_source(name: str, data_dir: Path) -> Optional[LocalCopy]:
    """``data_dir/<task>/<split>.jsonl``, fields as on the hub, for any built-in task.

    Of the files there, the split the task evaluates on is taken first (its test split, else its
    validation split), then any other."""
    folder = data_dir / name
    entry = task_manager().task_index.get(name) if folder.is_dir() else None
    if entry is None or entry.yaml_path is None:
        return None
    config = task_config(name)
    own = [config.get(key) for key in ("test_split", "validation_split", "training_split")]
    for split in dict.fromkeys([s for s in own if s in _SPLIT_KEYS] + list(_SPLIT_KEYS)):
        if (folder / f"{split}.jsonl").is_file():
            return LocalCopy(f"{name}/{split}.jsonl", split)
    return None


def _kind(manager, name: str) -> Optional[str]:
    entry = manager.task_index.get(name)
    return None if entry is None else entry.kind.name  # TASK, PY_TASK, GROUP or TAG


def expand_tasks(names: Sequence[str], include_path: Optional[str] = None) -> List[Tuple[int, str]]:
    """``(index in names, task)`` for every task the listed names stand for: groups and tags
    expanded (recursively, each task once, in order). Unknown names are one-line errors."""
    if not names:  # no lm-eval task: lm-eval's index (18 s to build) is not needed
        return []
    manager = task_manager(include_path)
    out: Dict[str, int] = {}

    def visit(name, i: int, parent: Optional[str]) -> None:
        where = f"evaluation.tasks[{i}]"
        if not isinstance(name, str):
            raise TaskNotFoundError(f"{where}: group {parent!r} defines a task inline; list its tasks instead")
        kind = _kind(manager, name)
        if kind is None:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            inside = f" (in group {parent!r})" if parent else ""
            raise TaskNotFoundError(f"{where}: unknown task {name!r}{inside}{hint}")
        entry = manager.task_index[name]
        if kind == "TAG":
            for member in sorted(entry.tags):
                visit(member, i, name)
        elif kind == "GROUP":
            members = (entry.cfg or {}).get("task") or []
            for member in [members] if isinstance(members, str) else members:
                visit(member, i, name)
        else:
            out.setdefault(name, i)

    for i, name in enumerate(names):
        visit(name, i, None)
    return [(i, name) for name, i in out.items()]


def local_config(name: str, path: Path, split: str, include_path: Optional[str] = None) -> Dict[str, Any]:
    """``name``'s configuration with its dataset pointed at the local JSONL ``path``.

    The same as a task YAML that ``include:``s the built-in one and overrides the dataset; splits
    the file does not hold are set to null so lm-eval never asks the hub for them.
    """
    config = task_config(name, include_path)
    config.update({key: (split if s == split else None) for s, key in _SPLIT_KEYS.items()})
    if config.get("fewshot_split") not in (None, split):
        config["fewshot_split"] = None
    config.update(task=name, dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(path)}})
    return config


def _user_config(name: str, include_path: str) -> Dict[str, Any]:
    """A task from ``include_path`` with its relative ``data_files`` resolved against its YAML's folder."""
    config = task_config(name, include_path)
    folder = Path(task_manager(include_path).task_index[name].yaml_path).parent
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        files = {"train": files}
    if isinstance(files, Mapping):
        config["dataset_kwargs"] = {
            **config["dataset_kwargs"],
            "data_files": {
                split: str((folder / f).resolve()) if isinstance(f, str) and not Path(f).is_absolute() else f
                for split, f in files.items()
            },
        }
    return config


def _from_include_path(name: str, include_path: Optional[str]) -> bool:
    if include_path is None:
        return False
    path = task_manager(include_path).task_index[name].yaml_path
    return path is not None and Path(include_path).resolve() in Path(path).resolve().parents


def _spec(name: str, data_dir, include_path: Optional[str]):
    """What lm-eval loads for ``name``: a local copy's config, a user task's config, or the name."""
    found = local_copy(name, data_dir)
    if found:
        return local_config(name, *found, include_path)
    return _user_config(name, include_path) if _from_include_path(name, include_path) else name


def _load(manager, name: str, spec, where: str):
    """The lm-eval Task of ``spec``; a dataset that cannot be loaded is a one-line error."""
    try:
        return manager.load([spec])["tasks"][name]
    except OSError as e:  # ConnectionError, a missing file, a dataset the hub does not have
        source = spec if isinstance(spec, str) else "its YAML"
        dataset = task_config(name, manager.include_path).get("dataset_path") if isinstance(spec, str) else None
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        raise TaskNotFoundError(
            f"{where}: the dataset of task {name!r} ({dataset or source}) cannot be loaded ({reason}); give a "
            f"local copy: evaluation.data_dir with {name}/<split>.jsonl, fields as on the hub"
        ) from None


def check_tasks(names: Sequence[str], data_dir=None, include_path: Optional[str] = None) -> List[str]:
    """The tasks ``names`` stand for (groups expanded), after checking that each is known and that
    its dataset can be read: a local copy where a source names one, else loaded once now (a task
    whose dataset cannot be reached offline fails here, before any study starts)."""
    tasks = expand_tasks(names, include_path)
    for i, name in tasks:
        spec = _spec(name, data_dir, include_path)
        if isinstance(spec, str):
            _load(task_manager(include_path), name, spec, f"evaluation.tasks[{i}]")
    return [name for _, name in tasks]


def load_tasks(names: Sequence[str], data_dir=None, include_path: Optional[str] = None) -> Mapping[str, Any]:
    """``{task: lm-eval Task}`` for the tasks ``names`` stand for (groups expanded), in order, each
    task's dataset loaded once."""
    tasks = expand_tasks(names, include_path)
    return {
        name: _load(task_manager(include_path), name, _spec(name, data_dir, include_path), f"evaluation.tasks[{i}]")
        for i, name in tasks
    }
