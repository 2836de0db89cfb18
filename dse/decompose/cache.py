"""The factor cache: each weight is factorized once; trials only truncate.

Keys are ``(model fingerprint, module name, method key)``; the method key includes the method's
options and, for data-aware methods, the calibration's key. A weight is factorized on its module's
execution device (see :mod:`dse.model.devices`; an offloaded weight is loaded there for it). The
full-rank forms are kept where ``memory`` says (a study's ``cache.memory``):

* ``device``: beside the module (fastest; a form is 1.5-2x its weight, so on a GPU it about
  doubles the model's memory);
* ``cpu``: in host memory; a trial truncates there and moves only the truncated factors to the
  module's device;
* ``none``: not kept; each lookup reads the form from ``directory`` (or factorizes again).

With a ``directory`` every form is also on disk, one ``.pt`` file per module written atomically,
so a restarted study (or another worker sharing the folder) does not factorize again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.io import atomic_path
from ..model import execution_device, module_tensors
from .methods import MethodConfig, SVDForm, get_method

Key = Tuple[str, str, str]
MEMORY = ("device", "cpu", "none")
CPU = torch.device("cpu")


def model_fingerprint(model: nn.Module, table: Mapping) -> str:
    """A short hash of the projections' names, shapes, dtypes and a strided sample of about 4096
    values of each weight (its first value included), read from the weights on every call.

    Replacing a weight or updating it in place (an optimizer step, ``load_state_dict``) gives a new
    fingerprint, so cached factors of the old weights are never reused; a change confined to
    unsampled entries is not seen. Nothing is memoised: about 0.1-0.2 s for SmolLM2-135M on a
    loaded 2-core CPU, the strided reads' cost; an offloaded weight is read from its store.
    """
    h = hashlib.sha256()
    for name in table:
        module = model.get_submodule(name)
        with module_tensors(module, CPU):  # an offloaded weight is read from its store
            w = module.weight
            flat = w.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        h.update(sample)
    return h.hexdigest()[:16]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w


def check_memory(memory: str, where: str = "cache.memory") -> str:
    if memory not in MEMORY:
        raise ConfigError(f"{where}: expected one of {', '.join(MEMORY)}, got {memory!r}")
    return memory


class FactorCache:
    """Store of :class:`SVDForm` per weight: in memory (``memory``, see the module doc) and, with a
    ``directory``, on disk.

    Forms are computed in float64 on the module's execution device and stored in the weight's
    dtype. ``hits`` and ``misses`` count lookups (a miss factorizes).
    """

    def __init__(self, directory: Optional[str | Path] = None, memory: str = "device"):
        self.directory = Path(directory) if directory else None
        self.memory = check_memory(memory)
        self._mem: Dict[Key, SVDForm] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._mem)

    def nbytes(self) -> int:
        """Bytes of the forms held in memory."""
        return sum(t.numel() * t.element_size() for f in self._mem.values() for t in (f.U, f.S, f.Vh))

    def _file(self, key: Key) -> Path:
        fp, name, method = key
        return self.directory / fp / method / f"{name}.pt"

    def _read(self, key: Key, device: torch.device) -> Optional[SVDForm]:
        if self.directory is None or not self._file(key).exists():
            return None
        try:
            data = torch.load(self._file(key), map_location=device, weights_only=True)
            return SVDForm(data["U"], data["S"], data["Vh"])
        except Exception:  # a torn or foreign file: recompute and overwrite it
            return None

    def form(self, key: Key, module: nn.Module, config: MethodConfig, stats=None) -> SVDForm:
        """The cached form for ``key``, factorizing ``module``'s weight on a miss."""
        if key in self._mem:
            self.hits += 1
            return self._mem[key]
        home = execution_device(module) if self.memory == "device" else CPU
        form = self._read(key, home)
        if form is None:
            self.misses += 1
            with module_tensors(module):
                weight = dense_weight(module)
                form = get_method(config.name).factorize(weight.double(), config, stats)
                form = form.to(dtype=weight.dtype, device=home)
            if self.directory is not None:
                with atomic_path(self._file(key)) as tmp:
                    torch.save({"U": form.U, "S": form.S, "Vh": form.Vh}, tmp)
        else:
            self.hits += 1
        if self.memory != "none":
            self._mem[key] = form
        return form
