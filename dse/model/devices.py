"""Where a model's modules live: device maps, execution devices and offloaded weights.

A model loaded with a ``device_map`` (see :func:`dse.model.load_model`) is spread by accelerate:
each module computes on its *execution device*, and a module offloaded to the CPU (on a GPU host)
or to disk keeps its weights on the ``meta`` device between forward passes, loaded by an
accelerate hook for each call. Everything in ``dse`` that reads a weight or places a tensor asks
here: :func:`execution_device` (where a module computes), :func:`module_tensors` (its real
tensors, read back from the offload store if need be), :func:`input_device` (where a model's
inputs go) and :func:`host_state_dict` (every tensor, readable, for saving).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.validate import byte_size, is_int, mapping

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD_TARGETS = ("cpu", "disk")
DeviceMap = Union[str, Dict[str, Union[str, int]]]


def parse_device_map(value, where: str = "device_map") -> DeviceMap:
    """A device map as from_pretrained takes it: a strategy name (:data:`DEVICE_MAPS`) or an
    explicit map from module name (``""`` for the whole model) to ``cpu``, ``disk``, ``cuda``,
    ``cuda:N`` or a GPU index; CUDA entries need CUDA here."""
    if isinstance(value, str):
        if value not in DEVICE_MAPS:
            raise ConfigError(
                f"{where}: expected one of {', '.join(DEVICE_MAPS)} or a map of module -> device, got {value!r}"
            )
        return value
    entries = mapping(value, where)
    if not entries:
        raise ConfigError(f"{where}: the map is empty")
    for module, device in entries.items():
        _check_target(device, f"{where}.{module}" if module else f"{where}['']")
    return dict(entries)


def _check_target(device, where: str) -> None:
    if is_int(device) and device >= 0:
        cuda = True
    elif isinstance(device, str) and (
        device in OFFLOAD_TARGETS or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        cuda = device.startswith("cuda")
    else:
        raise ConfigError(f"{where}: expected cpu, disk, cuda, cuda:N or a GPU index, got {device!r}")
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"{where}: {device!r} requested but CUDA is not available here")


def parse_max_memory(value, where: str = "max_memory") -> Dict[Union[str, int], Union[str, int]]:
    """Memory per device for ``auto``/``balanced`` maps: ``{0: 20GiB, cpu: 64GiB}`` (a GPU index
    or ``cuda:N``, ``cpu``, ``disk``; bytes, or a size such as ``20GiB``)."""
    out: Dict[Union[str, int], Union[str, int]] = {}
    for device, size in mapping(value, where).items():
        at = f"{where}.{device}"
        if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
            device = int(device[5:])
        elif not (is_int(device) and device >= 0) and device not in OFFLOAD_TARGETS:
            raise ConfigError(f"{at}: expected a GPU index, cuda:N, cpu or disk")
        byte_size(size, at)
        out[device] = size
    return out


def _hooks(module: nn.Module):
    """The accelerate hooks on ``module`` (a ``SequentialHook`` unpacked), outermost first."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _offload_hook(module: nn.Module):
    return next((h for h in _hooks(module) if getattr(h, "offload", False)), None)


def is_offloaded(module: nn.Module) -> bool:
    """Whether ``module``'s own weights live in an offload store (``meta`` between calls)."""
    return _offload_hook(module) is not None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its
    first real parameter or buffer (the CPU for a module that has none)."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not is_int(device) else f"cuda:{device}")
    for t in list(module.parameters()) + list(module.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: the execution device of its input embeddings."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)


@contextmanager
def module_tensors(module: nn.Module, device: Optional[torch.device] = None) -> Iterator[nn.Module]:
    """``module`` with its own weights readable for the block (an offloaded module's are loaded
    from its store onto ``device``, by default its execution device, and put back after)."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, device):
        yield module


def host_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every offloaded tensor read back from its store (on the CPU)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not is_offloaded(module):
            continue
        with module_tensors(module, torch.device("cpu")):
            own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
            for key, tensor in own.items():
                state[f"{name}.{key}"] = tensor.detach()
    return state


def device_kwargs(
    device_map: Optional[DeviceMap], max_memory: Optional[Mapping] = None, offload_dir: Optional[str] = None
) -> Dict[str, Any]:
    """The from_pretrained keyword arguments of a placement (empty for none)."""
    if device_map is None:
        return {}
    out: Dict[str, Any] = {"device_map": device_map}
    if max_memory:
        out["max_memory"] = dict(max_memory)
    if offload_dir:
        out["offload_folder"] = str(offload_dir)
    return out
