"""Module surgery: ``decompose_`` swaps projections for ``LowRankLinear``; ``restore_`` undoes it.

Both act in place, like ``torchao.quantize_``. The whole plan is validated, and every factor is
built, before the first module is swapped: a bad plan leaves the model untouched. Each original
module is kept (not copied) inside the ``LowRankLinear`` that replaces it
(:attr:`~dse.decompose.LowRankLinear.original`), so ``restore_`` is bit-exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple

from torch import nn
from tqdm.auto import tqdm

from ..core.errors import PlanError
from ..model import find_projections
from .cache import FactorCache, model_fingerprint
from .lowrank import LowRankLinear
from .methods import MethodConfig, SVDForm, get_method
from .plan import Plan


def kept_originals(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: dense original}`` of every ``LowRankLinear`` of ``model`` that keeps one."""
    return {n: m.original for n, m in model.named_modules() if isinstance(m, LowRankLinear) and m.original is not None}


def is_decomposed(model: nn.Module) -> bool:
    """Whether ``model`` holds modules :func:`decompose_` swapped in (with their originals)."""
    return any(isinstance(m, LowRankLinear) and m.original is not None for m in model.modules())


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def decompose_(
    model: nn.Module,
    plan: Plan,
    *,
    cache: Optional[FactorCache] = None,
    calibration=None,
    family: Optional[str] = None,
    table: Optional[Mapping] = None,
    progress: bool = False,
) -> nn.Module:
    """Replace every module named in ``plan`` by its low-rank factorization, in place.

    ``cache`` reuses factorizations across calls (a fresh in-memory cache is used if omitted);
    ``calibration`` (a :class:`dse.decompose.Calibration`) is required by data-aware methods. The
    projection table is ``table`` if given (a caller that decomposes often computes it once), else
    that of ``family``, else that of the family found on the model.
    Raises :class:`PlanError` before any change if the plan does not fit the model.
    """
    if is_decomposed(model):
        raise RuntimeError("model is already decomposed: call dse.restore_(model) first")
    table = table if table is not None else find_projections(model, family)
    plan.validate(table)
    config = plan.config
    method = get_method(plan.method)
    if config.needs_calibration and calibration is None:
        raise PlanError(
            f"plan.method: {plan.method} needs calibration statistics "
            "(pass calibration=dse.calibrate(...), or set calibration: in the study)"
        )
    if config.needs_grad_moments and not calibration.has_grad_moments():
        raise PlanError(
            f"plan.method: {plan.method} needs output-gradient moments; calibrate with "
            "dse.calibrate(..., grad_moments=True) (a study does so for this method)"
        )
    forms = (
        ()
        if not plan.ranks
        else iter_forms(model, plan.ranks, config, cache=cache, calibration=calibration, table=table, progress=progress)
    )
    # each form is truncated as it comes: a cache that keeps none holds one full form at a time
    built: Dict[str, nn.Module] = {
        name: LowRankLinear.from_linear(model.get_submodule(name), method.truncate(form, plan.ranks[name]))
        for name, form in forms
    }
    for name, new in built.items():
        new.keep_original(swap_module(model, name, new))
    return model


@contextmanager
def decomposed(model: nn.Module, plan: Plan, **kw) -> Iterator[nn.Module]:
    """``with decomposed(model, plan, cache=...) as m:`` the model decomposed by ``plan`` for the
    block (``kw`` as :func:`decompose_` takes), restored bit-exact after it, also on an exception."""
    decompose_(model, plan, **kw)
    try:
        yield model
    finally:
        restore_(model)


def iter_forms(
    model: nn.Module,
    names: Iterable[str],
    config: MethodConfig,
    *,
    cache: Optional[FactorCache] = None,
    calibration=None,
    table: Optional[Mapping] = None,
    progress: bool = False,
) -> Iterator[Tuple[str, SVDForm]]:
    """``(name, SVD form)`` of each named projection under ``config``, from ``cache`` or factorized
    now, one at a time. Data-aware configs need ``calibration``; its key is part of the cache key."""
    table = table if table is not None else find_projections(model)
    cache = cache if cache is not None else FactorCache()
    method_key = config.key() + (f"-{calibration.key}" if config.needs_calibration else "")
    fp = model_fingerprint(model, table)
    for name in tqdm(list(names), desc="factorize", disable=not progress, leave=False):
        stats = calibration.stats_for(name, config.needs_grad_moments) if config.needs_calibration else None
        yield name, cache.form((fp, name, method_key), model.get_submodule(name), config, stats)


def factor_forms(model: nn.Module, names: Iterable[str], config: MethodConfig, **kw) -> Dict[str, SVDForm]:
    """The SVD form of each named projection (see :func:`iter_forms`, which takes the same arguments)."""
    return dict(iter_forms(model, names, config, **kw))


@contextmanager
def dense_modules(model: nn.Module, modules: Optional[Mapping[str, LowRankLinear]] = None) -> Iterator[nn.Module]:
    """The dense originals of ``modules`` (by name; default: the model's ``LowRankLinear``) in
    their places for the block (the dense model, bit-exact), whatever sits there now (a healing
    LoRA chain); afterwards what was there is put back."""
    if modules is None:
        originals = kept_originals(model)
    else:
        originals = {n: m.original for n, m in modules.items() if m.original is not None}
    now = {name: swap_module(model, name, old) for name, old in originals.items()}
    try:
        yield model
    finally:
        for name, module in now.items():
            swap_module(model, name, module)


def restore_(model: nn.Module) -> nn.Module:
    """Put the original dense modules back (bit-exact). A no-op on a model never decomposed, and
    for ``LowRankLinear`` modules without an original (a loaded compressed model's)."""
    for name, old in kept_originals(model).items():
        swap_module(model, name, old)
    return model
