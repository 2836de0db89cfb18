"""The factor cache: each weight is factorized once; trials only truncate.

Keys are ``(model fingerprint, module name, method key)``; the method key includes the method's
options and, for data-aware methods, the calibration's key. Entries live in memory and,
when a directory is given, on disk as one ``.pt`` file per module written atomically, so a
restarted study (or another worker on the same host) does not factorize again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..core.io import atomic_path
from .methods import MethodConfig, SVDForm, get_method

Key = Tuple[str, str, str]


def model_fingerprint(model: nn.Module, table: Mapping) -> str:
    """A short hash of the projections' names, shapes, dtypes and a strided sample of values.

    Memoized on the model (``model._dse_fingerprint``) for as long as no projection weight is
    replaced or changed in place (each weight's storage and autograd version counter are part of
    the memo): fine-tuning or loading new weights gives a new fingerprint, so cached factors of
    the old weights are never reused. Cheap even for 7B models.
    """
    weights = [model.get_submodule(name).weight for name in table]
    state = tuple((name, w.data_ptr(), w._version) for name, w in zip(table, weights))
    cached = getattr(model, "_dse_fingerprint", None)
    if cached and cached[0] == state:
        return cached[1]
    h = hashlib.sha256()
    for name, w in zip(table, weights):
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        h.update(sample)
    fp = h.hexdigest()[:16]
    model._dse_fingerprint = (state, fp)
    return fp


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w


class FactorCache:
    """In-memory (and optionally on-disk) store of :class:`SVDForm` per weight.

    Forms are computed in float64 and stored in ``dtype`` (the model's by default) on the
    weight's device. ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, directory: Optional[str | Path] = None):
        self.directory = Path(directory) if directory else None
        self._mem: Dict[Key, SVDForm] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._mem)

    def _file(self, key: Key) -> Path:
        fp, name, method = key
        return self.directory / fp / method / f"{name}.pt"

    def form(self, key: Key, module: nn.Module, config: MethodConfig, stats=None) -> SVDForm:
        """The cached form for ``key``, factorizing ``module``'s weight on a miss."""
        if key in self._mem:
            self.hits += 1
            return self._mem[key]
        weight = dense_weight(module)
        form = None
        if self.directory is not None and self._file(key).exists():
            try:
                data = torch.load(self._file(key), map_location=weight.device, weights_only=True)
                form = SVDForm(data["U"], data["S"], data["Vh"])
            except Exception:  # a torn or foreign file: recompute and overwrite it
                form = None
        if form is None:
            self.misses += 1
            form = get_method(config.name).factorize(weight.double(), config, stats)
            form = form.to(dtype=weight.dtype, device=weight.device)
            if self.directory is not None:
                with atomic_path(self._file(key)) as tmp:
                    torch.save({"U": form.U, "S": form.S, "Vh": form.Vh}, tmp)
        else:
            self.hits += 1
        self._mem[key] = form
        return form
