"""Healing inside a study (``heal:`` with ``trials: all | front``) on the tiny Llama: healed
measures recorded beside the plain ones, the model restored bit-exact and the factor cache
unchanged, only the trials that join the front healed under ``trials: front``, the healing plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import BENCHMARKS
from helpers import assert_unchanged, snapshot, write_study
from optuna.trial import TrialState

from dse.results.plots import save_plots
from dse.results.record import TrialRecord
from dse.study.config import ConfigError, load_study_config
from dse.study.measure import Measurer
from dse.study.runner import run_study

PAGES = str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl")


def heal_block(trials: str = "all", **recipe) -> dict:
    """A short heal on WikiText-2 pages 12-13 (the study's perplexity reads pages 0-1)."""
    return {
        "text": {"path": PAGES, "field": "page", "rows": [12, 14]},
        "steps": 3,
        "batch": 2,
        "seq_len": 32,
        "lr": 1e-3,
        "trials": trials,
        **recipe,
    }


@pytest.fixture(scope="module")
def measurer(tiny_llama_dir, tmp_path_factory):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    path = write_study(tmp_path_factory.mktemp("w"), tiny_llama_dir, heal=heal_block())
    return Measurer.from_config(load_study_config(path), progress=False)


def forms(cache) -> dict:
    return {key: [t.clone() for t in (f.U, f.S, f.Vh)] for key, f in cache._mem.items()}


@pytest.mark.parametrize("norms", [False, True], ids=["factors", "factors+norms"])
def test_every_trial_is_healed_and_the_model_and_cache_are_left_as_they_were(measurer, tmp_path, tiny_llama_dir, norms):
    config = load_study_config(
        write_study(
            tmp_path,
            tiny_llama_dir,
            heal=heal_block(norms=norms),
            objectives=["accuracy_healed", "params"],
        )
    )
    measurer = measurer.for_study(config)
    before = snapshot(measurer.model)
    run_study(config, n_trials=2, measurer=measurer, progress=False)  # dense, then uniform: factors cached
    cached = forms(measurer.cache)
    study = run_study(config, n_trials=4, measurer=measurer, progress=False)
    assert_unchanged(measurer.model, before)
    after = forms(measurer.cache)
    assert cached and all(torch.equal(a, b) for k in cached for a, b in zip(cached[k], after[k]))
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 4
    for trial in done:
        record = TrialRecord.of(trial)
        assert trial.values[0] == record["accuracy_healed"]
        assert math.isfinite(record["perplexity_healed"]) and 0 <= record["accuracy_healed"] <= 1
        if record.get("n_modules"):
            assert record["heal_steps"] == 3 and len(record["heal_losses"]) == 3
            assert all(math.isfinite(v) for v in record["heal_losses"])
        else:  # the dense model has nothing to heal: its healed measures are its own
            assert record["heal_steps"] == 0
            assert record["perplexity_healed"] == pytest.approx(record["perplexity"], rel=1e-6)
            assert record["accuracy_healed"] == record["accuracy"]


def test_a_heal_changes_the_measures_of_a_decomposed_plan(measurer):
    """The healed measures are of another model than the plain ones (the heal trained it)."""
    plan = measurer.config.baselines[1].plan(measurer.table, measurer.config.method, model_params=measurer.model_params)
    plain, healed = measurer.measure(plan), measurer.measure_healed(plan)
    assert healed["heal_steps"] == 3
    assert not math.isclose(plain["perplexity"], healed["perplexity_healed"], rel_tol=1e-6)
    assert measurer.measure(plan)["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)  # restored


def test_trials_front_heals_only_trials_that_join_the_front(measurer, tmp_path, tiny_llama_dir):
    config = load_study_config(
        write_study(tmp_path, tiny_llama_dir, heal=heal_block("front"), objectives=["perplexity", "params"], n_trials=8)
    )
    study = run_study(config, measurer=measurer.for_study(config), progress=False)
    seen, healed, skipped = [], 0, 0
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(trial)
        point = np.array([record["perplexity"], record["params_ratio"]])
        dominated = any((p <= point).all() and (p < point).any() for p in seen)
        if record.duplicate_of is None and record.get("n_modules"):
            assert ("heal_steps" in record) == (not dominated), trial.number
            healed, skipped = healed + (not dominated), skipped + dominated
        seen.append(point)
    assert healed >= 1
    paths = save_plots(study, tmp_path / "plots", formats=("png",))
    assert {p.stem for p in paths} >= {"healed", "heal-loss"} and all(p.stat().st_size > 0 for p in paths)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"objectives": ["accuracy_healed", "params"]}, "objectives[0]: 'accuracy_healed' is measured after healing"),
        (
            {"objectives": ["perplexity_healed", "params"], "heal": heal_block("front")},
            "objectives[0]: 'perplexity_healed' is measured after healing",
        ),
        ({"heal": heal_block("some")}, "heal.trials: expected one of front, all, got 'some'"),
        ({"heal": heal_block(["all"])}, "heal.trials: expected one of front, all, got ['all']"),
    ],
)
def test_a_bad_heal_block_is_one_line(tmp_path, tiny_llama_dir, change, message):
    with pytest.raises(ConfigError) as e:
        load_study_config(write_study(tmp_path, tiny_llama_dir, **change))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
