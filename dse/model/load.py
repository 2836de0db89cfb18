"""Loading models: a hub id, a local folder, a GGUF file, or a built-in name.

Built-in names map to model files that Python packages ship (:mod:`dse.model.shipped`: found
with ``importlib.util.find_spec``, never imported), so the default study runs offline.

A decoder loads with its causal-LM head; an encoder with its own: the masked-LM head when the
checkpoint has one, else the bare encoder (``AutoModel``), never a random causal head
(:func:`auto_class`).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from typing import Mapping, Optional

import torch

from ..core.errors import ConfigError, ModelNotFoundError
from .devices import DeviceMap, device_kwargs
from .shipped import BUILTIN, model_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available here")
    return dev


def _not_found(name: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r}: not a built-in name ({', '.join(BUILTIN)}), a local folder or a .gguf "
        f"file, and the hub could not provide it ({type(err).__name__}: {str(err).splitlines()[0]})"
    )


def load_config(name: str):
    """The transformers config of a model, without loading weights."""
    from transformers import AutoConfig

    src, kw = model_source(name)
    try:
        return AutoConfig.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None


_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def auto_class(config):
    """The transformers Auto class for a checkpoint with ``config``: ``AutoModelForCausalLM`` for a
    decoder, ``AutoModelForMaskedLM`` for an encoder checkpoint with a masked-LM head, else
    ``AutoModel`` (an encoder without one: a sentence-embedding model, say). A config without
    ``architectures`` (made in code) gets the masked-LM head if its type has one, else the causal one."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = getattr(config, "architectures", None) or []
    causal, masked = (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )
    if any(a.endswith(_CAUSAL_HEADS) for a in architectures) and causal:
        return transformers.AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in architectures) or (not architectures and masked):
        return transformers.AutoModelForMaskedLM
    return transformers.AutoModel if architectures or not causal else transformers.AutoModelForCausalLM


def is_causal_lm(model) -> bool:
    """Whether ``model`` predicts the next token (lm-eval tasks, perplexity and decoding need it)."""
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin)


def is_masked_lm(model) -> bool:
    """Whether ``model`` has a masked-LM head (pseudo-perplexity needs it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())


def load_model(
    name: str = "smollm2-135m",
    *,
    device: str | None = "cpu",
    dtype="float32",
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[Mapping] = None,
    offload_dir: Optional[str] = None,
):
    """``(model, tokenizer)`` in eval mode on ``device`` in ``dtype``, with the checkpoint's own head
    (:func:`auto_class`; a GGUF file holds a decoder).

    With ``device_map`` (``auto``, ``balanced``, ``sequential`` or an explicit map, see
    :func:`dse.model.devices.parse_device_map`) accelerate spreads the modules instead, within
    ``max_memory`` per device, offloading what does not fit to the CPU or to ``offload_dir`` (a
    temporary folder, removed with the model, if none is given); ``device`` is then unused. A GGUF
    model is dequantized on load; its quantization marker is cleared so that ``save_pretrained``
    works (the tensors are plain already).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, kw = model_source(name)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device) if device_map is None else None
    scratch = tempfile.mkdtemp(prefix="dse-offload-") if device_map is not None and offload_dir is None else None
    placed = device_kwargs(device_map, max_memory, offload_dir or scratch)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        cls = AutoModelForCausalLM if "gguf_file" in kw else auto_class(AutoConfig.from_pretrained(src))
        model = cls.from_pretrained(src, dtype=torch_dtype, **kw, **placed)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
    finally:
        if scratch is not None and "model" not in locals():  # no model to own the offloaded weights
            shutil.rmtree(scratch, ignore_errors=True)
    if "gguf_file" in kw:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if scratch is not None:  # weights offloaded to disk live as long as the model
        weakref.finalize(model, shutil.rmtree, scratch, True)
    if dev is not None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    model.name_or_path = name
    return model, tokenizer
