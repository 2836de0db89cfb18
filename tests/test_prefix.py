"""Prefix reuse (dse.evaluate.prefix): perplexity and the fast engine's per-request loglikelihoods
started at a plan's first decomposed layer, from kept dense hidden states, equal a full forward
(1e-5 relative perplexity, 1e-4 loglikelihoods) on every causal family, from several layers, with
layers offloaded to disk; anything that changes the prefix is seen; the store keeps its budget."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import FAMILIES, TINY
from helpers import dispatched, offload_map, token_ids
from test_engine import requests_of

from dse.core.errors import ConfigError
from dse.decompose import HealConfig, Plan, decompose_, restore_, temporarily_healed
from dse.evaluate import EvalConfig, Evaluator, perplexity
from dse.evaluate.engine import SharedContextLM
from dse.evaluate.prefix import PrefixStore
from dse.model import find_projections, is_offloaded

CAUSAL = [f for f in FAMILIES if TINY[f][2] is None]
LAYERS = 4


def deep_tiny(family: str, vocab: int = 97):
    """A tiny model of ``family`` (cf. conftest.make_tiny) with four layers."""
    cls_name, options, _ = TINY[family]
    deep = {"n_layer" if family == "gpt2" else "num_hidden_layers": LAYERS}
    if family == "gemma3_text":
        deep["layer_types"] = ["sliding_attention", "full_attention"] * 2
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**{**options, "vocab_size": vocab, **deep})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def from_layer(model, k: int) -> Plan:
    """Every projection of layers >= ``k`` at rank 3."""
    return Plan({n: 3 for n, p in find_projections(model).items() if p.layer >= k}, "svd")


def assert_same_perplexity(model, store, windows, k: int, kept: int = 2) -> None:
    """Perplexity from layer ``k`` twice equals the full forward's; the second run reuses ``kept`` batches."""
    decompose_(model, from_layer(model, k))
    try:
        want = perplexity(model, windows, 2)
        assert store.start() == k
        hits = store.counts["hits"]
        for _ in range(2):  # kept the first time, reused the second
            assert perplexity(model, windows, 2, prefix=store) == pytest.approx(want, rel=1e-5)
        assert store.counts["hits"] == hits + kept
    finally:
        restore_(model)


@pytest.mark.parametrize("family", CAUSAL)
def test_perplexity_from_every_layer_equals_a_full_forward(family):
    model = deep_tiny(family)
    store = PrefixStore(model, 10**8)
    windows = token_ids(batch=4, length=24, seed=4)
    for k in range(1, LAYERS):
        assert_same_perplexity(model, store, windows, k)
    assert store.start() == 0  # the dense model: nothing to start later from


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)


def loglikelihoods(model, tokenizer, requests, prefix=None):
    lm = SharedContextLM(model, tokenizer, batch_size=3, max_length=24)
    lm.prefix = prefix
    return lm.loglikelihood(requests)


def assert_same_loglikelihoods(model, tokenizer, requests, store, k: int) -> None:
    decompose_(model, from_layer(model, k))
    try:
        want = loglikelihoods(model, tokenizer, requests)
        for _ in range(2):
            got = loglikelihoods(model, tokenizer, requests, store)
            for (have, have_greedy), (expected, greedy) in zip(got, want):
                assert have == pytest.approx(expected, abs=1e-4) and have_greedy == greedy
    finally:
        restore_(model)


@pytest.mark.parametrize("family", CAUSAL)
def test_engine_from_later_layers_equals_a_full_forward(family, tokenizer, benchmarks_dir):
    """ARC requests truncated at 24 tokens, batches of 3: each context's cache is shared by its
    answers, so the skipped layers' stand-in cache entries must give the right positions and masks
    (Gemma 3's sliding window of 8 crossed)."""
    model = deep_tiny(family, len(tokenizer))
    requests = requests_of("arc_easy", benchmarks_dir, 6)
    store = PrefixStore(model, 10**9)
    for k in (1, 3):
        assert_same_loglikelihoods(model, tokenizer, requests, store, k)
    assert store.counts["hits"] == store.counts["misses"] > 0 and not store.counts["refused"]


@pytest.mark.parametrize("family", CAUSAL)
def test_offloaded_layers(family, tmp_path, tokenizer, benchmarks_dir):
    """Odd layers offloaded to disk (weights on meta between calls): skipped, and started from."""
    spread = dispatched(deep_tiny(family, len(tokenizer)), tmp_path, offload_map(deep_tiny(family)))
    store = PrefixStore(spread, 10**9)
    assert [any(map(is_offloaded, layer.modules())) for layer in store.layers] == [False, True, False, True]
    windows = token_ids(vocab=len(tokenizer), batch=4, length=24, seed=5)
    for k in (1, 2):
        assert_same_perplexity(spread, store, windows, k)
    assert_same_loglikelihoods(spread, tokenizer, requests_of("arc_easy", benchmarks_dir, 4), store, 3)


