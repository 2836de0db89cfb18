"""The ``errormodel`` sampler: each trial is the exact optimum of the error model, refitted to
everything the study has measured so far.

Data (:func:`study_observations`): the study's sensitivity probes (its ``sensitivity`` attribute,
with their plans from :meth:`~dse.space.AllocationSpace.probe_plans`) and its finished trials
(plan and measured loss: ``log(perplexity / dense)``, or accuracy points lost). Drawing
(:meth:`ErrorModelSampler.propose`): :func:`dse.space.fit` on those observations, then
:func:`dse.space.best_plan`, the integer program's optimum within the space's budget. With
probability ``explore``, and whenever the optimum repeats a measured plan, the coefficients are
drawn from the fit's uncertainty instead (a Thompson draw), so the search goes where the model is
unsure. Draws are seeded by the sampler's seed and the trial's number. ``refit: false`` fits the
probes alone, once (to compare with refitting after every trial).

On a grid space (:class:`~dse.space.Space`, no budget) each trial first draws how many parameters
its selected modules keep, uniformly between the space's smallest plan and dense (seeded like the
draws above), and takes the model's optimum among the grid's plans of at most that size
(:func:`dse.space.grid_plan`: the group and the layer rules are rows of the program), so the trials
spread along the size axis of the front. A grid study measures no probes: until it has a finished
trial to fit, its trials are the space's random suggestions.

Optuna does not see the plan's ranks as parameters: the worker asks the sampler for the plan
(:meth:`propose`) and records the model's prediction beside the measurement (``predicted_loss``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import optuna

from ..core.errors import StudyError
from ..decompose import Plan
from ..results.record import TrialRecord
from ..space import ErrorModel, Observation, Space, SpaceContext, best_plan, fit, grid_plan, grid_sizes


def measured_loss(metric: str, value: float, base: float) -> float:
    """A measurement as a loss increase over the dense model (> 0 is worse)."""
    return math.log(value / base) if metric == "perplexity" else base - value


def study_observations(
    study: optuna.Study, space, context: SpaceContext, metric: str, trials: bool = True
) -> List[Observation]:
    """The sensitivity probes the study measured and (``trials``) its completed trials, as observations."""
    base = (study.user_attrs.get("baseline") or {}).get(metric)
    if base is None:
        return []
    probes = study.user_attrs.get("sensitivity") or {}
    out = []
    if probes:
        plans = space.probe_plans(
            context.table, context.method, model_params=context.model_params, latency=context.latency
        )
        out += [
            Observation(plans[n].ranks, measured_loss(metric, r[metric], base)) for n, r in probes.items() if n in plans
        ]
    if trials:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            record = TrialRecord.of(t)
            value = record.get(metric)
            if record.plan and value is not None and math.isfinite(value) and value > 0:
                out.append(Observation(Plan.from_dict(record.plan).ranks, measured_loss(metric, value, base)))
    return out


class ErrorModelSampler(optuna.samplers.BaseSampler):
    """Proposes each trial's plan as the error model's optimum (see the module doc). Parameters a
    space samples through Optuna (none, for the plans it proposes) are drawn at random."""

    def __init__(self, seed: Optional[int] = None, explore: float = 0.25, ridge: float = 0.1, refit: bool = True):
        if not 0 <= explore <= 1:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.seed, self.explore, self.ridge, self.refit = seed or 0, explore, ridge, refit
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._fitted: Dict[tuple, ErrorModel] = {}

    # --- Optuna's sampler interface: nothing to sample jointly ---------------------------------
    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # --- plans -----------------------------------------------------------------------------------
    def model(self, study: optuna.Study, space, context: SpaceContext, metric: str) -> Optional[ErrorModel]:
        """The error model fitted to the study's observations (cached per set of observations);
        None before anything is measured."""
        obs = study_observations(study, space, context, metric, trials=self.refit)
        if not obs:
            return None
        key = (id(context.importances), len(obs), tuple(o.loss for o in obs))
        if key not in self._fitted:
            self._fitted = {key: fit(obs, context.table, context.importances, self.ridge)}
        return self._fitted[key]

    def propose(self, trial, space, context: SpaceContext, metric: str) -> Optional[Plan]:
        """The optimum of the refitted model within the budget (a grid space: within a drawn size),
        or of a draw from its uncertainty; None for a grid space with nothing to fit yet."""
        model = self.model(trial.study, space, context, metric)
        if model is None and isinstance(space, Space):
            return None
        if model is None:
            raise StudyError(
                "sampler: errormodel has nothing to fit yet: measure sensitivity probes "
                "(space.starts: [sensitivity] or [errormodel]) or enqueue baselines"
            )
        rng = np.random.default_rng([self.seed, trial.number])
        measured = [dict(o.ranks) for o in study_observations(trial.study, space, context, metric)]
        plan = _optimum(space, context, model, model.draw(rng) if rng.random() < self.explore else None, rng)
        for _ in range(5):  # a plan measured before teaches nothing: go where the model is unsure
            if dict(plan.ranks) not in measured:
                break
            plan = _optimum(space, context, model, model.draw(rng), rng)
        return plan

    def predict(self, trial, space, context: SpaceContext, metric: str, plan: Plan) -> Optional[float]:
        """The current model's predicted loss increase of ``plan`` (None before anything is measured)."""
        model = self.model(trial.study, space, context, metric)
        return None if model is None else model.predict(plan.ranks)


def _optimum(space, context: SpaceContext, model: ErrorModel, coef, rng: np.random.Generator) -> Plan:
    """The model's optimum (under ``coef``) within an allocation space's budget, or within a size
    drawn uniformly over a grid space's plans."""
    if not isinstance(space, Space):
        return best_plan(space, context, model, coef)
    low, high = grid_sizes(space, context, model)
    return grid_plan(space, context, model, low + rng.random() * (high - low), coef)
