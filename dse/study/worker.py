"""The decompose-and-benchmark worker: one trial = plan → ``decompose_`` → evaluate → ``restore_``.

A :class:`Worker` holds the loaded model, its projection table, the factor cache, the calibration
(for data-aware methods) and one :class:`dse.evaluate.Evaluator` for the whole study, so a trial
costs a truncation, an evaluation and a restore. Everything a trial measures is stored as trial
user attributes; the undecomposed baseline is evaluated once per study and stored on the study.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from typing import Any, Dict, List, Optional

import optuna
from tqdm.auto import tqdm

from .. import __version__
from ..core.errors import StudyError
from ..core.validate import finite
from ..decompose import FactorCache, Plan, calibrate, decomposed, factor_forms, model_fingerprint, plan_size
from ..decompose.latency import LatencyTable, TableSpec, latency_table
from ..evaluate import OBJECTIVES, EarlyStop, Evaluator, derive_metrics, staged_run
from ..model import family_of, find_projections, load_model, param_count
from ..results.record import TrialRecord
from ..space import STARTS, Baseline, importance
from .config import StudyConfig


class TrialFailed(RuntimeError):
    """A trial whose measurement cannot be used (an objective that is not finite)."""


class Worker:
    def __init__(
        self,
        config: StudyConfig,
        model,
        tokenizer,
        evaluator,
        *,
        cache: Optional[FactorCache] = None,
        calibration=None,
        table=None,
        latency: Optional[LatencyTable] = None,
        progress: bool = True,
    ):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.evaluator = evaluator
        self.family = family_of(model, config.family).family
        self.table = table if table is not None else find_projections(model, self.family)
        self.cache = cache if cache is not None else FactorCache(config.cache_dir, config.cache_memory)
        self.calibration = calibration
        self.progress = progress
        self.baseline: Dict[str, Any] = {}
        self.model_params = param_count(model)
        self._importances: Optional[Dict[str, Any]] = None
        self._latency = latency
        self._bar = None

    @classmethod
    def from_config(cls, config: StudyConfig, progress: bool = True) -> "Worker":
        """Load the model (placed by ``device`` or ``device_map``), calibrate if the study has a
        calibration, and build the evaluator. A streamed calibration for a data-aware method
        factorizes each layer into the factor cache as soon as its statistics are final."""
        model, tokenizer = load_model(
            config.model,
            device=config.device,
            dtype=config.dtype,
            device_map=config.device_map,
            max_memory=config.max_memory,
            offload_dir=config.offload_dir,
        )
        table = find_projections(model, config.family)
        cache, calibration = FactorCache(config.cache_dir, config.cache_memory), None
        if config.calibration is not None:
            keeps = cache.memory != "none" or cache.directory is not None
            on_layer = None
            if config.calibration.streamed and config.method.needs_calibration and keeps:

                def on_layer(names, cal):
                    factor_forms(model, names, config.method, cache=cache, calibration=cal, table=table)

            calibration = calibrate(
                model,
                tokenizer,
                config.calibration,
                cache_dir=config.cache_dir,
                gradients=config.space.needs_importance,
                grad_moments=config.method.needs_grad_moments,
                on_layer=on_layer,
                progress=progress,
                table=table,
            )
        evaluator = Evaluator(model, tokenizer, config.evaluation)
        return cls(
            config, model, tokenizer, evaluator, cache=cache, calibration=calibration, table=table, progress=progress
        )

    def latency(self) -> Optional[LatencyTable]:
        """The study's latency table (measured, or read from the cache, on first use), or None when
        the study needs none (:attr:`StudyConfig.uses_latency`)."""
        if self._latency is None and self.config.uses_latency:
            self._latency = latency_table(
                self.model,
                self.table,
                self.config.latency_table or TableSpec(),
                self.config.cache_dir,
                progress=self.progress,
            )
        return self._latency if self.config.uses_latency else None

    # --- study-level ----------------------------------------------------------------------------
    def prepare(self, study: optuna.Study, target: Optional[int] = None) -> None:
        """Check the study belongs to this model; evaluate and store the baseline once."""
        meta = study.user_attrs.get("dse")
        fingerprint = model_fingerprint(self.model, self.table)
        if meta and meta.get("fingerprint") != fingerprint:
            raise StudyError(
                f"model: study {study.study_name!r} was run on model {meta.get('model')!r} "
                f"(fingerprint {meta.get('fingerprint')}), not on this one ({fingerprint})"
            )
        if not meta:
            study.set_user_attr(
                "dse",
                {
                    "version": __version__,
                    "model": self.config.model,
                    "family": self.family,
                    "fingerprint": fingerprint,
                    "method": self.config.method.name,
                    "method_options": self.config.method.changed_options(),
                    "objectives": list(self.config.objectives),
                    "dtype": self.config.dtype,
                    "tasks": list(self.config.evaluation.tasks),
                    "limit": self.config.evaluation.limit,
                    "calibration": self.config.calibration.to_dict() if self.config.calibration else None,
                },
            )
        self.baseline = study.user_attrs.get("baseline") or {}
        if not self.baseline:
            self.baseline = self.measure(Plan({}, self.config.method))
            study.set_user_attr("baseline", self.baseline)
        if self.progress:
            done = len(
                study.get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                )
            )
            self._bar = tqdm(
                total=target or self.config.n_trials, initial=done, desc=f"study {self.config.name}", unit="trial"
            )

    def enqueue_starts(self, study: optuna.Study) -> None:
        """Enqueue the space's starting points once per study (allocation spaces, see
        :data:`dse.space.STARTS`). Only the process that owns the study calls this; each probe a
        start measures is stored in the study's ``sensitivity`` attribute as soon as it is
        measured, so a run stopped while probing measures only the missing probes when resumed."""
        space = self.config.space
        if not getattr(space, "starts", ()) or study.user_attrs.get("starts_enqueued"):
            return
        with tqdm(desc="sensitivity probes", unit="probe", disable=not self.progress, leave=False) as bar:
            measure = self._probe_measure(study, bar)
            starts = {
                name: STARTS.get(name).params(
                    space,
                    self.table,
                    self.config.method,
                    model_params=self.model_params,
                    measure=measure,
                    latency=self.latency(),
                )
                for name in space.starts
            }  # all measured before any is enqueued
        for name, params in starts.items():
            study.enqueue_trial(params, user_attrs={"start": name})
        study.set_user_attr("starts_enqueued", True)

    def _probe_measure(self, study: optuna.Study, bar):
        """``measure(name, plan)`` for starts: the loss increase of ``plan`` on the study's perplexity
        (log ratio to the dense model) or else accuracy (points lost), recorded in the study."""
        metric = "perplexity" if "perplexity" in self.config.objectives else "accuracy"  # checked in config
        record = dict(study.user_attrs.get("sensitivity") or {})

        def measure(name: str, plan: Plan) -> float:
            if name not in record:
                removed = sum(self.table[n].dense_params for n in plan.ranks) - plan.params(self.table)
                record[name] = {metric: self.measure(plan)[metric], "params_removed": removed}
                study.set_user_attr("sensitivity", record)
            bar.update(1)
            base, value = self.baseline[metric], record[name][metric]
            return math.log(value / base) if metric == "perplexity" else base - value

        return measure

    def importances(self) -> Dict[str, Any]:
        """Every projection's per-component :func:`dse.space.importance` under the study's
        method (factorizing on first use); needs a calibration with gradients."""
        if self._importances is None:
            if self.calibration is None or not self.calibration.grads:
                raise StudyError("calibration: an allocation space needs a calibration with gradients")
            forms = factor_forms(
                self.model,
                self.table,
                self.config.method,
                cache=self.cache,
                calibration=self.calibration,
                table=self.table,
                progress=self.progress,
            )
            self._importances = {
                n: importance(f, self.calibration.grads[n], self.calibration.stats_for(n).xtx) for n, f in forms.items()
            }
        return self._importances

    def report(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback: advance the progress bar with the trial's result."""
        if self._bar is None:
            return
        self._bar.update(1)
        attrs = TrialRecord.of(trial)
        post = {"state": trial.state.name.lower()}
        if "params_ratio" in attrs:
            post["params"] = f"{attrs['params_ratio']:.1%}"
        if finite(attrs.get("accuracy")):
            post["acc"] = f"{attrs['accuracy']:.3f}"
        if finite(attrs.get("perplexity")):
            post["ppl"] = f"{attrs['perplexity']:.1f}"
        self._bar.set_postfix(post)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # --- trial-level ----------------------------------------------------------------------------
    def plan_for(self, trial: optuna.Trial) -> Plan:
        """The enqueued baseline plan of ``trial``, or the space's suggestion."""
        spec = TrialRecord.of(trial).baseline_spec
        method, space = self.config.method, self.config.space
        if spec is not None:
            return Baseline(*spec).plan(self.table, method, model_params=self.model_params)
        if space.needs_importance:
            plan = space.suggest(
                trial,
                self.table,
                method,
                importances=self.importances(),
                model_params=self.model_params,
                latency=self.latency(),
            )
        else:
            plan = space.suggest(trial, self.table, method)
        align = getattr(getattr(space, "rules", None), "align", None) == "auto"
        if self.config.optimises_latency or align:  # never a rank measured slower than dense
            plan = self.latency().faster_plan(plan, self.table, align=align)
        return plan

    def measure(self, plan: Plan, early_stop=None) -> Dict[str, Any]:
        """Decompose with ``plan``, evaluate, restore; return sizes and metrics (with every derived
        objective's value). ``early_stop`` (multi-fidelity, see :func:`dse.evaluate.staged_run`) may
        end the evaluation early: :class:`dse.evaluate.EarlyStop` then carries the sizes and the
        metrics so far."""
        size = plan_size(self.model, plan, self.table)
        out: Dict[str, Any] = {**size.as_dict(), "n_modules": len(plan)}
        if self.latency() is not None:
            out.update(self.latency().predict(plan, self.table))
        t0 = time.perf_counter()
        try:
            with decomposed(self.model, plan, cache=self.cache, calibration=self.calibration, table=self.table):
                out["decompose_seconds"] = time.perf_counter() - t0
                if not len(plan) and self.baseline:  # the dense model was measured once already
                    metrics = {k: v for k, v in self.baseline.items() if k not in out}
                elif early_stop is not None:
                    metrics = staged_run(self.evaluator, self.config.multi_fidelity.first, early_stop, self.progress)
                else:
                    metrics = self.evaluator.run(progress=self.progress)
        except EarlyStop as stop:
            stop.metrics = {**out, **stop.metrics}
            raise
        out.update(metrics)
        return derive_metrics(out)

    @staticmethod
    def earlier_result(study: optuna.Study, plan: Plan) -> Optional[TrialRecord]:
        """The record of a completed trial with the same plan (samplers repeat themselves in small
        spaces): the plan is not evaluated twice, and the trial records ``duplicate_of``."""
        wanted = plan.to_dict()
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            record = TrialRecord.of(t)
            if record.plan == wanted:
                return dataclasses.replace(record, duplicate_of=t.number)
        return None

    def early_stop_rule(self, study: optuna.Study, plan: Plan):
        """The multi-fidelity rule for ``plan``: stop when the first stage's accuracy is more than
        ``margin`` below the best completed trial with at most as many parameters (None: no rule)."""
        mf = self.config.multi_fidelity
        if mf is None or not len(plan):
            return None
        params = plan_size(self.model, plan, self.table).params_after
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

    def objective(self, trial: optuna.Trial) -> List[float]:
        """Plan, measure (or reuse a repeated plan's measurement), write the trial's record once."""
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (or died in it)
        plan = self.plan_for(trial)
        record = TrialRecord(plan=plan.to_dict(), plan_summary=plan.summary())
        try:
            earlier = self.earlier_result(trial.study, plan)
            if earlier is not None:
                record = dataclasses.replace(record, metrics=earlier.metrics, duplicate_of=earlier.duplicate_of)
            else:
                record = dataclasses.replace(
                    record, metrics=self.measure(plan, self.early_stop_rule(trial.study, plan))
                )
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
        if self.config.constraints:
            record = dataclasses.replace(
                record, constraints=self.config.constraints.violations(record.metrics, self.baseline)
            )
        record.write(trial)
        return values
