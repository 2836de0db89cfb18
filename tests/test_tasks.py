"""Any lm-eval task: the user's task YAMLs (include_path), a local copy of any built-in task by the
convention data_dir/<task>/<split>.jsonl, groups expanded, and datasets that cannot be reached
offline refused in one line before a study starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import write_study

from dse.cli import main
from dse.core.errors import TaskNotFoundError
from dse.evaluate import EvalConfig, Evaluator, check_tasks, load_tasks, local_copy
from dse.results.record import TrialRecord

ROOT = Path(__file__).resolve().parents[1]
OPENBOOKQA = [  # rows in the hub's layout (allenai/openbookqa, main), made up for the test
    {
        "id": f"q{i}",
        "question_stem": stem,
        "answerKey": key,
        "choices": {"text": choices, "label": ["A", "B", "C", "D"]},
    }
    for i, (stem, choices, key) in enumerate(
        [
            ("The sun is a", ["star", "planet", "moon", "comet"], "A"),
            ("Water freezes at", ["100 C", "0 C", "50 C", "10 C"], "B"),
            ("Plants make food by", ["eating", "sleeping", "photosynthesis", "running"], "C"),
            ("A magnet attracts", ["wood", "glass", "paper", "iron"], "D"),
            ("Ice is a", ["solid", "gas", "plasma", "liquid"], "A"),
        ]
    )
]


def test_groups_and_tags_stand_for_their_tasks(benchmarks_dir, tmp_path):
    assert check_tasks(["ai2_arc", "piqa", "arc_easy"], benchmarks_dir) == ["arc_challenge", "arc_easy", "piqa"]
    (tmp_path / "group.yaml").write_text(yaml.safe_dump({"group": "mine", "task": ["piqa", "nope"]}))
    with pytest.raises(TaskNotFoundError, match=r"^evaluation.tasks\[1\]: unknown task 'nope' \(in group 'mine'\)"):
        check_tasks(["piqa", "mine"], benchmarks_dir, str(tmp_path))
    (tmp_path / "inline").mkdir()
    (tmp_path / "inline/group.yaml").write_text(yaml.safe_dump({"group": "mine", "task": [{"task": "x"}]}))
    with pytest.raises(TaskNotFoundError, match=r"^evaluation.tasks\[0\]: group 'mine' defines a task inline"):
        check_tasks(["mine"], benchmarks_dir, str(tmp_path / "inline"))


def test_unreachable_dataset_is_one_line_before_the_study(offline, tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(TaskNotFoundError) as err:
        check_tasks(["openbookqa"])
    message = str(err.value)
    assert message.startswith(
        "evaluation.tasks[0]: the dataset of task 'openbookqa' (allenai/openbookqa) cannot be loaded ("
    )
    assert message.endswith(
        "give a local copy: evaluation.data_dir with openbookqa/<split>.jsonl, fields as on the hub"
    )
    assert "\n" not in message
    study = write_study(tmp_path, tiny_llama_dir, evaluation={"tasks": ["openbookqa"], "limit": 2})
    assert main(["run", str(study), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dse: error: evaluation.tasks[0]: the dataset of task 'openbookqa'") and "\n" not in err
    assert not (tmp_path / "runs").exists()  # no study was created


def test_builtin_task_from_a_local_copy_by_convention(tiny_llama_dir, tmp_path):
    folder = tmp_path / "openbookqa"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in OPENBOOKQA))
    assert local_copy("openbookqa", tmp_path) == ((folder / "test.jsonl").resolve(), "test")
    task = load_tasks(["openbookqa"], tmp_path)["openbookqa"]
    assert len(task.eval_docs) == len(OPENBOOKQA)
    for doc, row in zip(task.eval_docs, OPENBOOKQA):  # the built-in prompt and target apply
        assert task.doc_to_text(doc) == row["question_stem"]
        assert task.doc_to_target(doc) == "ABCD".index(row["answerKey"])
    from dse.model import load_model

    model, tokenizer = load_model(str(tiny_llama_dir))
    evaluator = Evaluator(model, tokenizer, EvalConfig(tasks=["openbookqa"], limit=None, data_dir=str(tmp_path)))
    accuracy = evaluator.run(progress=False)["acc/openbookqa"]
    assert accuracy * len(OPENBOOKQA) == pytest.approx(round(accuracy * len(OPENBOOKQA)))


def test_convention_prefers_the_split_the_task_evaluates(tmp_path):
    (tmp_path / "piqa").mkdir()
    for split in ("test", "validation"):  # piqa's labelled split is validation
        (tmp_path / "piqa" / f"{split}.jsonl").write_text("{}\n")
    assert local_copy("piqa", tmp_path) == ((tmp_path / "piqa/validation.jsonl").resolve(), "validation")
    assert local_copy("openbookqa", tmp_path) is None  # no folder: the hub


def test_custom_task_yaml_runs_in_a_study(tiny_llama_dir, tmp_path, benchmarks_dir):
    """The README's custom task (tasks/piqa_qa.yaml): a new prompt over the shared PIQA copy."""
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("```yaml\n# tasks/piqa_qa.yaml\n", 1)[1].split("```", 1)[0]
    assert shown == (ROOT / "tasks/piqa_qa.yaml").read_text().split("\n", 2)[2]
    task = load_tasks(["piqa_qa"], include_path=str(ROOT / "tasks"))["piqa_qa"]
    first = json.loads((benchmarks_dir / "piqa/piqa_valid.jsonl").open().readline())
    assert len(task.eval_docs) == 1838
    assert task.doc_to_text(task.eval_docs[0]) == f"Goal: {first['goal']}\nSolution:"
    from dse.study.config import load_study_config
    from dse.study.runner import run_study

    path = write_study(
        tmp_path,
        tiny_llama_dir,
        n_trials=2,
        baselines=["dense"],
        evaluation={
            "tasks": ["piqa_qa", "piqa"],
            "limit": 4,
            "batch_size": 4,
            "data_dir": str(benchmarks_dir),
            "include_path": str(ROOT / "tasks"),
        },
    )
    study = run_study(load_study_config(path), progress=False)
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 2
    for t in trials:
        record = TrialRecord.of(t)
        assert record["accuracy"] == pytest.approx((record["acc/piqa_qa"] + record["acc/piqa"]) / 2)
