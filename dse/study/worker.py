"""The study loop's trial side: one trial = suggest a plan → measure it → write its record.

A :class:`Worker` is made per study run from the study config and a
:class:`~dse.study.measure.Measurer` (the loaded model, cache, calibration and evaluator, which a
trial does not change). Everything a trial measures is written as its one
:class:`~dse.results.record.TrialRecord`; the undecomposed baseline is evaluated once per study
and stored on the study.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from typing import Any, Dict, List, Mapping, Optional

import optuna
from tqdm.auto import tqdm

from .. import __version__
from ..core.errors import StudyError
from ..core.validate import finite
from ..decompose import Plan, model_fingerprint
from ..evaluate import OBJECTIVES, EarlyStop
from ..results.front import joins_front
from ..results.record import TrialRecord
from ..space import STARTS, Baseline, SpaceContext
from .config import MultiFidelity, StudyConfig
from .measure import Measurer
from .modelsampler import measured_loss


class TrialFailed(RuntimeError):
    """A trial whose measurement cannot be used (an objective that is not finite)."""


class TrialBar:
    """The study's progress bar, an Optuna callback: one step per finished trial, with its state,
    size and quality; nothing when not ``enabled``."""

    def __init__(self, total: int, done: int, name: str, enabled: bool = True):
        self._bar = tqdm(total=total, initial=done, desc=f"study {name}", unit="trial") if enabled else None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        record = TrialRecord.of(trial)
        post = {"state": trial.state.name.lower()}
        if "params_ratio" in record:
            post["params"] = f"{record['params_ratio']:.1%}"
        if finite(record.get("accuracy")):
            post["acc"] = f"{record['accuracy']:.3f}"
        if finite(record.get("perplexity")):
            post["ppl"] = f"{record['perplexity']:.1f}"
        self._bar.set_postfix(post)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Worker:
    """The Optuna side of a study: suggests each trial's plan, has the :class:`Measurer` measure it
    (or reuses the measurement of a repeated plan, or the dense baseline), and writes the trial's
    record once. Made per study run; the measurer (and its loaded model) may outlive it."""

    def __init__(self, config: StudyConfig, measurer: Measurer, progress: bool = True):
        self.config = config
        self.measurer = measurer
        self.progress = progress
        self.baseline: Dict[str, Any] = {}
        self.bar = TrialBar(0, 0, config.name, enabled=False)  # the study's, once prepared

    @classmethod
    def from_config(cls, config: StudyConfig, progress: bool = True, measurer: Optional[Measurer] = None) -> "Worker":
        """A worker for the study ``config``, on ``measurer``'s loaded model when given
        (:meth:`Measurer.for_study`), else on a model loaded for it."""
        measurer = measurer.for_study(config) if measurer is not None else Measurer.from_config(config, progress)
        return cls(config, measurer, progress)

    # --- study-level ----------------------------------------------------------------------------
    def prepare(self, study: optuna.Study, target: Optional[int] = None) -> None:
        """Check the study belongs to this model; evaluate and store the baseline once."""
        meta = study.user_attrs.get("dse")
        fingerprint = model_fingerprint(self.measurer.model, self.measurer.table)
        if meta and meta.get("fingerprint") != fingerprint:
            raise StudyError(
                f"model: study {study.study_name!r} was run on model {meta.get('model')!r} "
                f"(fingerprint {meta.get('fingerprint')}), not on this one ({fingerprint})"
            )
        if not meta:
            study.set_user_attr("dse", study_meta(self.config, self.measurer.family, fingerprint))
        self.baseline = study.user_attrs.get("baseline") or {}
        if not self.baseline:
            self.baseline = self.measurer.measure_baseline()
            study.set_user_attr("baseline", self.baseline)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=finished))
        self.bar = TrialBar(target or self.config.n_trials, done, self.config.name, self.progress)

    def enqueue_starts(self, study: optuna.Study) -> None:
        """Enqueue the space's starting points once per study (allocation spaces, see
        :data:`dse.space.STARTS`). Only the process that owns the study calls this; each probe a
        start measures is stored in the study's ``sensitivity`` attribute as soon as it is
        measured, so a run stopped while probing measures only the missing probes when resumed."""
        space = self.config.space
        if not space.starts or study.user_attrs.get("starts_enqueued"):
            return
        with tqdm(desc="sensitivity probes", unit="probe", disable=not self.progress, leave=False) as bar:
            measure = probe_measure(study, self.measurer, self.baseline, self.config.loss_metric, bar)
            starts = {
                name: STARTS.get(name).params(
                    space,
                    self.measurer.table,
                    self.config.method,
                    model_params=self.measurer.model_params,
                    measure=measure,
                    latency=self.measurer.latency(),
                    importances=self.measurer.importances(),
                )
                for name in space.starts
            }  # all measured before any is enqueued
        for name, params in starts.items():
            if isinstance(params, Plan):  # a start that gives its plan itself
                study.enqueue_trial({}, user_attrs={"start": name, "planned": params.to_dict()})
            else:
                study.enqueue_trial(params, user_attrs={"start": name})
        study.set_user_attr("starts_enqueued", True)

    # --- trial-level ----------------------------------------------------------------------------
    def context(self) -> SpaceContext:
        m = self.measurer
        importances = m.importances() if self.config.needs_importance else None
        return SpaceContext(m.table, self.config.method, m.model_params, m.latency(), importances)

    def plan_for(self, trial: optuna.Trial) -> Plan:
        """The enqueued baseline plan of ``trial``, an enqueued start's plan, the sampler's plan (a
        sampler that proposes plans, for a trial not enqueued), or the space's suggestion."""
        record = TrialRecord.of(trial)
        method, space = self.config.method, self.config.space
        if record.baseline_spec is not None:
            return Baseline(*record.baseline_spec).plan(
                self.measurer.table, method, model_params=self.measurer.model_params
            )
        if record.planned is not None:
            return Plan.from_dict(record.planned)
        propose = getattr(trial.study.sampler, "propose", None)
        plan = None
        if propose is not None and record.start is None:  # a start's enqueued weights are the space's
            plan = propose(trial, space, self.context(), self.config.loss_metric)
        if plan is None:
            plan = space.suggest(trial, self.context())
        align = space.aligns_ranks
        if self.config.optimises_latency or align:  # never a rank measured slower than dense
            plan = self.measurer.latency().faster_plan(plan, self.measurer.table, align=align)
        return plan

    def measure(self, plan: Plan, early_stop=None) -> Dict[str, Any]:
        """The measurement of ``plan``: the dense plan's is the study's baseline, measured once."""
        if not len(plan) and self.baseline:
            return dict(self.baseline)
        return self.measurer.measure(plan, early_stop)

    def _early_stop(self, study: optuna.Study, plan: Plan):
        mf = self.config.multi_fidelity
        return early_stop_rule(study, mf, self.measurer.params_after(plan)) if mf and len(plan) else None

    def objective(self, trial: optuna.Trial) -> List[float]:
        """Plan, measure (or reuse a repeated plan's measurement), write the trial's record once."""
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (or died in it)
        plan = self.plan_for(trial)
        record = TrialRecord(plan=plan.to_dict(), plan_summary=plan.summary())
        try:
            earlier = earlier_result(trial.study, plan)
            if earlier is not None:
                record = dataclasses.replace(record, metrics=earlier.metrics, duplicate_of=earlier.duplicate_of)
            else:
                metrics = self.measure(plan, self._early_stop(trial.study, plan))
                if heals(self.config, trial.study, metrics):
                    metrics.update(self.measurer.measure_healed(plan))
                record = dataclasses.replace(record, metrics=metrics)
            values = [record.get(OBJECTIVES.get(o).attribute) for o in self.config.objectives]
            bad = [(o, v) for o, v in zip(self.config.objectives, values) if not finite(v)]
            if bad:
                raise TrialFailed(f"objective {bad[0][0]} is {bad[0][1]!r} (not finite)")
        except EarlyStop as stop:
            dataclasses.replace(record, metrics=stop.metrics, pruned=stop.reason).write(trial)
            raise optuna.TrialPruned(stop.reason) from None
        except Exception as e:
            dataclasses.replace(record, error=f"{type(e).__name__}: {e}".splitlines()[0][:500]).write(trial)
            raise
        predict = getattr(trial.study.sampler, "predict", None)
        if predict is not None:  # the error model's prediction beside the measurement
            loss = predict(trial, self.config.space, self.context(), self.config.loss_metric, plan)
            if loss is not None:
                record = dataclasses.replace(record, metrics={**record.metrics, "predicted_loss": loss})
        if self.config.constraints:
            record = dataclasses.replace(
                record, constraints=self.config.constraints.violations(record.metrics, self.baseline)
            )
        record.write(trial)
        return values


