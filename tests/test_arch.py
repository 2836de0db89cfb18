"""Architecture adapters: the projection table of every family, and clear errors for unknown ones."""

from __future__ import annotations

import pytest
from conftest import FAMILIES, make_tiny
from torch import nn

from dse.core.errors import ConfigError, ModelError
from dse.model import (FAMILIES as REGISTERED, Family, GENERIC, family_of, find_projections, register_family,
                       tensor_types)
from helpers import registered
from dse.decompose import decompose_, uniform_plan

# Per family: the tensor types of one layer, in canonical order.
EXPECTED_TYPES = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
    "mistral": ["q", "k", "v", "o", "gate", "up", "down"],
    "qwen2": ["q", "k", "v", "o", "gate", "up", "down"],
    "gemma": ["q", "k", "v", "o", "gate", "up", "down"],
    "gpt2": ["qkv", "o", "up", "down"],
    "opt": ["q", "k", "v", "o", "up", "down"],
    "bert": ["q", "k", "v", "o", "up", "down"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_projection_table_matches_the_modules(family):
    model = make_tiny(family)
    table = find_projections(model)
    n_layers = model.config.num_hidden_layers
    assert len(table) == n_layers * len(EXPECTED_TYPES[family])
    assert tensor_types(table) == EXPECTED_TYPES[family]
    assert [p.layer for p in table.values()] == sorted(p.layer for p in table.values())  # layer-major
    for name, p in table.items():
        module = model.get_submodule(name)
        assert p.name == name and f".{p.layer}." in name
        w = module.weight
        assert p.transposed == (family == "gpt2")
        assert (p.out_features, p.in_features) == (tuple(w.shape[::-1]) if p.transposed else tuple(w.shape))
        assert p.full_rank == min(w.shape)


def test_gqa_shapes_are_read_from_the_weights():
    table = find_projections(make_tiny("llama"))  # hidden 32, 4 heads, 2 kv heads of 8
    shapes = {p.type: (p.out_features, p.in_features) for p in table.values() if p.layer == 0}
    assert shapes == {"q": (32, 32), "k": (16, 32), "v": (16, 32), "o": (32, 32),
                      "gate": (48, 32), "up": (48, 32), "down": (32, 48)}


def test_gpt2_fused_qkv_is_transposed_conv1d():
    table = find_projections(make_tiny("gpt2"))
    qkv = table["transformer.h.0.attn.c_attn"]
    assert (qkv.type, qkv.out_features, qkv.in_features, qkv.transposed) == ("qkv", 96, 32, True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_table_is_the_same_on_a_decomposed_model(family):
    model = make_tiny(family)
    table = find_projections(model)
    decompose_(model, uniform_plan(table, 2))
    assert find_projections(model) == table


def test_unknown_model_type_lists_the_known_ones():
    model = make_tiny("llama")
    model.config.model_type = "mamba"
    with pytest.raises(ModelError, match=r"^family: model_type 'mamba' has no architecture adapter; known: ") as err:
        find_projections(model)
    message = str(err.value)
    assert all(t in message for fam in REGISTERED.values() for t in fam.model_types)
    assert f"family='{GENERIC}'" in message


def test_unknown_family_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"^family: unknown family 'mamba' \(did you mean 'llama'\?\); known: ") as err:
        find_projections(make_tiny("llama"), family="mamba")
    assert all(name in str(err.value) for name in list(REGISTERED) + [GENERIC])
    with pytest.raises(ConfigError, match=r"^family: unknown family 'lama' \(did you mean 'llama'\?\)"):
        find_projections(make_tiny("llama"), family="lama")


def test_generic_family_finds_every_linear_in_the_layers():
    model = make_tiny("llama")
    generic = find_projections(model, family=GENERIC)
    assert list(generic) == list(find_projections(model))
    assert {p.type for p in generic.values()} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"}
    assert tensor_types(generic) == sorted(p.type for p in generic.values() if p.layer == 0)


def test_generic_family_needs_a_module_list():
    with pytest.raises(ModelError, match="family generic: the model has no nn.ModuleList"):
        family_of(nn.Sequential(nn.Linear(2, 2)), GENERIC)


def test_family_without_its_projections_is_an_error():
    with registered(REGISTERED, "empty", Family("empty", (), "model.layers", {"attn.nothing": "q"})), \
            pytest.raises(ModelError, match=r"family empty: no projections found under 'model.layers'"):
        find_projections(make_tiny("llama"), family="empty")


def test_register_family_rejects_unknown_tensor_types():
    with pytest.raises(ValueError, match=r"family bad: unknown tensor type 'attn'"):
        register_family(Family("bad", ("bad",), "layers", {"self_attn": "attn"}))
    assert "bad" not in REGISTERED


def test_a_registered_family_is_found_by_model_type():
    model = make_tiny("llama")
    model.config.model_type = "my-llama"
    try:
        register_family(Family("mine", ("my-llama",), "model.layers", {"mlp.down_proj": "down"}))
        table = find_projections(model)
    finally:
        REGISTERED.unregister("mine")
    assert tensor_types(table) == ["down"] and len(table) == model.config.num_hidden_layers
