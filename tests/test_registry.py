"""The one registry behind every plug-in kind, a plug-in written in a test file alone, samplers by name
with options, and the line between a user's error (one line, exit 2) and a bug (a traceback, exit 1)."""

from __future__ import annotations

import logging
import math

import optuna
import pytest
from conftest import BENCHMARKS
from helpers import registered, write_study

from dse.cli import REGISTRIES, main
from dse.core.errors import ConfigError, DseError
from dse.core.registry import Registry
from dse.evaluate import OBJECTIVES, Objective
from dse.results.record import TrialRecord
from dse.study.samplers import SAMPLERS, parse_sampler


def test_register_get_and_did_you_mean():
    colours = Registry("colour")

    @colours.register("red")
    def red():
        """The colour of fire."""

    colours.register("green", "a plain value", help="grass")
    assert colours.get("red") is red and colours["green"] == "a plain value" and "red" in colours
    assert list(colours) == ["red", "green"] and colours.names() == ["green", "red"] and len(colours) == 2
    assert colours.describe() == "red    The colour of fire.\ngreen  grass"
    assert colours.where(callable) == ["red"]
    with pytest.raises(ConfigError, match=r"^paint: unknown colour 'rde' \(did you mean 'red'\?\); known: green, red$"):
        colours.get("rde", "paint")
    with pytest.raises(ConfigError, match=r"^colour: unknown colour 'blue'; known: green, red$"):
        colours.get("blue")
    with pytest.raises(ValueError, match="'red' is registered already"):
        colours.register("red", 1)
    colours.register("red", 2, replace=True)
    assert colours.unregister("red") == 2 and "red" not in colours


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_plug_in_kind_is_listed(kind, capsys):
    assert main(["list", kind]) == 0
    out = capsys.readouterr().out
    from dse.cli import _registry

    registry = _registry(kind)
    assert len(registry) > 0 and all(f"  {name}" in out for name in registry)


def test_a_new_objective_is_one_unit_in_this_file(tiny_llama_dir, tmp_path, capsys):
    """Registered here alone: it drives a study, and shows in dse status, dse pareto and the front plot."""
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    from dse.results.plots import plot_front, save_plots
    from dse.study.config import load_study_config
    from dse.study.runner import run_study

    bits = Objective(
        "bits",
        attribute="bits_per_token",
        direction="minimize",
        label="bits per token (log2 perplexity)",
        header="bits/token",
        fmt="{:.3f}",
        requires=lambda evaluation: None if evaluation.perplexity else "evaluation.perplexity",
        derive=lambda m: math.log2(m["perplexity"]) if "perplexity" in m else None,
    )
    with registered(OBJECTIVES, "bits", bits):
        path = write_study(tmp_path, tiny_llama_dir, objectives=["bits", "params"], n_trials=3)
        study = run_study(load_study_config(path), progress=False)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) == 3
        for t in done:
            assert t.values[0] == pytest.approx(math.log2(TrialRecord.of(t)["perplexity"]), rel=1e-12)
            assert TrialRecord.of(t)["bits_per_token"] == t.values[0]

        assert main(["status", str(path)]) == 0
        status = capsys.readouterr().out
        assert "objectives bits, params" in status and "bits_per_token" in status and "bits/token" in status
        assert main(["pareto", str(path)]) == 0
        assert "bits/token" in capsys.readouterr().out
        ax = plot_front(study)
        assert ax.get_ylabel() == bits.label
        assert {p.name for p in save_plots(study, tmp_path / "plots")} >= {"front.png", "hypervolume.png"}

        (tmp_path / "m").mkdir()
        no_text = write_study(
            tmp_path / "m",
            tiny_llama_dir,
            objectives=["bits", "params"],
            evaluation={"tasks": ["piqa"], "data_dir": str(BENCHMARKS)},
        )
        with pytest.raises(ConfigError, match=r"^objectives\[0\]: 'bits' needs evaluation.perplexity"):
            load_study_config(no_text)
    assert "bits" not in OBJECTIVES


@pytest.mark.parametrize(
    "data, name, options",
    [
        (None, "tpe", {}),
        ("random", "random", {}),
        ({"name": "tpe", "n_startup_trials": 4}, "tpe", {"n_startup_trials": 4}),
        (
            {"name": "nsga2", "population_size": 10, "crossover_prob": 0.5},
            "nsga2",
            {"population_size": 10, "crossover_prob": 0.5},
        ),
    ],
)
def test_sampler_by_name_or_with_options(data, name, options):
    config = parse_sampler(data)
    assert (config.name, dict(config.options)) == (name, options)
    sampler = config.make(seed=3)
    assert isinstance(sampler, SAMPLERS[name].cls)
    if name == "tpe":
        assert sampler._n_startup_trials == options.get("n_startup_trials", 8)  # dse's default is 8


@pytest.mark.parametrize(
    "data, message",
    [
        ("tpee", r"^sampler: unknown sampler 'tpee' \(did you mean 'tpe'\?\)"),
        ({"name": "tpee", "seed": 1}, r"^sampler.name: unknown sampler 'tpee'"),
        ({"name": "tpe", "n_startup": 3}, r"^sampler.n_startup: tpe has no such option \(known: .*n_startup_trials"),
        ({"name": "tpe", "gamma": 0.1}, r"^sampler.gamma: tpe has no such option"),  # a callable: not from a file
        ({"name": "tpe", "n_startup_trials": "8"}, r"^sampler.n_startup_trials: expected int, got '8'"),
        ({"name": "nsga2", "population_size": 1}, r"^sampler: nsga2 refuses these options: "),
        ({"name": "random", "seed": 1}, r"^sampler.seed: random has no such option"),  # the study's seed is used
        ([1], r"^sampler: expected a mapping"),
    ],
)
def test_bad_sampler_names_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_sampler(data)


def test_a_sampler_that_cannot_use_constraints_says_so(tiny_llama_dir, tmp_path, caplog):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    from dse.study.config import load_study_config
    from dse.study.runner import run_study

    assert not SAMPLERS["random"].honours_constraints and SAMPLERS["tpe"].honours_constraints
    path = write_study(tmp_path, tiny_llama_dir, constraints={"max_params": 0.9}, n_trials=1, baselines=["dense"])
    with caplog.at_level(logging.WARNING, logger="dse"):
        run_study(load_study_config(path), progress=False)
    assert any("sampler: random cannot steer by the study's constraints" in r.message for r in caplog.records)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import dse.cli

    def fixable(args):
        raise ConfigError("evaluation.limit: expected an integer >= 1, got 0")

    def bug(args):
        return {}["missing"]

    monkeypatch.setattr(dse.cli, "_cmd_space", fixable)
    assert main(["space", "x.yaml"]) == 2
    assert capsys.readouterr().err == "dse: error: evaluation.limit: expected an integer >= 1, got 0\n"
    monkeypatch.setattr(dse.cli, "_cmd_space", bug)
    assert main(["space", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "KeyError: 'missing'" in err
    assert issubclass(ConfigError, DseError) and not issubclass(KeyError, DseError)
