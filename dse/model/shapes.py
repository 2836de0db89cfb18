"""Projection tables without weights: a model's decomposable modules from its config alone.

A family with a ``shapes`` rule (the ``llama`` layout: :func:`llama_layout`) reads them from the
config's fields, which are read without transformers and torch: an inline ``model_config``, a
folder's or the hub's ``config.json``, a GGUF file's metadata (``dse space`` stays torch-free).
Any other model is built on the meta device (shapes only, no memory, no weights) and read with
:func:`dse.model.find_projections`, so every family adapter applies. Measured on a shared 2-core
CPU: Llama-2-7B from an inline config in about 1 s on the meta device after the transformers
import; SmolLM2-135M by name about 7 s that way, most of it ``load_config`` parsing the GGUF file.
Tables are cached per process.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..core.errors import ConfigError
from .families import ConfigLayout, Projection, find_projections, projections_from_config
from .shipped import model_source

# Layer counts past this never finish building on the meta device (a typo, not a model).
LIMITS = {key: 4096 for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers")}


def config_from_dict(data: Mapping[str, Any], where: str = "model_config", error: type = ConfigError):
    """A transformers config from a plain dict that names its ``model_type``."""
    from huggingface_hub import errors as hub_errors
    from transformers import AutoConfig

    wrong_type = (TypeError, getattr(hub_errors, "StrictDataclassError", TypeError))  # strict config fields
    kw = dict(data)
    model_type = kw.pop("model_type", None)
    if not isinstance(model_type, str):
        raise error(f"{where}.model_type: expected a transformers model type, got {model_type!r}")
    _check_ranges(kw, where, error)
    try:
        return AutoConfig.for_model(model_type, **kw)
    except ValueError as e:
        reason = str(e).splitlines()[0].split(". Should contain one of")[0]
        raise error(f"{where}.model_type: {reason}") from None
    except wrong_type as e:
        raise error(f"{where}: {' '.join(line.strip() for line in str(e).splitlines())}") from None


def _check_ranges(fields: Mapping[str, Any], where: str, error: type) -> None:
    for key, value in fields.items():  # a shape torch cannot index, or layers that never finish building
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= LIMITS.get(key, 2**31 - 1):
            raise error(f"{where}.{key}: {value} is out of range (0..{LIMITS.get(key, 2**31 - 1)})")


# Model types whose causal-LM class keeps Llama's layout (model.layers.N.self_attn.{q,k,v,o}_proj,
# mlp.{gate,up,down}_proj), and those whose config derives head_dim as hidden_size / heads when it
# is left out (the others default it to a constant); tests/test_shapes.py checks both against
# the models transformers builds.
LLAMA_LAYOUT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_DERIVED_HEAD_DIM = ("llama", "mistral", "qwen2")
# GGUF architectures whose transformers model type differs (as transformers' GGUF loader renames)
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def llama_layout(fields: Mapping[str, Any]) -> Optional[ConfigLayout]:
    """The ``llama`` family's layout from config fields (a :class:`~dse.model.Family` ``shapes``
    rule) of a model that loads with its causal-LM head; ``None`` for another model type or head, or a
    field missing or not a positive integer."""
    model_type, architectures = fields.get("model_type"), fields.get("architectures") or []
    if model_type not in LLAMA_LAYOUT_TYPES:
        return None
    if (
        not isinstance(architectures, list)
        or architectures
        and not any(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures)
    ):
        return None  # another head (dse.model.auto_class): its modules are not under model.layers
    defaults = {"num_key_value_heads": fields.get("num_attention_heads")} if model_type == "llama" else {}
    if model_type in _DERIVED_HEAD_DIM and _positive(fields.get("num_attention_heads")):
        defaults["head_dim"] = _positive(fields.get("hidden_size")) // fields["num_attention_heads"]
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    sizes = [fields.get(key, defaults.get(key)) for key in keys + ("num_hidden_layers",)]
    if not all(_positive(v) for v in sizes):
        return None
    hidden, inter, heads, kv, head_dim, count = sizes
    attn, kv_out = heads * head_dim, kv * head_dim
    return (
        "model.layers",
        count,
        {
            "self_attn.q_proj": (attn, hidden),
            "self_attn.k_proj": (kv_out, hidden),
            "self_attn.v_proj": (kv_out, hidden),
            "self_attn.o_proj": (hidden, attn),
            "mlp.gate_proj": (inter, hidden),
            "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter),
        },
    )


def _positive(value) -> int:
    """``value`` if it is a positive integer, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def config_fields(model: str) -> Optional[Dict[str, Any]]:
    """The config of ``model`` as plain fields, read without transformers' model code (so without
    torch): a folder's ``config.json``, a GGUF file's metadata by transformers' own GGUF key map,
    the hub's ``config.json``; ``None`` where that is not possible (the caller then builds the
    model on the meta device, which says why in one line if it cannot either)."""
    src, kw = model_source(model)
    folder = Path(src)
    if "gguf_file" in kw:
        return _gguf_fields(folder / kw["gguf_file"])
    if folder.is_dir():
        path = folder / "config.json"
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        try:
            path = Path(hf_hub_download(src, "config.json"))
        except (HfHubHTTPError, OSError, ValueError):  # offline, unknown or malformed id
            return None
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return fields if isinstance(fields, dict) else None


