"""Evaluation: config validation, local task mapping, latency, and real runs on SmolLM2."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from dse.evaluate import (
    BENCHMARK_FILES,
    EvalConfig,
    Evaluator,
    PerplexityConfig,
    check_tasks,
    load_tasks,
    prompt_ids,
    tokens_per_second,
)


def _wikitext(benchmarks_dir, max_tokens=4096):
    return {
        "text": {
            "path": str(benchmarks_dir / "wikitext" / "wikitext2_raw_test_pages.jsonl"),
            "field": "page",
            "rows": [0, 6],
        },
        "window": 512,
        "max_tokens": max_tokens,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tasks="piqa"), "evaluation.tasks: expected a list"),
        (dict(tasks=["piqa", "piqa"]), "evaluation.tasks: 'piqa' is listed twice"),
        (dict(limit=0), "evaluation.limit: expected an integer >= 1, got 0"),
        (dict(batch_size=2.5), "evaluation.batch_size: expected an integer >= 1"),
        (dict(data_dir="/no/such/folder"), "evaluation.data_dir: no such folder"),
        (dict(metrics={"boolq": "acc"}), "evaluation.metrics.boolq: not one of evaluation.tasks"),
        (dict(tasks=["piqa"], metrics={"piqa": "f1"}), "evaluation.metrics.piqa: must be one of acc, acc_norm"),
        (dict(latency="yes"), "evaluation.latency: expected true or false"),
        (dict(tasks=[]), "evaluation: nothing to measure"),
        (dict(perplexity={"window": 512}), "evaluation.perplexity.text"),
        (dict(perplexity={"text": {"path": "/no/file.jsonl"}}), "evaluation.perplexity.text.path: no such file"),
        (dict(perplexity={"text": {"path": "x", "colour": 1}}), "evaluation.perplexity.text.colour: unknown key"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        EvalConfig(**kwargs)


def test_from_dict(benchmarks_dir):
    with pytest.raises(ValueError, match="evaluation.task: unknown key"):
        EvalConfig.from_dict({"task": ["piqa"]})
    with pytest.raises(ValueError, match="evaluation.perplexity.window: expected an integer >= 2"):
        EvalConfig.from_dict({"perplexity": {**_wikitext(benchmarks_dir), "window": 1}})
    with pytest.raises(ValueError, match="evaluation.perplexity.max_tokens: expected an integer >= 512, got 100"):
        EvalConfig.from_dict({"perplexity": {**_wikitext(benchmarks_dir), "max_tokens": 100}})
    config = EvalConfig.from_dict({"tasks": ["piqa"], "limit": 5, "perplexity": _wikitext(benchmarks_dir)})
    assert isinstance(config.perplexity, PerplexityConfig)
    assert config.perplexity.text.rows == (0, 6)
    assert (
        PerplexityConfig.from_dict({**_wikitext(benchmarks_dir), "text": config.perplexity.text.to_dict()})
        == config.perplexity
    )


def test_unknown_task_and_missing_local_copy(tmp_path, benchmarks_dir):
    with pytest.raises(
        ValueError, match=r"evaluation.tasks\[0\]: unknown task 'helaswag' \(did you mean 'hellaswag'\?\)"
    ):
        EvalConfig(tasks=["helaswag"]).check_tasks()
    with pytest.raises(ValueError, match=f"evaluation.data_dir: no local copy of task 'piqa' in {tmp_path}"):
        check_tasks(["piqa"], tmp_path)
    check_tasks(list(BENCHMARK_FILES), benchmarks_dir)


def test_local_tasks_read_every_row_of_their_file(benchmarks_dir):
    tasks = load_tasks(list(BENCHMARK_FILES), benchmarks_dir)
    assert list(tasks) == list(BENCHMARK_FILES)
    for name, copy in BENCHMARK_FILES.items():
        file, split = copy.file, copy.split
        task = tasks[name]
        rows = sum(1 for line in (benchmarks_dir / file).open() if line.strip())
        assert task.config.task == name
        assert task.config.dataset_kwargs == {"data_files": {split: str((benchmarks_dir / file).resolve())}}
        assert len(task.eval_docs) == rows, name
    # The built-in preprocessing still applies (HellaSwag's process_docs, ARC's answer index).
    first = tasks["hellaswag"].eval_docs[0]
    assert tasks["hellaswag"].doc_to_text(first) == "Roof shingle removal: A man is sitting on a roof. He"
    assert tasks["arc_easy"].doc_to_target(tasks["arc_easy"].eval_docs[0]) in range(5)


class CharTokenizer:
    """Characters as token ids: enough for perplexity windows and the latency prompt of a tiny model."""

    def __call__(self, text, add_special_tokens, return_tensors):
        return type("Encoding", (), {"input_ids": torch.tensor([[ord(c) % 97 for c in text]])})


def test_latency_on_tiny_model():
    model = make_tiny("llama")
    prompt = prompt_ids(CharTokenizer(), 64)
    assert prompt.shape == (1, 64)
    assert torch.equal(prompt_ids(CharTokenizer(), 300)[0, :64], prompt[0])
    speed = tokens_per_second(model, prompt, new_tokens=4, repeats=2)
    assert 0 < speed < float("inf")
    with pytest.raises(ValueError, match="latency: new_tokens and repeats must be >= 1"):
        tokens_per_second(model, prompt, new_tokens=0)


def test_run_sees_in_place_decomposition_on_tiny_model(benchmarks_dir):
    from dse import decompose_, find_projections, restore_, uniform_plan

    model = make_tiny("llama")
    config = EvalConfig(
        tasks=[], perplexity={**_wikitext(benchmarks_dir), "window": 64, "max_tokens": 256}, latency=True
    )
    evaluator = Evaluator(model, CharTokenizer(), config)
    assert evaluator.windows.shape == (4, 64)
    first = evaluator.run(progress=False)
    assert set(first) == {
        "perplexity",
        "latency_tokens_per_s",
        "seconds/perplexity",
        "seconds/latency_tokens_per_s",
        "eval_seconds",
    }
    assert set(evaluator.timings) == {"perplexity", "latency_tokens_per_s"}
    assert evaluator.run(progress=False)["perplexity"] == first["perplexity"]
    decompose_(model, uniform_plan(find_projections(model), 1))
    try:
        low = evaluator.run(progress=False)["perplexity"]
    finally:
        restore_(model)
    assert abs(low - first["perplexity"]) > 1e-3 * first["perplexity"]
    assert evaluator.run(progress=False)["perplexity"] == first["perplexity"]


@pytest.mark.slow
def test_smollm2_wikitext_perplexity(smollm2, benchmarks_dir):
    model, tokenizer = smollm2
    evaluator = Evaluator(model, tokenizer, EvalConfig(tasks=[], perplexity=_wikitext(benchmarks_dir)))
    assert evaluator.windows.shape == (8, 512)
    metrics = evaluator.run(progress=False)
    assert set(metrics) == {"perplexity", "seconds/perplexity", "eval_seconds"}
    assert metrics["perplexity"] == pytest.approx(30.23, rel=0.01)


@pytest.mark.slow
def test_smollm2_runs_are_repeatable_and_see_in_place_decomposition(smollm2, benchmarks_dir):
    from dse import Plan, decompose_, find_projections, restore_

    model, tokenizer = smollm2
    config = EvalConfig(
        tasks=["piqa", "winogrande"],
        limit=8,
        batch_size=8,
        data_dir=str(benchmarks_dir),
        perplexity=_wikitext(benchmarks_dir, max_tokens=512),
    )
    evaluator = Evaluator(model, tokenizer, config)
    assert evaluator.metrics == {"piqa": "acc_norm", "winogrande": "acc"}
    first = evaluator.run(progress=False)
    seconds = {"seconds/piqa", "seconds/winogrande", "seconds/perplexity", "eval_seconds"}
    assert set(first) == {"acc/piqa", "acc/winogrande", "accuracy", "perplexity"} | seconds
    assert all(0 <= first[k] <= 1 for k in ("acc/piqa", "acc/winogrande", "accuracy"))
    assert first["accuracy"] == pytest.approx((first["acc/piqa"] + first["acc/winogrande"]) / 2)
    second = evaluator.run(progress=False)
    assert {k: v for k, v in second.items() if k not in seconds} == {k: v for k, v in first.items() if k not in seconds}

    table = find_projections(model)
    decompose_(model, Plan({n: 8 for n, p in table.items() if p.layer < 2}, "svd"), table=table)
    try:
        low = evaluator.run(progress=False)
    finally:
        restore_(model)
    assert low["perplexity"] > 2 * first["perplexity"]  # rank 8 of 576 in the first two layers wrecks the model
    restored = evaluator.run(progress=False)
    assert restored["perplexity"] == first["perplexity"]
    assert restored["accuracy"] == first["accuracy"]
