"""Architecture families, recognised by structure: the projection table of every family and layout,
and one-line errors for unknown layouts."""

from __future__ import annotations

import pytest
from conftest import FAMILIES, make_tiny
from helpers import registered
from torch import nn

from dse.core.errors import ConfigError, ModelError
from dse.decompose import decompose_, uniform_plan
from dse.model import (
    FAMILIES as REGISTERED,
)
from dse.model import (
    GENERIC,
    Family,
    family_of,
    find_projections,
    register_family,
    tensor_types,
)

# Per family: the tensor types of one layer, in canonical order.
LLAMA = ["q", "k", "v", "o", "gate", "up", "down"]
EXPECTED = {  # model type: (family recognised, layer list, types of one layer in canonical order)
    "llama": ("llama", "model.layers", LLAMA),
    "mistral": ("llama", "model.layers", LLAMA),
    "qwen2": ("llama", "model.layers", LLAMA),
    "gemma": ("llama", "model.layers", LLAMA),
    "gemma3_text": ("llama", "model.layers", LLAMA),
    "phi3": ("phi3", "model.layers", ["qkv", "o", "gate_up", "down"]),
    "phi": ("phi", "model.layers", ["q", "k", "v", "o", "up", "down"]),
    "gpt2": ("gpt2", "transformer.h", ["qkv", "o", "up", "down"]),
    "opt": ("opt", "model.decoder.layers", ["q", "k", "v", "o", "up", "down"]),
    "bert": ("bert", "encoder.layer", ["q", "k", "v", "o", "up", "down"]),
    "bert_mlm": ("bert", "bert.encoder.layer", ["q", "k", "v", "o", "up", "down"]),
}


def test_every_registered_family_has_a_tiny_model():
    assert {family for family, _, _ in EXPECTED.values()} == set(REGISTERED) - {GENERIC}


@pytest.mark.parametrize("family", FAMILIES)
def test_projection_table_matches_the_modules(family):
    model = make_tiny(family)
    table = find_projections(model)
    name, layers, types = EXPECTED[family]
    assert (family_of(model).family, family_of(model).layers) == (name, layers)
    assert find_projections(model, family=name) == table
    n_layers = model.config.num_hidden_layers
    assert len(table) == n_layers * len(types)
    assert tensor_types(table) == types
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
    assert shapes == {
        "q": (32, 32),
        "k": (16, 32),
        "v": (16, 32),
        "o": (32, 32),
        "gate": (48, 32),
        "up": (48, 32),
        "down": (32, 48),
    }


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


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "bert"])
def test_family_is_recognised_whatever_the_model_type(model_type):
    model = make_tiny(model_type)
    table = find_projections(model)
    model.config.model_type = "brand_new_2031"
    assert find_projections(model) == table


def test_fused_projections_keep_their_shapes():
    table = find_projections(make_tiny("phi3"))  # hidden 32, 4 heads, 2 kv heads of 8; intermediate 48
    shapes = {p.type: (p.out_features, p.in_features) for p in table.values() if p.layer == 0}
    assert shapes == {"qkv": (32 + 2 * 16, 32), "o": (32, 32), "gate_up": (2 * 48, 32), "down": (32, 48)}


def test_unknown_layout_is_one_line_listing_what_was_found():
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.ModuleDict({"mix": nn.Linear(4, 4), "out": nn.Linear(4, 2)}) for _ in range(3))
    with pytest.raises(ModelError) as err:
        find_projections(model)
    message = str(err.value)
    assert message.startswith(
        "family: no known family (llama, phi3, phi, gpt2, opt, bert) recognises Module: "
        "found blocks (3 x ModuleDict) holding mix, out; "
    )
    assert f"set family: {GENERIC}" in message and "\n" not in message
    assert [p.type for p in find_projections(model, GENERIC).values()] == ["mix", "out"] * 3
    with pytest.raises(ModelError, match=r"^family: no known family .* the model has no nn.ModuleList of layers"):
        find_projections(nn.Sequential(nn.Linear(2, 2)))


def test_unknown_family_name_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"^family: unknown family 'mamba' \(did you mean 'llama'\?\); known: "
    ) as err:
        find_projections(make_tiny("llama"), family="mamba")
    assert all(name in str(err.value) for name in list(REGISTERED) + [GENERIC])
    with pytest.raises(ConfigError, match=r"^family: unknown family 'lama' \(did you mean 'llama'\?\)"):
        find_projections(make_tiny("llama"), family="lama")


def test_generic_family_finds_every_linear_in_the_layers():
    model = make_tiny("llama")
    generic = find_projections(model, family=GENERIC)
    assert list(generic) == list(find_projections(model))
    assert {p.type for p in generic.values()} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert tensor_types(generic) == sorted(p.type for p in generic.values() if p.layer == 0)


def test_generic_family_needs_a_module_list():
    with pytest.raises(ModelError, match="family: generic does not fit this model \\(the model has no nn.ModuleList"):
        family_of(nn.Sequential(nn.Linear(2, 2)), GENERIC)


def test_family_without_its_projections_is_an_error():
    with (
        registered(REGISTERED, "empty", Family("empty", {"attn.nothing": "q"})),
        pytest.raises(
            ModelError,
            match=r"^family: empty does not fit this model \(found model.layers \(3 x "
            r"LlamaDecoderLayer\) holding self_attn.q_proj, ",
        ),
    ):
        find_projections(make_tiny("llama"), family="empty")


def test_register_family_rejects_unknown_tensor_types():
    with pytest.raises(ValueError, match=r"family bad: unknown tensor type 'attn'"):
        register_family(Family("bad", {"self_attn": "attn"}))
    assert "bad" not in REGISTERED


def test_a_registered_family_wins_where_its_layers_hold_more_of_its_names():
    model = make_tiny("llama")
    names = {
        "self_attn.q_proj": "q",
        "self_attn.k_proj": "k",
        "self_attn.v_proj": "v",
        "self_attn.o_proj": "o",
        "mlp.gate_proj": "gate",
        "mlp.up_proj": "up",
        "mlp.down_proj": "down",
    }
    with registered(REGISTERED, "mine", Family("mine", {"mlp.down_proj": "down"})):
        assert family_of(model).family == "llama"  # 7 names against 1
        table = find_projections(model, family="mine")
    assert tensor_types(table) == ["down"] and len(table) == model.config.num_hidden_layers
    model.model.layers[0].mlp.extra_proj = nn.Linear(48, 32)
    with registered(REGISTERED, "mine", Family("mine", {**names, "mlp.extra_proj": "down"})):
        assert family_of(model).family == "mine"
