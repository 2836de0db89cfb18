"""Applying a rank config: a compressed model folder that loads again in one call.

:func:`apply_config` decomposes the model named in a rank config and writes a folder with the
transformers config, the tokenizer, ``dse_compressed.json`` (the rank config and the format) and
the weights, in one of the :data:`FORMATS`:

* ``dse`` (default): ``model.safetensors`` holds the factors of every ``LowRankLinear``, so the file
  shrinks with the parameter cut; :func:`load_compressed` rebuilds the shells from the stored plan
  and loads the factors.
* ``transformers``: the same low-rank weights, plus a small modeling file of its own
  (``modeling_dse_lowrank.py``, named in the config's ``auto_map``): plain
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it where ``dse`` is
  not installed, at the low-rank size, and ``generate()``s. :func:`load_compressed` reads it too.
* ``merged``: each factor chain is multiplied back into a dense weight of the original shape, so
  plain ``from_pretrained(folder)`` loads it (no size saving; the approximation is kept).

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
from ..decompose import (
    CalibrationSpec,
    LowRankLinear,
    SVDForm,
    calibrate,
    decompose_,
    get_method,
    restore_,
    swap_module,
)
from ..model import auto_class, find_projections, load_model, resolve_device, resolve_dtype
from .formats import FORMATS, WEIGHTS_FILE, ExportFormat
from .rankconfig import CONFIG_FORMAT, RankConfig

META_FILE = "dse_compressed.json"


def decompose_config(config: RankConfig, model, tokenizer, *, cache=None, calibration=None, progress: bool = False):
    """Decompose ``model`` (checked to be the config's) in place by the config's plan, calibrating
    first when the method needs it and no ``calibration`` is given; return its projection table."""
    config.check(model)
    table = find_projections(model, config.family)
    if config.plan.config.needs_calibration and calibration is None:
        if config.calibration is None:
            raise ExportError(
                f"config.calibration: method {config.plan.method} needs calibration statistics "
                "to rebuild its factors and the config names none; pass calibration=dse.calibrate(...)"
            )
        try:
            spec = CalibrationSpec.from_dict(config.calibration)
        except DseError as e:
            raise ExportError(f"config.{e}") from None
        calibration = calibrate(
            model, tokenizer, spec, grad_moments=config.plan.config.needs_grad_moments, progress=progress, table=table
        )
    decompose_(model, config.plan, cache=cache, calibration=calibration, table=table, progress=progress)
    return table


def apply_config(
    config: RankConfig,
    out_dir,
    *,
    format: str = "dse",
    merge: bool = False,
    model=None,
    tokenizer=None,
    device: Optional[str] = "cpu",
    device_map=None,
    cache=None,
    calibration=None,
    progress: bool = False,
) -> Path:
    """Write ``config`` applied to its model as a folder at ``out_dir`` in ``format`` (one of
    :data:`FORMATS`; ``merge=True`` is ``format="merged"``); return the folder.

    ``model`` and ``tokenizer`` default to ``dse.load_model(config.model)`` in the config's dtype,
    on ``device`` or spread by ``device_map`` (offloaded weights are read back for saving); a
    model passed in is checked against the config and left as it was. ``cache`` (a
    :class:`dse.FactorCache`, e.g. a study's ``cache_dir``) reuses factorizations; ``calibration``
    is needed for data-aware methods (``asvd``, ``svdllm``).
    """
    format = "merged" if merge else format
    writer = FORMATS.get(format, "format", ExportError)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:  # refuses an existing, non-empty out_dir before any work
        if model is None:
            model, tokenizer = load_model(config.model, device=device, dtype=config.dtype, device_map=device_map)
        decompose_config(config, model, tokenizer, cache=cache, calibration=calibration, progress=progress)
        try:
            write_folder(model, tokenizer, config, tmp, writer, format)
        finally:
            restore_(model)
    return out_dir


def write_folder(model, tokenizer, config: RankConfig, folder: Path, writer: ExportFormat, format: str, **meta) -> None:
    """Write the decomposed ``model`` into ``folder`` with ``writer`` (the unit of ``format``), its
    tokenizer if any, and ``dse_compressed.json``: the rank config, the format and ``meta``."""
    writer.write(model, config, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    meta = {"format": CONFIG_FORMAT, "export": format, "rank_config": config.to_dict(), **meta}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def read_meta(path) -> dict:
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise ExportError(f"compressed model: {path} has no {META_FILE} (not written by `dse apply`?)")
    return read_json(path / META_FILE, "compressed model", ExportError)


def export_format(meta: dict) -> str:
    """The format a folder was written in (folders of dse 0.1.0 record only ``merged``)."""
    return meta.get("export") or ("merged" if meta.get("merged") else "dse")


def load_compressed(path, *, device: Optional[str] = "cpu"):
    """``(model, tokenizer)`` from a folder written by :func:`apply_config` (tokenizer ``None`` if absent).

    A low-rank folder (``dse`` or ``transformers``) is rebuilt as the dense architecture from its
    config on the meta device (buffers alone are real) with every planned module replaced by a
    ``LowRankLinear`` shell of the stored ranks, then given the safetensors file's tensors
    (``load_state_dict(assign=True)``, strictly: every tensor must match): no weight is allocated
    twice.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    meta = read_meta(path)
    config = RankConfig.from_dict(meta.get("rank_config"), f"{META_FILE}.rank_config")
    unit = FORMATS.get(export_format(meta), f"{META_FILE}.export", ExportError)
    dtype = resolve_dtype(config.dtype)
    model_config = AutoConfig.from_pretrained(path)
    if not unit.low_rank:
        model = auto_class(model_config).from_pretrained(path, dtype=dtype)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = auto_class(model_config).from_config(model_config, dtype=dtype)
            _insert_shells(model, config)
        model.load_state_dict(_read_weights(path / WEIGHTS_FILE), strict=True, assign=True)
        model.tie_weights()
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _read_weights(path: Path) -> dict:
    """The tensors of a file :func:`write_low_rank` wrote, each shared one under all its names again."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
        aliases = {k: v for k, v in (f.metadata() or {}).items() if k != "format" and v in state}
    return {**state, **{alias: state[first] for alias, first in aliases.items()}}


def _insert_shells(model, config: RankConfig) -> None:
    """Replace every planned module by a ``LowRankLinear`` whose factors have the stored shapes
    (on the meta device, as the model is)."""
    table = find_projections(model, config.family)
    config.plan.validate(table)
    method = get_method(config.plan.method)
    for name, rank in config.plan.ranks.items():
        p = table[name]
        k = p.full_rank
        blank = SVDForm(
            *(torch.empty(shape, device="meta") for shape in ((p.out_features, k), (k,), (k, p.in_features)))
        )
        swap_module(model, name, LowRankLinear.from_linear(model.get_submodule(name), method.truncate(blank, rank)))
