"""The bad-input corpus: each malformed input gets one line naming the field, exit status 2,
and leaves every file as it was (no half-written output, no stray study database).

Inputs go through the real command line (``dse.cli.main``), as a user would give them.
"""

from __future__ import annotations

import hashlib

import pytest
import yaml
from conftest import BENCHMARKS
from helpers import mutated

from dse.cli import main

WIKI = str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl")
SPACE = {
    "name": "s",
    "model_config": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_attention_heads": 4,
        "vocab_size": 97,
    },
    "ranks": [2, "dense"],
    "group": "layer",
}
STUDY = {
    "name": "bad",
    "model": "smollm2-135m",
    "space": SPACE,
    "evaluation": {"tasks": ["piqa"], "limit": 4, "data_dir": str(BENCHMARKS)},
    "objectives": ["accuracy", "params"],
}


def study_with(**change):
    study = STUDY
    for dotted, value in change.items():
        study = mutated(study, tuple(dotted.split("__")), value)
    return study


# (name, what the file holds, extra CLI args, expected start of the message after "dse: error: ")
STUDY_CASES = [
    ("yaml-syntax", "name: x\nspace: [1, 2\nmodel: m\n", [], "study: YAML syntax error at line 3"),
    ("not-a-mapping", "- just\n- a list\n", [], "study: "),
    ("unknown-key", study_with(bogus=1), [], "bogus: unknown key"),
    ("n-trials-type", study_with(n_trials="ten"), [], "n_trials: expected an integer"),
    ("n-trials-negative", study_with(n_trials=-3), [], "n_trials: expected an integer >= 1, got -3"),
    ("seed-type", study_with(seed=1.5), [], "seed: expected an integer"),
    ("sampler", study_with(sampler="tpee"), [], "sampler: unknown sampler 'tpee' (did you mean 'tpe'?)"),
    (
        "sampler-option",
        study_with(sampler={"name": "tpe", "n_startup": 3}),
        [],
        "sampler.n_startup: tpe has no such option",
    ),
    (
        "sampler-option-type",
        study_with(sampler={"name": "tpe", "n_startup_trials": "8"}),
        [],
        "sampler.n_startup_trials: expected int",
    ),
    ("objectives-empty", study_with(objectives=[]), [], "objectives: expected a non-empty list"),
    ("objective-unknown", study_with(objectives=["accuracy", "size"]), [], "objectives[1]: unknown objective 'size'"),
    ("objective-twice", study_with(objectives=["params", "params"]), [], "objectives[1]: 'params' is listed twice"),
    (
        "ppl-objective-no-text",
        study_with(objectives=["perplexity", "params"]),
        [],
        "objectives[0]: 'perplexity' needs evaluation.perplexity",
    ),
    ("max-params", study_with(constraints={"max_params": 1.5}), [], "constraints.max_params"),
    ("max-drop", study_with(constraints={"max_drop": -0.1}), [], "constraints.max_drop"),
    ("constraint-unknown", study_with(constraints={"min_params": 0.5}), [], "constraints.min_params: unknown key"),
    ("impossible-constraint", study_with(constraints={"max_params": 0}), [], "constraints.max_params"),
    ("baseline", study_with(baselines=[{"uniform": -1}]), [], "baselines[0].uniform"),
    ("method", study_with(method="nope"), [], "method: unknown method 'nope'"),
    ("method-option", study_with(method_options={"alpha": 1}), [], "method_options.alpha: svd has no such option"),
    ("needs-calibration", study_with(method="svdllm"), [], "calibration: method svdllm needs calibration"),
    ("dtype", study_with(dtype="float8"), [], "dtype: unknown 'float8'"),
    ("device", study_with(device="tpu"), [], "device: expected cpu, cuda"),
    ("device-map", study_with(device_map="everywhere"), [], "device_map: expected one of auto, balanced"),
    (
        "device-map-target",
        study_with(device_map={"model.layers.0": "gpu"}),
        [],
        "device_map.model.layers.0: expected cpu, disk, cuda",
    ),
    ("device-and-map", study_with(device="cpu", device_map="auto"), [], "device_map: the study also sets device"),
    ("max-memory-no-map", study_with(max_memory={"cpu": "1GiB"}), [], "max_memory: only used with a device_map"),
    (
        "max-memory-size",
        study_with(device_map="auto", max_memory={"cpu": "lots"}),
        [],
        "max_memory.cpu: expected bytes or a size",
    ),
    ("cache-memory", study_with(cache={"memory": "gpu"}), [], "cache.memory: expected one of device, cpu, none"),
    ("cache-key", study_with(cache={"folder": "x"}), [], "cache.folder: unknown key"),
    ("cache-twice", study_with(cache={"memory": "cpu"}, cache_dir="x"), [], "cache_dir: the study also has a cache:"),
    (
        "calibration-streamed",
        study_with(method="svdllm", calibration={"text": {"path": WIKI, "field": "page"}, "streamed": "yes"}),
        [],
        "calibration.streamed: expected true or false",
    ),
    ("limit", study_with(evaluation__limit=0), [], "evaluation.limit: expected an integer >= 1"),
    ("tasks-string", study_with(evaluation__tasks="piqa"), [], "evaluation.tasks: expected a list"),
    ("unknown-task", study_with(evaluation__tasks=["helaswag"]), [], "evaluation.tasks[0]: unknown task 'helaswag'"),
    ("data-dir", study_with(evaluation__data_dir="/nonexistent/bench"), [], "evaluation.data_dir: no such folder"),
    ("eval-unknown-key", study_with(evaluation__limt=5), [], "evaluation.limt: unknown key"),
    (
        "ppl-text-missing",
        study_with(evaluation__perplexity={"text": {"path": "/nonexistent.jsonl"}}),
        [],
        "evaluation.perplexity.text.path: no such file",
    ),
    (
        "ppl-window",
        study_with(evaluation__perplexity={"text": {"path": WIKI, "field": "page"}, "window": 1}),
        [],
        "evaluation.perplexity.window",
    ),
    ("heal-no-text", study_with(heal={"steps": 3}), [], "heal.text: required"),
    (
        "heal-key",
        study_with(heal={"text": {"path": WIKI, "field": "page", "rows": [12, 40]}, "stpes": 3}),
        [],
        "heal.stpes: unknown key",
    ),
    (
        "heal-lr",
        study_with(heal={"text": {"path": WIKI, "field": "page", "rows": [12, 40]}, "lr": 0}),
        [],
        "heal.lr: must be in (0, 1]",
    ),
    (
        "heal-overlap",
        study_with(
            heal={"text": {"path": WIKI, "field": "page", "rows": [0, 12]}},
            evaluation__perplexity={"text": {"path": WIKI, "field": "page", "rows": [0, 6]}},
        ),
        [],
        "heal.text: rows 0:12 of wikitext2_raw_test_pages.jsonl overlap evaluation.perplexity.text (rows 0:6)",
    ),
    ("space-missing-file", study_with(space="nowhere.yaml"), [], "space: file not found"),
    ("space-rank-zero", study_with(space__ranks=[0, "dense"]), [], "space.ranks[0]"),
    ("space-rank-word", study_with(space__ranks=["full"]), [], "space.ranks[0]"),
    ("space-group", study_with(space__group="row"), [], "space.group"),
    ("space-max-layers", study_with(space__rules={"max_layers": 0}), [], "space.rules.max_layers"),
    (
        "space-rule-for-type",
        study_with(space__group="type", space__rules={"no_adjacent": True}),
        [],
        "space.rules.no_adjacent",
    ),
    ("space-type", study_with(space__types=["qq"]), [], "space.types[0]"),
    ("storage-not-url", study_with(storage="not a url"), [], "storage: 'not a url' is not a URL"),
    (
        "storage-unreachable",
        STUDY,
        ["--storage", "postgresql+psycopg2://u@127.0.0.1:9/x?connect_timeout=2"],
        "storage: cannot open",
    ),
    ("storage-driver", STUDY, ["--storage", "mysql+nosuchdriver://u@127.0.0.1/x"], "storage: cannot open"),
]


