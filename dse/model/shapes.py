"""Projection tables without weights: a model's decomposable modules from its config alone.

The model is built on the meta device (shapes only, no memory, no weights) and read with
:func:`dse.model.find_projections`, so every family adapter applies. Measured on a shared 2-core
CPU: Llama-2-7B from an inline config in about 1 s after the transformers import; SmolLM2-135M by
name about 7 s, most of it ``load_config`` parsing the GGUF file. Tables are cached per process.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Dict, Mapping, Optional

from ..core.errors import ConfigError
from .families import Projection, find_projections

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
    for key, value in kw.items():  # a shape torch cannot index, or layers that never finish building
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= LIMITS.get(key, 2**31 - 1):
            raise error(f"{where}.{key}: {value} is out of range (0..{LIMITS.get(key, 2**31 - 1)})")
    try:
        return AutoConfig.for_model(model_type, **kw)
    except ValueError as e:
        reason = str(e).splitlines()[0].split(". Should contain one of")[0]
        raise error(f"{where}.model_type: {reason}") from None
    except wrong_type as e:
        raise error(f"{where}: {' '.join(line.strip() for line in str(e).splitlines())}") from None


def projection_table(
    model: Optional[str] = None,
    model_config: Optional[Mapping[str, Any]] = None,
    *,
    family: Optional[str] = None,
    where: str = "model_config",
    error: type = ConfigError,
) -> Dict[str, Projection]:
    """The :func:`~dse.model.find_projections` table (of ``family``, else the one recognised) of
    ``model_config`` if given, else of ``model``."""
    return dict(find_projections(meta_model(model, model_config, where=where, error=error), family))


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
    try:
        key = None if model_config is None else json.dumps(model_config, sort_keys=True)
    except TypeError as e:
        raise error(f"{where}: expected numbers, strings and lists with string keys ({e})") from None
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
