"""Results of a real tiny study: trials table, feasible front, hypervolume, plots and status.

The study is run by :class:`dse.study.worker.Worker` on a tiny random llama saved to disk with a
word-level tokenizer (so ``dse.load_model`` can reload it by path). Its evaluator measures real
quantities of the decomposed model on fixed random tokens: ``perplexity`` and, per "task", the
top-1 agreement with the undecomposed model's predictions (1.0 for the dense model).
"""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
from helpers import build_study

from dse.results.record import TrialRecord


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    return build_study(tmp_path_factory.mktemp("study"))


def test_trials_frame_has_one_row_per_trial(tiny_study):
    from dse.results.front import trials_frame

    study, config, _ = tiny_study
    df = trials_frame(study)
    assert len(df) == len(study.trials) == config.n_trials
    assert list(df["number"]) == [t.number for t in study.trials]
    assert {"acc/task0", "acc/task1", "accuracy", "perplexity", "params_pct", "params_m"} <= set(df.columns)
    dense = df[df["baseline"] == "dense"].iloc[0]
    assert dense["params_pct"] == pytest.approx(100.0)
    assert dense["accuracy"] == pytest.approx(1.0)  # agreement with itself
    base = study.user_attrs["baseline"]
    assert dense["params_m"] == pytest.approx(base["params"] / 1e6)
    for _, row in df.iterrows():
        t = study.trials[row["number"]]
        assert row["params_pct"] == pytest.approx(100 * TrialRecord.of(t)["params_ratio"])
        assert row["feasible"] == (TrialRecord.of(t)["params_ratio"] <= 0.97)


def test_front_is_feasible_and_non_dominated(tiny_study):
    from dse.results.front import pareto_front, trials_frame

    study, _, _ = tiny_study
    df, front = trials_frame(study), pareto_front(study)
    assert len(front) >= 2
    assert front["feasible"].all()
    assert list(front["params_pct"]) == sorted(front["params_pct"])
    feasible = df[df["feasible"]]
    for _, f in front.iterrows():  # no feasible trial dominates a front member
        dom = (
            (feasible["accuracy"] >= f["accuracy"])
            & (feasible["params_pct"] <= f["params_pct"])
            & ((feasible["accuracy"] > f["accuracy"]) | (feasible["params_pct"] < f["params_pct"]))
        )
        assert not dom.any()
    for _, t in feasible.iterrows():  # every feasible non-front trial is dominated by the front
        if t["number"] in set(front["number"]):
            continue
        assert ((front["accuracy"] >= t["accuracy"]) & (front["params_pct"] <= t["params_pct"])).any()
    # Optuna's own front computation over the same feasible trials agrees.
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

    ours = [t for t in study.trials if t.number in set(feasible["number"])]
    assert {t.number for t in _get_pareto_front_trials_by_trials(ours, study.directions)} == set(front["number"])
    assert 100.0 not in set(front["params_pct"])  # the dense model violates max_params 0.97


def _hv_2d(points, ref):
    """Exact 2-D hypervolume of (loss1, loss2) points below ``ref`` by a sweep (test oracle)."""
    pts = sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1])
    hv, best_y = 0.0, ref[1]
    for i, (x, y) in enumerate(pts):
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        best_y = min(best_y, y)
        hv += (nxt - x) * (ref[1] - best_y)
    return hv


def test_hypervolume_history_matches_exact_2d(tiny_study):
    from dse.results.front import hypervolume_history, is_feasible

    study, _, _ = tiny_study
    hist = hypervolume_history(study)
    assert list(hist["number"]) == sorted(t.number for t in study.trials)
    assert (np.diff(hist["hypervolume"]) >= -1e-12).all()  # never decreases
    pts = [(-t.values[0], t.values[1]) for t in study.trials if is_feasible(t)]
    assert hist["hypervolume"].iloc[-1] == pytest.approx(_hv_2d(pts, (0.0, 1.0)), rel=1e-12)
    assert 0 < hist["hypervolume"].iloc[-1] <= 1.0
    tighter = hypervolume_history(study, reference={"accuracy": 0.5})
    assert tighter["hypervolume"].iloc[-1] == pytest.approx(_hv_2d(pts, (-0.5, 1.0)), rel=1e-12)


