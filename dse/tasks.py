"""lm-eval tasks by name, from the hub or from local JSONL copies of their datasets.

With a ``data_dir`` laid out like the shared ``benchmarks/`` folder, a task listed in
``LOCAL_TASKS`` keeps its built-in lm-eval configuration (prompt, ``process_docs``, metrics) and
only its dataset is redirected to the local file, so results are reported under the plain task
name. Without a ``data_dir`` every task loads its hub dataset, as lm-eval does.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

# task name -> (file inside data_dir, the split that file holds)
LOCAL_TASKS: Dict[str, tuple] = {
    "hellaswag": ("hellaswag/hellaswag_val.jsonl", "validation"),
    "arc_easy": ("arc_easy/arc_easy_test.jsonl", "test"),
    "arc_challenge": ("arc_challenge/arc_challenge_test.jsonl", "test"),
    "piqa": ("piqa/piqa_valid.jsonl", "validation"),
    "winogrande": ("winogrande/winogrande_xl_dev.jsonl", "validation"),
    "boolq": ("boolq/boolq_val.jsonl", "validation"),
    "lambada_openai": ("lambada_openai/lambada_test.jsonl", "test"),
}
_SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


@lru_cache(maxsize=1)
def task_manager():
    """lm-eval's index of built-in tasks (built once per process: it scans thousands of YAMLs)."""
    import lm_eval.tasks  # noqa: F401  (TaskManager needs the package imported first)
    from lm_eval.tasks import TaskManager

    return TaskManager()


def local_file(name: str, data_dir) -> Optional[Path]:
    """The absolute path of ``name``'s local copy in ``data_dir`` (None if it has no entry in the table)."""
    if data_dir is None or name not in LOCAL_TASKS:
        return None
    return (Path(data_dir).expanduser() / LOCAL_TASKS[name][0]).resolve()


def check_tasks(names: Sequence[str], data_dir=None) -> None:
    """Raise a one-line ``ValueError`` for a name lm-eval does not know or a missing local copy."""
    manager = task_manager()
    known = set(manager.all_subtasks)
    for name in names:
        if name not in known:
            if name in manager.all_groups or name in manager.all_tags:
                raise ValueError(f"evaluation.tasks: {name!r} is a group of tasks; list its tasks instead")
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"evaluation.tasks: unknown task {name!r}{hint}")
        path = local_file(name, data_dir)
        if path is not None and not path.is_file():
            raise ValueError(f"evaluation.data_dir: no local copy of task {name!r} in {data_dir} "
                             f"(expected {LOCAL_TASKS[name][0]})")


def local_config(name: str, data_dir) -> Dict[str, Any]:
    """``name``'s built-in configuration with its dataset pointed at the local JSONL file.

    The same as a task YAML that ``include:``s the built-in one and overrides the dataset; splits
    the file does not hold are set to null so lm-eval never asks the hub for them.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    path = local_file(name, data_dir)
    split = LOCAL_TASKS[name][1]
    config = load_yaml(task_manager().task_index[name].yaml_path, resolve_func=True, recursive=True)
    config.update({key: (split if s == split else None) for s, key in _SPLIT_KEYS.items()})
    config.update(task=name, dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {split: str(path)}})
    return config


def load_tasks(names: Sequence[str], data_dir=None) -> Mapping[str, Any]:
    """``{name: lm-eval Task}`` in the order given, each task's dataset loaded once."""
    check_tasks(names, data_dir)
    specs = [local_config(n, data_dir) if local_file(n, data_dir) else n for n in names]
    loaded = task_manager().load(specs)["tasks"]
    return {name: loaded[name] for name in names}
