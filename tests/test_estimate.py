"""``dse estimate``: figures from a model's config alone, checked by hand for Llama-2-7B and against
measurements on the real SmolLM2-135M (within 20 %)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import BENCHMARKS

from dse.cli import main
from dse.study.config import load_study_config, study_config_from_dict
from dse.study.estimate import estimate, size

ROOT = Path(__file__).resolve().parents[1]
WIKI = str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl")


def _vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def test_llama2_7b_by_hand():
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    est = estimate(load_study_config(ROOT / "studies" / "llama2-7b-cluster.yaml"))
    d, f, layers = 4096, 11008, 32
    params = 2 * 32000 * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d  # embeddings, head, layers, norms
    assert est.line("model weights").device == 2 * params  # bfloat16, spread by a device map
    at_once = 8 * layers * (3 * (d * d + d) + (f * f + f))  # q/k/v, o, gate/up share inputs; down alone
    assert est.line("calibration at once").device == at_once and 43e9 < at_once < 45e9  # the issue's ~44 GB
    streamed = est.line("calibration streamed").device
    assert streamed == 8 * (3 * (d * d + d) + f * f + f) + 2 * 32 * 256 * d * 2 and streamed < at_once / 25
    assert est.line("calibration statistics on disk").disk == pytest.approx(at_once / 4, rel=1e-3)
    forms = layers * 2 * (4 * (2 * d * d + d) + 3 * (d * f + d + d * d))  # k = 4096: U m x k, S, Vh k x n
    assert est.line("factor cache (memory: cpu)").host == forms and est.line("factor cache on disk").disk == forms
    # d bfloat16 values per position; 4096 perplexity tokens: 33.6 MB of the 2 GB default budget
    prefix = est.line("prefix store, at most (8.2 kB per position and start layer, perplexity 33.6 MB)")
    assert prefix.device == 2 * 10**9 and 4096 * d * 2 == 33_554_432


def test_seventy_b_and_the_cli(capsys):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    assert main(["estimate", str(ROOT / "studies" / "llama2-70b-cluster.yaml")]) == 0
    out = capsys.readouterr().out
    d, f, kv, layers = 8192, 28672, 1024, 80  # grouped-query attention: k and v map 8192 -> 1024
    params = 2 * 32000 * d + layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d
    assert f"{params / 1e6:.1f} M parameters" in out and "per trial: unknown" in out
    at_once = 8 * layers * (3 * (d * d + d) + (f * f + f))
    assert re.search(rf"calibration at once\s+-\s+{at_once / 1e9:.1f} GB", out)  # the "several hundred GB"


@pytest.mark.slow
def test_smollm2_figures_match_measurements(smollm2, benchmarks_dir, tmp_path):
    """Each figure of the SmolLM2 study, measured: weights and cache bytes from the tensors,
    calibration peaks as the calibration counts them, disk from the files, and a trial as the
    factors it builds plus the process's peak memory while it is evaluated."""
    from dse.decompose import CalibrationSpec, FactorCache, LowRankLinear, calibrate, decompose_, factor_forms, restore_
    from dse.evaluate import Evaluator
    from dse.model import find_projections, model_bytes

    model, tokenizer = smollm2
    text = {"path": WIKI, "field": "page"}
    data = {
        "name": "estimate-check",
        "model": "smollm2-135m",
        "space": str(ROOT / "spaces" / "smollm2-layer-ranks.yaml"),
        "method": "svdllm",
        "calibration": {"text": {**text, "rows": [40, 62]}, "n_samples": 8, "seq_len": 128},
        "evaluation": {
            "tasks": [],
            "perplexity": {"text": {**text, "rows": [0, 6]}, "window": 512, "max_tokens": 2048},
        },
        "objectives": ["perplexity", "params"],
        "baselines": ["dense", {"ratio": 0.1}],
        "cache": {"dir": str(tmp_path / "cache")},
    }
    config = study_config_from_dict(data)
    est = estimate(config)
    table = find_projections(model)
    spec = config.calibration
    at_once = calibrate(model, tokenizer, spec, progress=False)
    cache = FactorCache(config.cache_dir)
    streamed_spec = CalibrationSpec(spec.text, spec.n_samples, spec.seq_len, spec.seed, streamed=True)
    streamed = calibrate(
        model,
        tokenizer,
        streamed_spec,
        cache_dir=config.cache_dir,
        progress=False,
        on_layer=lambda names, cal: factor_forms(model, names, config.method, cache=cache, calibration=cal),
    )
    forms_on_disk = sum(
        f.stat().st_size for f in Path(config.cache_dir).rglob("*.pt") if not f.parent.name.startswith("calibration-")
    )
    plan = config.baselines[1].plan(table, config.method)  # the ratio-0.1 cut: the study's largest plan
    decompose_(model, plan, cache=cache, calibration=streamed)
    try:
        factors = sum(
            f.numel() * f.element_size() for m in model.modules() if isinstance(m, LowRankLinear) for f in m.factors
        )
        evaluator = Evaluator(model, tokenizer, config.evaluation)
        _reset_peak()
        before = _vm("VmRSS")
        evaluator.run(progress=False)
        working = _vm("VmHWM") - before
    finally:
        restore_(model)
    measured = {
        "model weights": model_bytes(model),
        "calibration at once": at_once.peak_bytes,
        "calibration streamed": streamed.peak_bytes,
        "calibration statistics on disk": streamed.store.nbytes(),
        "factor cache (memory: device)": cache.nbytes(),
        "factor cache on disk": forms_on_disk,
        "one trial": factors + working,
    }
    print("\n| | estimated | measured |\n|---|---|---|")  # shown with pytest -s (docs/cluster.md)
    for what, value in measured.items():
        line = est.line(what)
        print(f"| {what} | {size(line.host + line.disk)} | {size(value)} |")
        assert value == pytest.approx(line.host + line.disk, rel=0.2), (what, value, line)
    assert torch.equal(streamed.stats_for(next(iter(table))).xtx, at_once.stats_for(next(iter(table))).xtx.float())


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"evaluation": {"tasks": ["piqaa"], "data_dir": str(BENCHMARKS)}, "objectives": ["accuracy", "params"]},
            r"evaluation\.tasks\[0\]: unknown task 'piqaa'",
        ),
        ({"baselines": [{"layers": [3, 40]}]}, r"baselines\.layers: layer 40 does not exist \(the model has 32\)"),
        (
            {"calibration": {"text": {"path": WIKI, "field": "text"}}},
            r"calibration\.text\.field: rows have no field 'text'",
        ),
        (
            {"evaluation": {"tasks": [], "perplexity": {"text": {"path": "/no/such.txt"}}}},
            r"evaluation\.perplexity\.text\.path: no such file '/no/such.txt'",
        ),
    ],
)
def test_estimate_refuses_what_run_refuses(change, message, tmp_path, capsys):
    """What would stop ``dse run`` once the model is loaded stops ``dse estimate`` too (one line)."""
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    import yaml

    study = yaml.safe_load((ROOT / "studies" / "llama2-7b-cluster.yaml").read_text())
    study["space"] = str(ROOT / "spaces" / "llama2-7b-layer-ranks.yaml")
    study["calibration"]["text"]["path"] = study["evaluation"]["perplexity"]["text"]["path"] = WIKI
    study["calibration"].update(change.get("calibration", {}))
    study.update({k: v for k, v in change.items() if k != "calibration"})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["estimate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(rf"dse: error: {message}", err), err