def test_a_changed_prefix_gives_new_numbers():
    """An in-place edit of a layer below the start (as healing norms does) or another dtype is
    seen: the run starts at the first changed layer, or at 0, also once the values are put back."""
    model = deep_tiny("llama")
    store = PrefixStore(model, 10**8)
    windows = token_ids(batch=4, length=24, seed=6)
    decompose_(model, from_layer(model, 3))
    perplexity(model, windows, 2, prefix=store)  # kept from layer 3
    norm = model.model.layers[1].input_layernorm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.mul_(1.5)
    assert store.start() == 1
    assert perplexity(model, windows, 2, prefix=store) == pytest.approx(perplexity(model, windows, 2), rel=1e-5)
    with torch.no_grad():
        norm.copy_(saved)
    assert store.start() == 1  # in-place changes are counted, not compared
    with torch.no_grad():
        model.model.embed_tokens.weight[5] += 1  # outside the layers: nothing is reused
    assert store.start() == 0
    restore_(model)
    model.double()
    decompose_(model, from_layer(model, 3))
    assert store.start() == 0
    assert perplexity(model, windows, 2, prefix=store) == perplexity(model, windows, 2)


@pytest.mark.parametrize("norms", [False, True])
def test_a_heal_reuses_only_an_unchanged_prefix(norms):
    """Healing the factors of layers >= 2 leaves the prefix: reused. Healing the norms too changes
    every layer: the run starts at 0, and still does once they are put back."""
    model = deep_tiny("llama")
    store = PrefixStore(model, 10**8)
    windows = token_ids(batch=4, length=24, seed=8)
    recipe = HealConfig(steps=3, seq_len=16, batch=2, lr=1e-2, norms=norms)
    decompose_(model, from_layer(model, 2))
    try:
        perplexity(model, windows, 2, prefix=store)  # kept from layer 2
        with temporarily_healed(model, token_ids(batch=8, length=16, seed=9), recipe, progress=False):
            assert store.start() == (0 if norms else 2)
            got = perplexity(model, windows, 2, prefix=store)
            assert got == pytest.approx(perplexity(model, windows, 2), rel=1e-5)
        assert store.start() == (0 if norms else 2)
    finally:
        restore_(model)
    assert store.counts["hits"] == (0 if norms else 2)


def test_the_store_keeps_its_budget():
    """Two batches of 2 x 24 x 32 float32 states each (6144 bytes): a budget of 8000 keeps one and
    refuses the other; a new start layer drops the least recently used one's states."""
    model = deep_tiny("llama")
    store = PrefixStore(model, 8000)
    windows = token_ids(batch=4, length=24, seed=7)
    for k in (2, 1):
        assert_same_perplexity(model, store, windows, k, kept=1)
        assert store.nbytes <= 8000 and list(store.kept) == [k] and len(store.kept[k]) == 1
    assert store.counts["refused"] == 2 * 2  # each start layer's second batch, in both runs


def test_the_switch(tiny_llama_dir, benchmarks_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = {
        "path": str(benchmarks_dir / "wikitext" / "wikitext2_raw_test_pages.jsonl"),
        "field": "page",
        "rows": [0, 1],
    }
    section = {
        "tasks": ["arc_easy"],
        "limit": 8,
        "batch_size": 4,
        "data_dir": str(benchmarks_dir),
        "perplexity": {"text": text, "window": 64, "max_tokens": 256},
    }
    on = Evaluator(model, tokenizer, EvalConfig.from_dict(section))
    off = Evaluator(model, tokenizer, EvalConfig.from_dict({**section, "reuse_prefix": False}))
    assert on.prefix is not None and on.lm.prefix is on.prefix and off.prefix is None and off.lm.prefix is None
    decompose_(model, from_layer(model, 2))
    try:
        want = off.run(progress=False)
        for _ in range(2):
            got = on.run(progress=False)
            assert got["acc/arc_easy"] == want["acc/arc_easy"]
            assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    finally:
        restore_(model)
    assert on.prefix.counts["hits"] == on.prefix.counts["misses"] > 0
    for value, message in [
        ("yes", "evaluation.reuse_prefix: must be true, false or auto, got 'yes'"),
        (1, "evaluation.reuse_prefix: must be true, false or auto, got 1"),
    ]:
        with pytest.raises(ConfigError, match=f"^{message}$"):
            EvalConfig(tasks=["piqa"], reuse_prefix=value)
    with pytest.raises(ConfigError, match="^evaluation.prefix_memory: expected bytes or a size such as 20GiB"):
        EvalConfig(tasks=["piqa"], prefix_memory="lots")
    assert EvalConfig(tasks=["piqa"], prefix_memory="1.5 GiB").prefix_bytes == int(1.5 * 2**30)
    hflm = {**section, "engine": "hflm", "perplexity": None, "reuse_prefix": True}
    with pytest.raises(ConfigError, match="^evaluation.reuse_prefix: only perplexity and the tasks"):
        Evaluator(model, tokenizer, EvalConfig.from_dict(hflm))
    assert Evaluator(model, tokenizer, EvalConfig.from_dict({**hflm, "reuse_prefix": "auto"})).prefix is None