def tree(folder):
    """Every file under ``folder`` with a hash of its bytes."""
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(argv, capsys, folder):
    before = tree(folder)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert tree(folder) == before, "a bad input changed or created files"
    return err.removeprefix("dse: error: ")


@pytest.mark.parametrize("name, content, args, expected", STUDY_CASES, ids=[c[0] for c in STUDY_CASES])
def test_bad_study(tmp_path, capsys, name, content, args, expected):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    path = tmp_path / "study.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    verb = "status" if name.startswith("storage-") and name != "storage-not-url" else "run"
    message = run_cli([verb, str(path), *args], capsys, tmp_path)
    assert message.startswith(expected), message


def test_status_of_a_study_never_run(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    assert run_cli(["status", str(path)], capsys, tmp_path).startswith("storage: no study database")


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"format": 1, "model": {"name": "x"', "config: "),  # truncated JSON
        ("[1, 2]", "config: expected a JSON object"),
        ('{"format": 99}', "config.format: 99 is not a dse rank config format"),
        ('{"format": 1, "model": {}}', "config.model."),
    ],
)
def test_bad_rank_config(tmp_path, capsys, content, expected):
    path = tmp_path / "config.json"
    path.write_text(content)
    message = run_cli(["apply", str(path), "--out", str(tmp_path / "out")], capsys, tmp_path)
    assert message.startswith(expected), message
    assert not (tmp_path / "out").exists()


