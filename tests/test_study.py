"""The study loop end to end on a tiny Llama with SmolLM2's tokenizer: real lm-eval, real perplexity."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import BENCHMARKS
from helpers import mutated, write_study
from optuna.trial import TrialState

from dse.cli import main
from dse.core.errors import StudyError
from dse.decompose import is_decomposed
from dse.results.record import TrialRecord
from dse.study.config import ConfigError, load_study_config
from dse.study.measure import Measurer
from dse.study.runner import finished_trials, open_study, run_study


@pytest.fixture(scope="module")
def measurer(tiny_llama_dir, tmp_path_factory):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    path = write_study(tmp_path_factory.mktemp("w"), tiny_llama_dir)
    return Measurer.from_config(load_study_config(path), progress=False)


def fresh_config(tmp_path, tiny_llama_dir, **overrides):
    return load_study_config(write_study(tmp_path, tiny_llama_dir, **overrides))


def test_a_trial_writes_its_record_in_one_storage_call(measurer, tmp_path, tiny_llama_dir, monkeypatch):
    """Each trial writes two user attributes (who runs it, then its record): two round trips on a
    shared database, not one per metric."""
    writes = []
    real = optuna.storages.RDBStorage.set_trial_user_attr
    monkeypatch.setattr(
        optuna.storages.RDBStorage,
        "set_trial_user_attr",
        lambda self, trial_id, key, value: writes.append((trial_id, key)) or real(self, trial_id, key, value),
    )
    study = run_study(fresh_config(tmp_path, tiny_llama_dir, n_trials=4), measurer=measurer, progress=False)
    per_trial = {t._trial_id: [k for i, k in writes if i == t._trial_id] for t in study.trials}
    assert len(per_trial) == 4 and all(keys == ["worker", TrialRecord.ATTRIBUTE] for keys in per_trial.values())
    record = TrialRecord.of(study.trials[0])
    assert record.baseline == "dense" and record.worker and record["params_ratio"] == 1.0  # early and late entries


def test_one_loaded_model_serves_two_studies_as_two_processes_would(measurer, tmp_path, tiny_llama_dir):
    """Two studies with other tasks and objectives on one loaded model (Measurer.for_study) give the
    numbers that two fresh ``dse run`` processes give."""
    (tmp_path / "base").mkdir()
    default = yaml.safe_load(write_study(tmp_path / "base", tiny_llama_dir).read_text())["evaluation"]
    arc = mutated(mutated(default, ("tasks",), ["arc_easy"]), ("perplexity", "text", "rows"), [1, 2])
    studies = {
        "piqa": {"n_trials": 3},
        "arc": {
            "name": "tiny-arc",
            "n_trials": 3,
            "objectives": ["perplexity", "params"],
            "seed": 1,
            "evaluation": arc,
        },
    }
    values = {}
    for how in ("reused", "fresh"):
        for name, overrides in studies.items():
            (tmp_path / how / name).mkdir(parents=True)
            path = write_study(tmp_path / how / name, tiny_llama_dir, **overrides)
            if how == "reused":
                study = run_study(load_study_config(path), measurer=measurer, progress=False)
            else:
                subprocess.run([sys.executable, "-m", "dse.cli", "run", str(path), "--quiet"], check=True)
                study = open_study(load_study_config(path), create=False)
            values[how, name] = [
                (TrialRecord.of(t).plan, t.values) for t in study.get_trials(states=(TrialState.COMPLETE,))
            ]
    for name in studies:
        reused, fresh = values["reused", name], values["fresh", name]
        assert len(reused) == len(fresh) == 3 and [p for p, _ in reused] == [p for p, _ in fresh]
        for (_, a), (_, b) in zip(reused, fresh):
            assert a == pytest.approx(b, rel=1e-6)
    assert values["reused", "piqa"] != values["reused", "arc"]  # each study measured its own tasks


def test_a_loaded_model_refuses_a_study_that_needs_another_model(measurer, tmp_path, tiny_llama_dir):
    config = fresh_config(tmp_path, tiny_llama_dir, dtype="bfloat16")
    with pytest.raises(StudyError, match=r"^dtype: study 'tiny-study' needs 'bfloat16'") as e:
        measurer.for_study(config)
    assert "\n" not in str(e.value)


def test_a_study_leaves_optunas_log_level_as_it_was(measurer, tmp_path, tiny_llama_dir):
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        run_study(fresh_config(tmp_path, tiny_llama_dir, n_trials=1), measurer=measurer, progress=False)
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(before)


def test_three_trials_end_to_end(measurer, tmp_path, tiny_llama_dir):
    config = fresh_config(tmp_path, tiny_llama_dir)
    study = run_study(config, measurer=measurer, progress=False)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3
    assert [TrialRecord.of(t).baseline for t in trials[:2]] == ["dense", "uniform-0.5"]
    base = study.user_attrs["baseline"]
    assert base["params_ratio"] == 1.0 and 0.0 <= base["accuracy"] <= 1.0 and base["perplexity"] > 1
    dense, uniform = TrialRecord.of(trials[0]), TrialRecord.of(trials[1])
    assert dense["accuracy"] == base["accuracy"] and dense["n_modules"] == 0
    assert uniform["n_modules"] == len(measurer.table) and uniform["params_ratio"] < 1.0
    for t in trials:
        a = TrialRecord.of(t)
        assert a.plan is not None and {
            "params",
            "bytes",
            "compression",
            "flops_per_token",
            "acc/piqa",
            "perplexity",
            "eval_seconds",
        } <= set(a.metrics)
        assert t.values == [a["accuracy"], a["params_ratio"]]
        assert math.isclose(a["compression"], 1 - a["params_ratio"])
    # the model is dense again after the study, bit for bit
    assert not is_decomposed(measurer.model)


def test_failed_trial_does_not_stop_study(measurer, tmp_path, tiny_llama_dir, monkeypatch):
    config = fresh_config(tmp_path, tiny_llama_dir, baselines=[])
    real_run, calls = measurer.evaluator.run, []

    def flaky(progress=True):
        calls.append(1)
        out = real_run(progress=progress)
        if len(calls) == 2:  # the first trial after the baseline gives NaN
            out["accuracy"] = float("nan")
        return out

    monkeypatch.setattr(measurer.evaluator, "run", flaky)
    study = run_study(config, measurer=measurer, progress=False)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and "not finite" in TrialRecord.of(failed[0]).error
    assert finished_trials(study) == 3


def test_resume_and_interrupt(measurer, tmp_path, tiny_llama_dir, monkeypatch):
    config = fresh_config(tmp_path, tiny_llama_dir, baselines=["dense"])
    run_study(config, n_trials=2, measurer=measurer, progress=False)
    first = [t.values for t in open_study(config, create=False).get_trials(states=(TrialState.COMPLETE,))]

    real_run = measurer.evaluator.run

    def interrupted(progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(measurer.evaluator, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, n_trials=4, measurer=measurer, progress=False)
    monkeypatch.setattr(measurer.evaluator, "run", real_run)
    study = open_study(config, create=False)
    assert [t.state for t in study.trials][-1] == TrialState.FAIL  # marked, not left RUNNING
    assert not is_decomposed(measurer.model)

    study = run_study(config, n_trials=4, measurer=measurer, progress=False)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 4 and [t.values for t in done[:2]] == first
    assert len(study.get_trials(states=(TrialState.RUNNING,))) == 0


def test_cli_run_and_status(tmp_path, tiny_llama_dir, capsys):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    path = write_study(tmp_path, tiny_llama_dir, n_trials=1, baselines=[])
    assert main(["run", str(path), "--quiet"]) == 0
    assert (tmp_path / "runs" / "tiny-study.db").is_file()  # default storage: SQLite beside the study
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-study" in out
    split = next(line for line in out.splitlines() if line.startswith("seconds per trial (median of 1): decompose "))
    assert all(f", {step} " in split for step in ("piqa", "perplexity", "restore", "evaluation"))
    assert main(["estimate", str(path)]) == 0  # the same split beside the memory figures
    assert split in capsys.readouterr().out.splitlines()
    study = optuna.load_study(study_name="tiny-study", storage=f"sqlite:///{tmp_path / 'runs' / 'tiny-study.db'}")
    assert finished_trials(study) == 1


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sampler": "tpee"}, "sampler"),
        ({"objectives": ["accuracy", "size"]}, "objectives[1]"),
        ({"n_trials": 0}, "n_trials"),
        ({"bogus": 1}, "bogus"),
        ({"constraints": {"max_params": 1.5}}, "constraints.max_params"),
        ({"baselines": [{"uniform": -1}]}, "baselines[0]"),
        ({"method": "nope"}, "method"),
        ({"dtype": "float8"}, "dtype"),
    ],
)
def test_bad_study_names_the_field(tmp_path, tiny_llama_dir, change, field):
    path = write_study(tmp_path, tiny_llama_dir, **change)
    with pytest.raises(ConfigError) as e:
        load_study_config(path)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_a_repeated_plan_is_not_evaluated_again(measurer, tmp_path, tiny_llama_dir, monkeypatch):
    space = {"name": "one", "model": str(tiny_llama_dir), "ranks": [2], "group": "shared"}
    config = fresh_config(tmp_path, tiny_llama_dir, space=space, baselines=[])
    real_run, calls = measurer.evaluator.run, []
    monkeypatch.setattr(measurer.evaluator, "run", lambda progress=True: calls.append(1) or real_run(progress))
    study = run_study(config, measurer=measurer, progress=False)
    first, *rest = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(calls) == 2  # the dense baseline and the one plan the space holds
    assert [TrialRecord.of(t).duplicate_of for t in rest] == [first.number, first.number]
    assert all(t.values == first.values for t in rest)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_studies_load(path):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    config = load_study_config(path)
    assert config.name == path.stem and config.n_trials >= 20
    evaluation = config.evaluation
    assert evaluation.tasks or evaluation.perplexity is not None or evaluation.similarity is not None
