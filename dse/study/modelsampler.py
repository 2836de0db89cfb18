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

**Trust region** (allocation spaces, ``trust`` > 0). A linear model is least wrong near what was
measured, and an optimiser drawn to where it errs low finds plans the measurements disown. So each
proposal keeps every module's cost within ``radius`` (relative) of its cost in the best plan
measured so far (the incumbent; :func:`dse.space.best_plan`'s ``near``), with ``radius`` cycling
through ``trust``, ``trust/2``, ``trust/4`` and unbounded, one step every :data:`PATIENCE` finished
trials that do not beat the incumbent, and back to ``trust`` when one does. The radius is read
from the study's history, so a resumed study continues where it stopped.

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
from typing import Dict, List, Optional, Tuple

import numpy as np
import optuna

from ..core.errors import StudyError
from ..decompose import Plan
from ..results.record import TrialRecord
from ..space import AllocationError, ErrorModel, Observation, Space, SpaceContext, best_plan, fit, grid_plan


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


PATIENCE = 3  # finished trials without a better plan before the trust region's radius steps


class ErrorModelSampler(optuna.samplers.BaseSampler):
    """Proposes each trial's plan as the error model's optimum (see the module doc). Parameters a
    space samples through Optuna (none, for the plans it proposes) are drawn at random."""

    def __init__(
        self,
        seed: Optional[int] = None,
        explore: float = 0.25,
        ridge: float = 0.1,
        refit: bool = True,
        trust: float = 0.5,
    ):
        if not 0 <= explore <= 1:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if trust < 0:
            raise ValueError(f"trust must be >= 0, got {trust}")
        self.seed, self.explore, self.ridge, self.refit, self.trust = seed or 0, explore, ridge, refit, trust
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
        region = self.region(trial.study, metric) if not isinstance(space, Space) else (None, math.inf)
        plan = _optimum(space, context, model, model.draw(rng) if rng.random() < self.explore else None, rng, *region)
        for _ in range(5):  # a plan measured before teaches nothing: go where the model is unsure
            if dict(plan.ranks) not in measured:
                break
            plan = _optimum(space, context, model, model.draw(rng), rng, *region)
        return plan

    def region(self, study: optuna.Study, metric: str) -> Tuple[Optional[Dict[str, int]], float]:
        """The trust region of the next proposal: the incumbent's ranks and the radius (see the
        module doc); ``(None, inf)`` without ``trust`` or before a trial with a plan has finished."""
        sign = 1 if metric == "perplexity" else -1
        best, since = None, 0
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in sorted(trials, key=lambda t: t.number):
            record = TrialRecord.of(t)
            value = record.get(metric)
            if not record.plan or value is None or not math.isfinite(value):
                continue
            if best is None or sign * value < sign * best[0]:
                best, since = (value, Plan.from_dict(record.plan).ranks), 0
            else:
                since += 1
        if not self.trust or best is None:
            return None, math.inf
        step = since // PATIENCE % 4
        return dict(best[1]), (self.trust / 2**step if step < 3 else math.inf)

    def predict(self, trial, space, context: SpaceContext, metric: str, plan: Plan) -> Optional[float]:
        """The current model's predicted loss increase of ``plan`` (None before anything is measured)."""
        model = self.model(trial.study, space, context, metric)
        return None if model is None else model.predict(plan.ranks)


def _optimum(space, context: SpaceContext, model: ErrorModel, coef, rng, near=None, radius=math.inf) -> Plan:
    """The model's optimum (under ``coef``) within an allocation space's budget (and the trust
    region ``near``, ``radius``), or within a size drawn uniformly over a grid space's plans."""
    if not isinstance(space, Space):
        try:
            return best_plan(space, context, model, coef, near, radius)
        except AllocationError:  # no plan of the space within the budget in the region
            return best_plan(space, context, model, coef)
    return grid_plan(space, context, model, rng.random(), coef)
