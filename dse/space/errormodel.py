"""An error model of a plan: its predicted loss increase, fitted to what a study measured.

**Feature.** Cutting a module to rank ``r`` drops its components ``r, r+1, ...``; their summed
:func:`~dse.space.importance` (the tail beyond the rank, :func:`tails`) is the module's truncation
error in the method's norm, weighted by the calibration's output gradients. A dense module has
none.

**Model.** The predicted loss increase of a plan is ``Σ_m (a_layer(m) + b_type(m)) · tail_m(r_m)``:
one nonnegative coefficient per layer and one per tensor type (:class:`ErrorModel`). The loss is
what the study measures: ``log(perplexity / dense perplexity)``, or accuracy points lost.

**Fit** (:func:`fit`, pure data → model). Observations (:class:`Observation`: a plan's ranks and its
measured loss; sensitivity probes and finished trials) give a linear system in the coefficients,
solved by nonnegative least squares (``scipy.optimize.nnls``). A study has fewer observations than
coefficients at first, so the fit is pulled (``ridge``) towards one common scale: each coefficient
is ``prior · w`` with ``prior`` the best single scale for all modules and ``w`` near 1 unless the data
say otherwise. The spread of ``w`` (``σ² (XᵀX + λI)⁻¹``, ``σ²`` the residual variance) is the
model's uncertainty, which a sampler draws from (:meth:`ErrorModel.draw`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import nnls

from ..core.errors import SpaceError


@dataclass(frozen=True)
class Observation:
    """One measured plan: ``ranks`` (module -> rank; modules absent are dense) and ``loss`` (its
    measured loss increase; > 0 is worse)."""

    ranks: Mapping[str, int]
    loss: float


def tails(importances: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per module, ``tail[r]`` = the summed importance of components ``r ..`` (``tail[full] = 0``)."""
    out = {}
    for name, imp in importances.items():
        imp = np.clip(np.asarray(imp, dtype=np.float64), 0, None)
        out[name] = np.append(np.cumsum(imp[::-1])[::-1], 0.0)
    return out


def coefficient_names(table: Mapping) -> Tuple[str, ...]:
    """``layer.L`` for every layer, then ``type.T`` for every type of ``table`` (table order)."""
    layers = dict.fromkeys(f"layer.{p.layer}" for p in table.values())
    types = dict.fromkeys(f"type.{p.type}" for p in table.values())
    return tuple(layers) + tuple(types)


def _features(obs: Sequence[Observation], table: Mapping, tail: Mapping, names: Sequence[str]) -> np.ndarray:
    """Row per observation, column per coefficient: the summed tails of the modules it weighs."""
    column = {n: j for j, n in enumerate(names)}
    X = np.zeros((len(obs), len(names)))
    for i, o in enumerate(obs):
        for module, rank in o.ranks.items():
            if module not in tail:
                raise SpaceError(f"error model: module {module!r} has no importance (not in the study's table)")
            p, t = table[module], tail[module][min(int(rank), len(tail[module]) - 1)]
            X[i, column[f"layer.{p.layer}"]] += t
            X[i, column[f"type.{p.type}"]] += t
    return X


@dataclass(frozen=True)
class ErrorModel:
    """Fitted coefficients (``names`` -> ``coef``), their covariance ``cov`` and the tails they weigh."""

    names: Tuple[str, ...]
    coef: np.ndarray
    cov: np.ndarray
    table: Mapping
    tail: Mapping[str, np.ndarray]
    n_observations: int = 0

    def coefficients(self) -> Dict[str, float]:
        return dict(zip(self.names, self.coef.tolist()))

    def weight(self, module: str, coef: Optional[np.ndarray] = None) -> float:
        """The module's multiplier ``a_layer + b_type`` (under ``coef``, default the fitted ones)."""
        c = dict(zip(self.names, self.coef if coef is None else coef))
        p = self.table[module]
        return c[f"layer.{p.layer}"] + c[f"type.{p.type}"]

    def predict(self, ranks: Mapping[str, int]) -> float:
        """The predicted loss increase of a plan's ranks."""
        return float(_features([Observation(ranks, 0.0)], self.table, self.tail, self.names)[0] @ self.coef)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Coefficients drawn from the fit's uncertainty (nonnegative)."""
        return np.clip(rng.multivariate_normal(self.coef, self.cov, method="eigh"), 0, None)


def fit(obs: Sequence[Observation], table: Mapping, importances: Mapping, ridge: float = 0.1) -> ErrorModel:
    """The :class:`ErrorModel` of ``obs`` (see the module doc); ``ridge`` >= 0 is the pull towards
    one common scale, relative to the data's mean squared feature."""
    if not obs:
        raise SpaceError("error model: no observations to fit (measure sensitivity probes or trials first)")
    names, tail = coefficient_names(table), tails(importances)
    X, y = _features(obs, table, tail, names), np.array([o.loss for o in obs], dtype=np.float64)
    total = X.sum(1) / 2  # each module's tail is counted once for its layer and once for its type
    scale = max(float(total @ y) / max(float(total @ total), 1e-300), 0.0) or 1e-12
    prior = scale / 2  # a module's weight is a layer's plus a type's coefficient
    Xs = X * prior  # coefficients are prior * w
    lam = ridge * max(float((Xs**2).sum(0).mean()), 1e-300)
    k = len(names)
    A = np.vstack([Xs, np.sqrt(lam) * np.eye(k)])
    b = np.concatenate([y, np.sqrt(lam) * np.ones(k)])
    w, _ = nnls(A, b, maxiter=50 * k)
    resid = y - Xs @ w
    sigma2 = float(resid @ resid) / max(len(y) - 1, 1) + 1e-12 * float(y @ y + 1)
    cov_w = sigma2 * np.linalg.pinv(Xs.T @ Xs + lam * np.eye(k), hermitian=True)
    cov_w = (cov_w + cov_w.T) / 2
    return ErrorModel(names, prior * w, prior**2 * cov_w, table, tail, len(obs))