def heals(config: StudyConfig, study: optuna.Study, metrics: Mapping[str, Any]) -> bool:
    """Whether the study's ``heal:`` heals a trial measured as ``metrics``: every trial, or one
    whose plain measures join the current front (``trials: front``), unless already healed (the
    dense plan's baseline is)."""
    heal = config.heal
    if heal is None or "heal_steps" in metrics:
        return False
    if heal.trials == "all":
        return True
    values = [metrics.get(OBJECTIVES.get(o).attribute) for o in config.objectives]
    return all(finite(v) for v in values) and joins_front(study, values)


def earlier_result(study: optuna.Study, plan: Plan) -> Optional[TrialRecord]:
    """The record of a completed trial with the same plan (samplers repeat themselves in small
    spaces): the plan is not evaluated twice, and the trial records ``duplicate_of``."""
    wanted = plan.to_dict()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        record = TrialRecord.of(t)
        if record.plan == wanted:
            return dataclasses.replace(record, duplicate_of=t.number)
    return None


def early_stop_rule(study: optuna.Study, mf: Optional[MultiFidelity], params: int):
    """The multi-fidelity rule (``mf``) for a plan of ``params`` parameters: stop when the first
    stage's accuracy is more than ``margin`` below the best completed trial with at most as many
    parameters (None: no rule)."""
    if mf is None:
        return None
    records = {
        t.number: TrialRecord.of(t)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    }
    rivals = {n: r for n, r in records.items() if finite(r.get("accuracy")) and r.get("params", math.inf) <= params}
    if not rivals:
        return None
    number, best = max(rivals.items(), key=lambda item: item[1]["accuracy"])
    bar = best["accuracy"] - mf.margin

    def rule(first_stage: Dict[str, float]) -> Optional[str]:
        if first_stage["accuracy"] < bar:
            return (
                f"accuracy {first_stage['accuracy']:.3f} on the first {mf.first:.0%} of each task is more "
                f"than {mf.margin:g} below {best['accuracy']:.3f} (trial {number}, "
                f"{best['params']} parameters <= {params})"
            )
        return None

    return rule


