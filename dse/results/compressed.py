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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.errors import DseError, ExportError
from ..core.io import atomic_dir
from ..core.registry import Registry
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
from ..model import auto_class, find_projections, host_state_dict, load_model, resolve_device, resolve_dtype
from .rankconfig import CONFIG_FORMAT, RankConfig

META_FILE = "dse_compressed.json"
WEIGHTS_FILE = "model.safetensors"
MODELING_FILE = "modeling_dse_lowrank.py"


@dataclass(frozen=True)
class ExportFormat:
    """How a decomposed model is written: ``write(model, config, folder)`` with the model decomposed
    by the config's plan; ``low_rank``: the folder holds the factors (else dense merged weights)."""

    write: Callable
    low_rank: bool
    help: str = ""


FORMATS: Registry[ExportFormat] = Registry("format")


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


def _unshared(state: dict):
    """``(tensors, metadata)``: ``state`` with each storage once, kept under the first of its names
    in sorted order and the others recorded in the metadata, as ``safetensors.save_model`` does
    (tied weights; the loader ties them again)."""
    groups: dict = {}
    for name, tensor in state.items():
        where = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.numel() else name
        groups.setdefault(where, []).append(name)
    tensors, metadata = {}, {"format": "pt"}
    for names in groups.values():
        first, *others = sorted(names)
        tensors[first] = state[first].contiguous()
        metadata.update(dict.fromkeys(others, first))
    return tensors, metadata


def _save_config(model, folder: Path) -> None:
    if not getattr(model.config, "architectures", None):  # as save_pretrained does: the head reloads
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def write_low_rank(model, config: RankConfig, folder: Path) -> None:
    """The factors as they are (``model.safetensors``) and the dense architecture's config."""
    from safetensors.torch import save_file

    tensors, metadata = _unshared(host_state_dict(model))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
    _save_config(model, folder)


def write_merged(model, config: RankConfig, folder: Path) -> None:
    """Each factor chain multiplied back into a dense weight, saved as transformers saves a model."""
    merged = {name: model.get_submodule(name) for name in config.plan.ranks}
    restore_(model)
    state = host_state_dict(model)
    for name, low_rank in merged.items():
        w = low_rank.dense_weight()
        state[f"{name}.weight"] = w.t().contiguous() if low_rank.transposed else w
    model.save_pretrained(folder, state_dict=state)


def write_transformers(model, config: RankConfig, folder: Path) -> None:
    """The low-rank weights, a modeling file that builds them, and a config that names it."""
    write_low_rank(model, config, folder)
    base = type(model)
    cls_name = f"DseLowRank{base.__name__}"
    (folder / MODELING_FILE).write_text(MODELING.format(base=base.__name__, cls=cls_name))
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["architectures"] = [cls_name]
    data["auto_map"] = {auto_class(model.config).__name__: f"{MODELING_FILE[:-3]}.{cls_name}"}
    data["dse_low_rank"] = {
        name: {"in": m.in_features, "out": m.out_features, "ranks": list(m.ranks), "bias": m.bias is not None}
        for name in config.plan.ranks
        if isinstance(m := model.get_submodule(name), LowRankLinear)
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


MODELING = '''"""{cls}: a {base} whose listed projections are chains of low-rank factors.

Written by dse (design-space exploration of low-rank decompositions). It needs only torch and
transformers: ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. The config's
``dse_low_rank`` maps each decomposed module to its input and output sizes and its ranks.
"""

import torch
from torch import nn
from transformers import {base}


class LowRankLinear(nn.Module):
    """``y = x F1^T F2^T [F3^T] + b``: the factors in input-to-output order, each (out_i, in_i)."""

    def __init__(self, in_features, out_features, ranks, bias):
        super().__init__()
        sizes = [in_features, *ranks, out_features]
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(o, i)) for i, o in zip(sizes, sizes[1:])])
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        *rest, last = self.factors
        for factor in rest:
            x = nn.functional.linear(x, factor)
        return nn.functional.linear(x, last, self.bias)


class {cls}({base}):
    def __init__(self, config):
        super().__init__(config)
        for name, spec in config.dse_low_rank.items():
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child,
                    LowRankLinear(spec["in"], spec["out"], spec["ranks"], spec["bias"]))
'''


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
