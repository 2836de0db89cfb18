"""Export and apply: study -> pareto -> plot -> export -> apply -> reload, and refusals of bad input.

The walk runs the real CLI verbs on a real tiny study (see ``test_results.build_study``);
reloaded models must give the logits of the decomposed model in memory (float32, same
operations: equal within 1e-5) and have the parameter count and file size the trial predicted.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import FAMILIES, make_tiny
from helpers import build_study

SAFETENSORS_HEADER_MAX = 64 * 1024  # JSON header of the weights file, bytes (SmolLM2: ~40 KB)


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    study, config, model = build_study(root, n_trials=12)
    return root, study, model


def _cli(*argv):
    from dse.cli import main

    return main([str(a) for a in argv])


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_walk_study_to_compressed_model(walked, capsys):
    from transformers import AutoModelForCausalLM

    import dse
    from dse.results.compressed import WEIGHTS_FILE, load_compressed
    from dse.results.front import pareto_front
    from dse.results.rankconfig import load_config_file

    root, study, model = walked
    yaml = root / "tiny.yaml"
    assert _cli("pareto", yaml, "--out", root / "tables") == 0
    printed = capsys.readouterr().out
    front = pareto_front(study)
    assert all(str(n) in printed for n in front["number"])
    pd.testing.assert_frame_equal(pd.read_parquet(root / "tables/front.parquet"), front, check_dtype=False)
    assert len(pd.read_csv(root / "tables/trials.csv")) == len(study.trials)

    assert _cli("plot", yaml, "--out", root / "plots") == 0
    assert (root / "plots/front.png").stat().st_size > 10_000 and (root / "plots/ranks.svg").exists()

    assert _cli("export", yaml, "--out", root / "best.json", "--max-params", 0.7) == 0
    config = load_config_file(root / "best.json", model)
    within = front[front["params_pct"] <= 70.0]
    assert config.source["trial"] == within.loc[within["accuracy"].idxmax(), "number"]
    assert config.metrics["params_ratio"] <= 0.7
    assert json.loads((root / "best.json").read_text())["format"] == 1

    assert _cli("export", yaml, "--out", root / "front", "--front") == 0
    assert len(list((root / "front").glob("trial-*.json"))) == len(front)

    assert _cli("apply", root / "best.json", "--out", root / "lowrank", "--quiet") == 0
    assert _cli("apply", root / "best.json", "--out", root / "merged", "--merge", "--quiet") == 0
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folders left

    dse.decompose_(model, config.plan)
    try:
        expected = _logits(model)
    finally:
        dse.restore_(model)
    reloaded, tokenizer = load_compressed(root / "lowrank")
    assert tokenizer is not None and tokenizer("w1 w2")["input_ids"] == [1, 2]
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)
    assert dse.param_count(reloaded) == config.metrics["params"]
    weights = (root / "lowrank" / WEIGHTS_FILE).stat().st_size
    assert 0 <= weights - 4 * config.metrics["params"] < SAFETENSORS_HEADER_MAX

    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    assert dse.param_count(merged) == config.metrics["params_base"]
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-5)  # merged in float64, cast


def test_select_trial_rules(walked):
    from dse.results.export import ExportError, select_trial
    from dse.results.front import pareto_front

    _, study, _ = walked
    front = pareto_front(study)
    by_number = front.set_index("number")
    floor = float(front["accuracy"].median())
    t = select_trial(study, min_accuracy=floor)  # the smallest config at or above the floor
    assert t.number == front[front["accuracy"] >= floor].sort_values("params_pct").iloc[0]["number"]
    base = study.user_attrs["baseline"]["accuracy"]
    drop = base - floor
    assert select_trial(study, max_drop=drop).number == select_trial(study, min_accuracy=base - drop).number
    t = select_trial(study, max_params=1.0)
    assert by_number.loc[t.number, "accuracy"] == front["accuracy"].max()
    with pytest.raises(ExportError, match="no rule given"):
        select_trial(study)
    with pytest.raises(ExportError, match=r"no front config has params_ratio <= 0.01; the front spans params_ratio"):
        select_trial(study, max_params=0.01)


def test_config_for_another_model_is_refused(walked, tmp_path):
    from dse.decompose import model_fingerprint
    from dse.model import find_projections
    from dse.results.compressed import apply_config
    from dse.results.export import ExportError, rank_config
    from dse.results.front import front_trials
    from dse.results.rankconfig import load_config_file

    _, study, _ = walked
    config = rank_config(study, front_trials(study)[0])
    path = config.save(tmp_path / "c.json")
    other = make_tiny("llama", seed=1)  # same shapes, other weights
    with pytest.raises(ExportError, match=r"config\.model\.fingerprint: the config was exported for model"):
        load_config_file(path, other)
    with pytest.raises(ExportError, match="fingerprint"):
        apply_config(config, tmp_path / "out", model=other)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
    smaller = make_tiny("mistral")  # two layers: layer 2 of the plan does not exist
    config.fingerprint = model_fingerprint(smaller, find_projections(smaller))
    with pytest.raises(ExportError, match=r"config\.plan\.ranks\['model\.layers\.2\..*no such decomposable module"):
        config.check(smaller)


def test_truncated_or_foreign_json_is_a_clear_error(walked, tmp_path):
    from dse.results.export import ExportError, rank_config
    from dse.results.front import front_trials
    from dse.results.rankconfig import load_config_file

    _, study, _ = walked
    text = json.dumps(rank_config(study, front_trials(study)[0]).to_dict())
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(ExportError, match=r"cut\.json is not valid JSON .*line 1 column \d+.*truncated"):
        load_config_file(tmp_path / "cut.json")
    (tmp_path / "plan.json").write_text(json.dumps({"format": 1, "ranks": {}}))
    with pytest.raises(ExportError, match=r"config\.model\.id: required"):
        load_config_file(tmp_path / "plan.json")
    with pytest.raises(ExportError, match="config: file not found"):
        load_config_file(tmp_path / "missing.json")


def test_no_completed_trials_and_occupied_out_are_refused(walked, tmp_path):
    import optuna

    from dse.results.compressed import apply_config
    from dse.results.export import export_front, rank_config, select_trial
    from dse.results.front import ResultsError, front_trials

    _, study, model = walked
    empty = optuna.create_study(directions=["maximize", "minimize"], study_name="empty")
    empty.set_user_attr("dse", dict(study.user_attrs["dse"]))
    with pytest.raises(ResultsError, match="study 'empty': no completed trials yet"):
        select_trial(empty, max_params=0.5)
    with pytest.raises(ResultsError, match="no completed trials"):
        export_front(empty, tmp_path / "front")
    assert not (tmp_path / "front").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    config = rank_config(study, front_trials(study)[0])
    with pytest.raises(FileExistsError, match="out: .*busy exists and is not an empty folder"):
        apply_config(config, tmp_path / "busy", model=model)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


@pytest.mark.slow
def test_smollm2_export_apply_load_compressed(smollm2, tmp_path):
    """k/v of every third SmolLM2 layer at half their parameters: export -> apply -> reload.

    The reloaded factors equal the in-memory ones bit for bit. Logits agree to float32 round-off
    only (atol 1e-3 on logits of magnitude ~20): the in-memory factors keep LAPACK's column-major
    layout while safetensors reloads them row-major, so the matrix products accumulate in another order.
    """
    from transformers import AutoModelForCausalLM

    import dse
    from dse.decompose import model_fingerprint, plan_size, uniform_plan
    from dse.model import find_projections
    from dse.results.compressed import WEIGHTS_FILE, apply_config, load_compressed
    from dse.results.export import RankConfig
    from dse.results.rankconfig import load_config_file

    model, tokenizer = smollm2
    table = find_projections(model)
    plan = uniform_plan(table, ratio=0.5, types={"k", "v"}, layers=range(0, 30, 3))
    size = plan_size(model, plan, table)
    config = RankConfig("smollm2-135m", model_fingerprint(model, table), "float32", plan, size.as_dict())
    path = config.save(tmp_path / "c.json")
    cache = dse.FactorCache()
    apply_config(load_config_file(path, model), tmp_path / "out", model=model, tokenizer=tokenizer, cache=cache)
    apply_config(config, tmp_path / "merged", model=model, tokenizer=tokenizer, cache=cache, merge=True)
    assert not dse.is_decomposed(model)

    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    dse.decompose_(model, plan, cache=cache)
    try:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        dse.restore_(model)
    reloaded, tok = load_compressed(tmp_path / "out")
    assert tok(" Paris").input_ids == tokenizer(" Paris").input_ids
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-3)
    assert dse.param_count(reloaded) == size.params_after
    weights = (tmp_path / "out" / WEIGHTS_FILE).stat().st_size
    assert 0 <= weights - 4 * size.params_after < SAFETENSORS_HEADER_MAX

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert dse.param_count(merged) == size.params_before
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-3)


def test_data_aware_config_rebuilds_its_calibration(tiny_llama_dir, tmp_path):
    """An exported svdllm config carries its calibration spec; apply recalibrates from it."""
    from conftest import BENCHMARKS

    from dse.decompose import CalibrationSpec, calibrate, decompose_, model_fingerprint, restore_, uniform_plan
    from dse.model import TextSource, find_projections, load_model
    from dse.results.compressed import apply_config, load_compressed
    from dse.results.export import ExportError, RankConfig

    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    model, tokenizer = load_model(str(tiny_llama_dir))
    table = find_projections(model)
    spec = CalibrationSpec(
        TextSource(path=str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"), field="page", rows=(40, 42)),
        n_samples=4,
        seq_len=32,
        seed=3,
    )
    config = RankConfig(
        str(tiny_llama_dir),
        model_fingerprint(model, table),
        "float32",
        uniform_plan(table, rank=4, method="svdllm"),
        calibration=json.loads(json.dumps(spec.to_dict())),
    )
    config = RankConfig.from_dict(json.loads(json.dumps(config.to_dict())))  # through JSON, as exported

    apply_config(config, tmp_path / "out")
    reloaded, _ = load_compressed(tmp_path / "out")
    decompose_(model, config.plan, calibration=calibrate(model, tokenizer, spec, progress=False))
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    restore_(model)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)

    without = RankConfig.from_dict({**config.to_dict(), "calibration": None})
    with pytest.raises(ExportError, match=r"^config\.calibration: method svdllm needs calibration"):
        apply_config(without, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_load_compressed_rebuilds_every_family_from_meta_shells(family, tmp_path):
    """Shells on the meta device, then the file's tensors assigned: the decomposed model's outputs,
    tied embeddings tied again, no tensor left on the meta device (buffers computed, not stored)."""
    import dse
    from dse.decompose import model_fingerprint
    from dse.results.compressed import apply_config, load_compressed
    from dse.results.rankconfig import RankConfig

    model = make_tiny(family).eval()
    table = dse.find_projections(model)
    config = RankConfig(family, model_fingerprint(model, table), "float32", dse.uniform_plan(table, 3))
    out = apply_config(config, tmp_path / "out", model=model)
    reloaded, _ = load_compressed(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    dse.decompose_(model, config.plan)
    try:
        with torch.no_grad():
            expected, got = model(ids), reloaded(ids)
    finally:
        dse.restore_(model)
    first = "logits" if "logits" in expected else "last_hidden_state"
    torch.testing.assert_close(got[first], expected[first], rtol=0, atol=1e-5)
    assert not any(t.is_meta for t in [*reloaded.parameters(), *reloaded.buffers()])
    assert dse.param_count(reloaded) == dse.plan_size(model, config.plan, table).params_after
    head = getattr(reloaded, "lm_head", None)
    if head is not None and getattr(reloaded.config, "tie_word_embeddings", False):
        assert head.weight is reloaded.get_input_embeddings().weight
