"""``family:`` set in a study or a space is honoured everywhere: shapes, calibration, the worker,
export (the rank config records it), apply and load_compressed."""

from __future__ import annotations

import pytest
import torch
from helpers import registered, write_study

from dse.core.errors import ConfigError, ExportError, SpaceError
from dse.model import FAMILIES, Family, find_projections, load_model
from dse.results.rankconfig import RankConfig
from dse.results.record import TrialRecord
from dse.space import space_from_dict

ATTENTION = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o"}
TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
}


def test_space_family_chooses_the_table():
    space = {"name": "s", "model_config": TINY, "ranks": [1]}
    assert len(space_from_dict(space).table()) == 2 * 7
    generic = space_from_dict({**space, "family": "generic"}).table()
    assert sorted({p.type for p in generic.values()}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    with pytest.raises(SpaceError, match=r"^space.family: unknown family 'lama' \(did you mean 'llama'\?\)"):
        space_from_dict({**space, "family": "lama"})


def test_study_and_space_family_must_agree(tiny_llama_dir, tmp_path):
    from dse.study.config import load_study_config

    space = {"name": "s", "model": str(tiny_llama_dir), "ranks": [2, "dense"], "family": "llama"}
    assert load_study_config(write_study(tmp_path, tiny_llama_dir, space=space)).family == "llama"
    with pytest.raises(ConfigError, match=r"^family: 'gpt2', but the space says space.family: 'llama'$"):
        load_study_config(write_study(tmp_path, tiny_llama_dir, space=space, family="gpt2"))
    with pytest.raises(ConfigError, match=r"^family: unknown family 'nope'"):
        load_study_config(write_study(tmp_path, tiny_llama_dir, family="nope"))


def test_rank_config_family_is_checked():
    data = {
        "format": 1,
        "model": {"id": "m", "fingerprint": "f", "dtype": "float32", "family": "nope"},
        "plan": {"format": 1, "method": "svd", "ranks": {}},
    }
    with pytest.raises(ExportError, match=r"^config.model.family: unknown family 'nope'"):
        RankConfig.from_dict(data)


def test_a_chosen_family_is_honoured_from_calibration_to_reload(tiny_llama_dir, tmp_path, benchmarks_dir):
    """Only the attention projections, by a family registered for the study: the data-aware
    calibration holds their inputs alone, every plan touches them alone, and the exported config
    applies and reloads (its fingerprint is that family's table's)."""
    from dse import load_compressed
    from dse.results.compressed import apply_config
    from dse.results.export import rank_config
    from dse.study.config import load_study_config
    from dse.study.measure import Measurer
    from dse.study.runner import run_study

    wiki = {"path": str(benchmarks_dir / "wikitext/wikitext2_raw_test_pages.jsonl"), "field": "page", "rows": [0, 2]}
    with registered(FAMILIES, "attention", Family("attention", ATTENTION)):
        path = write_study(
            tmp_path,
            tiny_llama_dir,
            family="attention",
            method="svdllm",
            n_trials=3,
            calibration={"text": wiki, "n_samples": 4, "seq_len": 32},
            space={"name": "s", "model": str(tiny_llama_dir), "ranks": [2, "dense"], "group": "module"},
            evaluation={"tasks": [], "perplexity": {"text": wiki, "window": 64, "max_tokens": 128}},
            objectives=["perplexity", "params"],
            baselines=[{"uniform": 2}],
        )
        config = load_study_config(path)
        measurer = Measurer.from_config(config, progress=False)
        assert set(measurer.table) == {
            n
            for n in find_projections(measurer.model)
            if n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"}
        }
        assert set(measurer.calibration.stats) | set(measurer.calibration.aliases) == set(measurer.table)
        study = run_study(config, measurer=measurer, progress=False)
        assert study.user_attrs["dse"]["family"] == "attention"
        trial = next(t for t in study.trials if TrialRecord.of(t).baseline == "uniform-2")
        exported = rank_config(study, trial)
        assert exported.family == "attention" and set(exported.plan.ranks) == set(measurer.table)
        exported.save(tmp_path / "config.json")
        out = apply_config(exported, tmp_path / "out")
        compressed, _ = load_compressed(out)
        model, _ = load_model(str(tiny_llama_dir))
    ids = torch.tensor([[5, 7, 11, 13]])
    assert not torch.equal(compressed(ids).logits, model(ids).logits)  # decomposed, and loads by that family
    with pytest.raises(ExportError, match=r"^config.model.family: unknown family 'attention'"):
        RankConfig.from_dict(exported.to_dict())  # the family is gone: refused, not silently replaced