def probe_measure(study: optuna.Study, measurer: Measurer, baseline: Mapping, metric: str, bar):
    """``measure(name, plan)`` for starts: the loss increase of ``plan`` on the study's perplexity
    (log ratio to the dense model, ``baseline``) or accuracy (points lost), recorded in the study."""
    record = dict(study.user_attrs.get("sensitivity") or {})
    table = measurer.table

    def measure(name: str, plan: Plan) -> float:
        if name not in record:
            removed = sum(table[n].dense_params for n in plan.ranks) - plan.params(table)
            record[name] = {metric: measurer.measure(plan)[metric], "params_removed": removed}
            study.set_user_attr("sensitivity", record)
        bar.update(1)
        return measured_loss(metric, record[name][metric], baseline[metric])

    return measure


def study_meta(config: StudyConfig, family: str, fingerprint: str) -> Dict[str, Any]:
    """What a study records once about the model and the measurements its trials are made of."""
    return {
        "version": __version__,
        "model": config.model,
        "family": family,
        "fingerprint": fingerprint,
        "method": config.method.name,
        "method_options": config.method.changed_options(),
        "objectives": list(config.objectives),
        "dtype": config.dtype,
        "tasks": list(config.evaluation.tasks),
        "limit": config.evaluation.limit,
        "calibration": config.calibration.to_dict() if config.calibration else None,
    }