def test_bad_reference_and_empty_study_are_clear_errors(tiny_study):
    from dse.results.front import ResultsError, hypervolume_history, pareto_front, require_completed

    study, _, _ = tiny_study
    with pytest.raises(ResultsError, match=r"reference\.perplexity: not an objective"):
        hypervolume_history(study, reference={"perplexity": 10.0})
    empty = optuna.create_study(directions=["maximize", "minimize"])
    empty.set_user_attr("dse", {"objectives": ["accuracy", "params"], "tasks": ["task0"]})
    assert pareto_front(empty).empty
    with pytest.raises(ResultsError, match="no completed trials"):
        require_completed(empty)


def test_plots_are_written_and_labelled(tiny_study, tmp_path):
    from dse.results.plots import plot_front, save_plots

    study, _, _ = tiny_study
    ax = plot_front(study)
    assert "%" in ax.get_xlabel() and ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("dense" in label for label in labels) and any("uniform" in label for label in labels)
    paths = save_plots(study, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{stem}.{ext}" for stem in ("front", "hypervolume", "ranks", "tasks") for ext in ("png", "svg")
    )
    for p in paths:
        assert p.stat().st_size > 1000


def test_plans_side_by_side_show_each_rank_and_are_saved(tmp_path):
    from conftest import make_tiny

    from dse.decompose import Plan
    from dse.model import find_projections
    from dse.results.plots import plot_plans, save_figure

    table = find_projections(make_tiny("llama"))
    names = list(table)
    plans = {"one module": Plan({names[0]: 3}, "svd"), "two modules": Plan({names[1]: 2, names[-1]: 1}, "svd")}
    axes = plot_plans(plans, table, panel=(3, 4))
    assert [ax.get_title() for ax in axes] == list(plans)
    for ax, plan in zip(axes, plans.values()):
        texts = [t.get_text() for t in ax.texts]
        assert len(texts) == len(table)
        assert sorted(t for t in texts if t != "D") == sorted(str(r) for r in plan.ranks.values())
    paths = save_figure(axes[0].figure, tmp_path / "plans")
    assert [p.name for p in paths] == ["plans.png", "plans.svg"] and all(p.stat().st_size > 1000 for p in paths)


def test_module_heatmap_counts_front_configs(tiny_study):
    from dse.results.front import front_trials
    from dse.results.plots import module_usage

    study, _, _ = tiny_study
    usage = module_usage(study)
    front = front_trials(study)
    name = "model.layers.1.self_attn.q_proj"
    expected = sum(name in TrialRecord.of(t).plan["ranks"] for t in front) / len(front)
    assert usage.fraction.loc[1, "q"] == pytest.approx(expected)
    assert list(usage.fraction.columns) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert list(usage.fraction.index) == [0, 1, 2]


def test_status_lists_counts_baseline_and_front(tiny_study):
    from dse.results.status import format_status

    study, config, _ = tiny_study
    text = format_status(study)
    assert f"{config.n_trials} trials" in text and "complete" in text
    assert "baseline" in text and "front" in text
    split = next(line for line in text.splitlines() if line.startswith("seconds per trial (median of "))
    assert ": decompose " in split and ", restore " in split and ", evaluation " in split


def test_failed_and_running_trials_are_listed_but_not_on_the_front(tiny_study):
    from dse.results.front import hypervolume_history, pareto_front, trials_frame

    study, _, _ = tiny_study
    copy = optuna.create_study(directions=study.directions, study_name="copy")
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    copy.add_trials(study.trials)
    copy.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL, user_attrs={"error": "RuntimeError: out of memory"}
        )
    )
    running = copy.ask()
    df = trials_frame(copy)
    assert list(df["state"].iloc[-2:]) == ["FAIL", "RUNNING"]
    assert df["error"].iloc[-2] == "RuntimeError: out of memory"
    assert not df["feasible"].iloc[-2:].any()
    pd.testing.assert_frame_equal(pareto_front(copy), pareto_front(study))
    hist = hypervolume_history(copy)
    assert hist["hypervolume"].iloc[-1] == hypervolume_history(study)["hypervolume"].iloc[-1]
    copy.tell(running, state=optuna.trial.TrialState.FAIL)