def _gguf_fields(path: Path) -> Optional[Dict[str, Any]]:
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    keys = GGUF_CONFIG_MAPPING.get(arch)
    if keys is None:
        return None
    fields: Dict[str, Any] = {"model_type": _GGUF_MODEL_TYPES.get(arch, arch)}
    for key, name in keys.items():
        field = reader.fields.get(f"{arch}.{key}")
        if field is not None and isinstance(name, str):
            fields[name] = field.contents()
    return fields


def projection_table(
    model: Optional[str] = None,
    model_config: Optional[Mapping[str, Any]] = None,
    *,
    family: Optional[str] = None,
    where: str = "model_config",
    error: type = ConfigError,
) -> Dict[str, Projection]:
    """The :func:`~dse.model.find_projections` table (of ``family``, else the one recognised) of
    ``model_config`` if given, else of ``model``: from the config's fields where a family's
    ``shapes`` rule knows them, else from the model built on the meta device."""
    return dict(_cached_table(model, _config_key(model_config, where, error), family, where, error))


def _config_key(model_config: Optional[Mapping[str, Any]], where: str, error: type) -> Optional[str]:
    try:
        return None if model_config is None else json.dumps(model_config, sort_keys=True)
    except TypeError as e:
        raise error(f"{where}: expected numbers, strings and lists with string keys ({e})") from None


@lru_cache(maxsize=8)
def _cached_table(
    model: Optional[str], config_json: Optional[str], family: Optional[str], where: str, error: type
) -> Dict[str, Projection]:
    if config_json is None and model is None:
        raise error(f"{where}: give a model name or a model_config")
    if config_json is not None:
        fields = json.loads(config_json)
        _check_ranges(fields, where, error)
    else:
        fields = config_fields(model)
    table = projections_from_config(fields, family) if fields is not None else None
    if table:
        return table
    return find_projections(_cached_meta(None if config_json else model, config_json, where, error), family)


def meta_model(
    model: Optional[str] = None,
    model_config: Optional[Mapping[str, Any]] = None,
    *,
    where: str = "model_config",
    error: type = ConfigError,
):
    """The model of ``model_config`` if given, else of ``model``, built on the meta device (shapes,
    no weights; one per config per process) with the head it loads with
    (:func:`dse.model.auto_class`), so module names match the loaded model's."""
    if model_config is None and model is None:
        raise error(f"{where}: give a model name or a model_config")
    key = _config_key(model_config, where, error)
    return _cached_meta(None if key else model, key, where, error)


@lru_cache(maxsize=8)
def _cached_meta(model: Optional[str], config_json: Optional[str], where: str, error: type):
    import torch

    from .load import auto_class

    if config_json is not None:
        config = config_from_dict(json.loads(config_json), where, error)
    else:
        from .load import load_config

        config = load_config(model)
    with torch.device("meta"):
        return auto_class(config).from_config(config)
