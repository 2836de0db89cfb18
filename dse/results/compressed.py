"""Applying a rank config: a compressed model folder that loads again in one call.

``apply_config`` decomposes the model named in a rank config and writes a folder with the
transformers config, the tokenizer, ``dse_compressed.json`` (the rank config) and the weights:

* low-rank (default): ``model.safetensors`` holds the factors of every ``LowRankLinear``, so the
  file shrinks with the parameter cut; :func:`load_compressed` rebuilds the shells from the stored
  plan and loads the factors.
* merged (``merge=True``): each factor chain is multiplied back into a dense weight of the
  original shape, so plain ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it
  (no size saving; the approximation is kept).

The folder is written beside its final place and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import DseError, ExportError
from ..core.io import atomic_dir
from ..core.validate import read_json
from ..decompose import CalibrationSpec, LowRankLinear, SVDForm, calibrate, decompose_, get_method, restore_, swap_module
from ..model import auto_class, find_projections, load_model, resolve_device, resolve_dtype
from .rankconfig import CONFIG_FORMAT, RankConfig

META_FILE = "dse_compressed.json"
WEIGHTS_FILE = "model.safetensors"


def apply_config(config: RankConfig, out_dir, *, merge: bool = False, model=None, tokenizer=None,
                 device: Optional[str] = "cpu", cache=None, calibration=None, progress: bool = False) -> Path:
    """Write ``config`` applied to its model as a folder at ``out_dir``; return the folder.

    ``model`` and ``tokenizer`` default to ``dse.load_model(config.model)`` in the config's dtype;
    a model passed in is checked against the config and left as it was. ``cache`` (a
    :class:`dse.FactorCache`, e.g. a study's ``cache_dir``) reuses factorizations; ``calibration``
    is needed for data-aware methods (``asvd``, ``svdllm``).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:  # refuses an existing, non-empty out_dir before any work
        if model is None:
            model, tokenizer = load_model(config.model, device=device, dtype=config.dtype)
        config.check(model)
        table = find_projections(model, config.family)
        if config.plan.config.needs_calibration and calibration is None:
            if config.calibration is None:
                raise ExportError(f"config.calibration: method {config.plan.method} needs calibration statistics "
                                  "to rebuild its factors and the config names none; pass calibration=dse.calibrate(...)")
            try:
                spec = CalibrationSpec.from_dict(config.calibration)
            except DseError as e:
                raise ExportError(f"config.{e}") from None
            calibration = calibrate(model, tokenizer, spec, progress=progress, table=table)
        decompose_(model, config.plan, cache=cache, calibration=calibration, table=table, progress=progress)
        try:
            if merge:
                merged = {name: model.get_submodule(name) for name in config.plan.ranks}
                restore_(model)
                state = model.state_dict()
                for name, low_rank in merged.items():
                    w = low_rank.dense_weight()
                    state[f"{name}.weight"] = w.t().contiguous() if low_rank.transposed else w
                model.save_pretrained(tmp, state_dict=state)
            else:
                from safetensors.torch import save_model

                save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
                model.config.save_pretrained(tmp)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp)
        finally:
            restore_(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format": CONFIG_FORMAT, "merged": merge, "rank_config": config.to_dict()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir


def read_meta(path) -> dict:
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise ExportError(f"compressed model: {path} has no {META_FILE} (not written by `dse apply`?)")
    return read_json(path / META_FILE, "compressed model", ExportError)


def load_compressed(path, *, device: Optional[str] = "cpu"):
    """``(model, tokenizer)`` from a folder written by :func:`apply_config` (tokenizer ``None`` if absent).

    A low-rank folder is rebuilt as the dense architecture from its config with every planned
    module replaced by a ``LowRankLinear`` shell of the stored ranks, then filled from the
    safetensors file (strictly: every tensor must match).
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    meta = read_meta(path)
    config = RankConfig.from_dict(meta.get("rank_config"), f"{META_FILE}.rank_config")
    dtype = resolve_dtype(config.dtype)
    model_config = AutoConfig.from_pretrained(path)
    if meta.get("merged"):
        model = auto_class(model_config).from_pretrained(path, dtype=dtype)
    else:
        from safetensors.torch import load_model as load_safetensors

        model = auto_class(model_config).from_config(model_config, dtype=dtype)
        _insert_shells(model, config)
        load_safetensors(model, str(path / WEIGHTS_FILE), strict=True)
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _insert_shells(model, config: RankConfig) -> None:
    """Replace every planned module by a ``LowRankLinear`` whose factors have the stored shapes."""
    table = find_projections(model, config.family)
    config.plan.validate(table)
    method = get_method(config.plan.method)
    for name, rank in config.plan.ranks.items():
        p = table[name]
        k = p.full_rank
        blank = SVDForm(torch.zeros(p.out_features, k), torch.zeros(k), torch.zeros(k, p.in_features))
        swap_module(model, name, LowRankLinear.from_linear(model.get_submodule(name), method.truncate(blank, rank)))
