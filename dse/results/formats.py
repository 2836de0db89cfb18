"""Export formats: how a decomposed model's weights are written into a folder, each one registered
unit of :data:`FORMATS` (the built-ins register in :mod:`dse.results`).

The writers import torch and the decomposition when they run, so listing the formats needs neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.registry import Registry
from .rankconfig import RankConfig

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

    from ..model import host_state_dict

    tensors, metadata = _unshared(host_state_dict(model))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
    _save_config(model, folder)


def write_merged(model, config: RankConfig, folder: Path) -> None:
    """Each factor chain multiplied back into a dense weight, saved as transformers saves a model."""
    from ..decompose import restore_
    from ..model import host_state_dict

    merged = {name: model.get_submodule(name) for name in config.plan.ranks}
    restore_(model)
    state = host_state_dict(model)
    for name, low_rank in merged.items():
        w = low_rank.dense_weight()
        state[f"{name}.weight"] = w.t().contiguous() if low_rank.transposed else w
    model.save_pretrained(folder, state_dict=state)


def write_transformers(model, config: RankConfig, folder: Path) -> None:
    """The low-rank weights, a modeling file that builds them, and a config that names it."""
    from ..decompose import LowRankLinear
    from ..model import auto_class

    write_low_rank(model, config, folder)
    base = type(model)
    cls_name = f"DseLowRank{base.__name__}"
    (folder / MODELING_FILE).write_text(modeling_source(base.__name__, cls_name), encoding="utf-8")
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


def modeling_source(base: str, cls: str) -> str:
    """The modeling file of a ``transformers`` folder: ``cls``, a ``base`` whose listed projections
    are ``LowRankLinear`` shells of the stored sizes. Its ``LowRankLinear`` is dse's own class with
    an ``__init__`` that builds empty factors from sizes (named and shaped as dse's, so the same
    weights load) and :meth:`LowRankLinear.forward`'s source as it is."""
    import inspect
    import textwrap

    from ..decompose import LowRankLinear

    forward = textwrap.indent(textwrap.dedent(inspect.getsource(LowRankLinear.forward)), "    ")
    doc = inspect.getdoc(LowRankLinear).splitlines()[0]
    return MODELING.format(base=base, cls=cls, doc=doc, forward=forward)


MODELING = '''"""{cls}: a {base} whose listed projections are chains of low-rank factors.

Written by dse (design-space exploration of low-rank decompositions). It needs only torch and
transformers: ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. The config's
``dse_low_rank`` maps each decomposed module to its input and output sizes and its ranks.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base}


class LowRankLinear(nn.Module):
    """{doc}"""

    def __init__(self, in_features, out_features, ranks, bias):
        super().__init__()
        sizes = [in_features, *ranks, out_features]
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(o, i)) for i, o in zip(sizes, sizes[1:])])
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

{forward}

class {cls}({base}):
    def __init__(self, config):
        super().__init__(config)
        for name, spec in config.dse_low_rank.items():
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child,
                    LowRankLinear(spec["in"], spec["out"], spec["ranks"], spec["bias"]))
'''