def test_bad_space_file(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text("name: s\nmodel: smollm2-135m\nranks: [1, 2\n")
    assert run_cli(["space", str(path)], capsys, tmp_path).startswith("space: YAML syntax error at line")


# dse heal: (name, options after the source and --out, expected start of the message)
HEAL_CASES = [
    ("lr", ["--lr", "0"], "heal.lr: must be in (0, 1]"),
    ("train", ["--train", "lorra"], "heal.train: expected one of factors, lora, got 'lorra'"),
    ("loss", ["--loss", "kl"], "heal.loss: expected one of lm, distill"),
    ("freeze", ["--freeze", "alternate"], "heal.freeze: expected one of none, sequential"),
    ("switch-every", ["--freeze", "sequential", "--switch-every", "0"], "heal.switch_every: expected an integer >= 1"),
    ("steps-and-tokens", ["--steps", "5", "--tokens", "1000"], "heal.tokens: give steps or tokens, not both"),
    ("batch", ["--batch", "0"], "heal.batch: expected an integer >= 1"),
    ("format", ["--format", "merged"], "format: a heal writes a low-rank format (dse, transformers), not merged"),
    ("rows", ["--rows", "3"], "--rows: expected FIRST:END row numbers, got '3'"),
    (
        "overlap",
        ["--field", "page", "--rows", "0:12", "--eval-rows", "6:12"],
        "heal.text: rows 0:12 of wikitext2_raw_test_pages.jsonl overlap evaluation.text (rows 6:12)",
    ),
    ("text-missing", ["--text", "/nonexistent.jsonl"], "heal.text.path: no such file"),
    ("text-short", ["--field", "page", "--rows", "0:1", "--seq-len", "4096"], "heal.seq_len: the text has"),
    (
        "text-one-batch",
        ["--field", "page", "--rows", "0:1", "--seq-len", "1024", "--batch", "64"],
        "heal.batch: the text gives",
    ),
]


@pytest.fixture(scope="module")
def heal_config(tmp_path_factory):
    """A rank config of a saved tiny Llama (word-level tokenizer)."""
    from helpers import save_tiny_rank_config

    return save_tiny_rank_config(tmp_path_factory.mktemp("heal-bad"))


@pytest.mark.parametrize("name, options, expected", HEAL_CASES, ids=[c[0] for c in HEAL_CASES])
def test_bad_heal(tmp_path, capsys, heal_config, name, options, expected):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    argv = ["heal", str(heal_config), "--out", str(tmp_path / "out"), "--quiet", "--text", WIKI, *options]
    message = run_cli(argv, capsys, tmp_path)
    assert message.startswith(expected), message
    assert not (tmp_path / "out").exists()
