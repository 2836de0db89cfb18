"""The decompose-and-benchmark worker: one trial = plan → ``decompose_`` → evaluate → ``restore_``.

A :class:`Worker` holds the loaded model, its projection table, the factor cache, the calibration
(for data-aware methods) and one :class:`dse.evaluate.Evaluator` for the whole study, so a trial
costs a truncation, an evaluation and a restore. Everything a trial measures is stored as trial
user attributes; the undecomposed baseline is evaluated once per study and stored on the study.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, List, Optional

import optuna
from tqdm.auto import tqdm

from . import __version__
from .arch import find_projections
from .cache import FactorCache, model_fingerprint
from .config import OBJECTIVES, StudyConfig, finite
from .decompose import decompose_, restore_
from .plan import Plan, uniform_plan
from .size import plan_size
from .space import resolve_rank


class TrialFailed(RuntimeError):
    pass


# trial attributes that describe the trial itself, not the plan's measurements
TRIAL_ONLY = {"plan", "plan_summary", "baseline", "baseline_spec", "constraints", "error", "duplicate_of"}


class Worker:
    def __init__(self, config: StudyConfig, model, tokenizer, evaluator, *, cache: Optional[FactorCache] = None,
                 calibration=None, progress: bool = True):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.evaluator = evaluator
        self.table = find_projections(model)
        self.cache = cache if cache is not None else FactorCache(config.cache_dir)
        self.calibration = calibration
        self.progress = progress
        self.baseline: Dict[str, Any] = {}
        self._bar = None

    @classmethod
    def from_config(cls, config: StudyConfig, progress: bool = True) -> "Worker":
        """Load the model, calibrate if the method needs it, and build the evaluator."""
        from .evaluate import Evaluator
        from .models import load_model

        model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
        calibration = None
        if config.calibration is not None:
            from .calibration import calibrate

            calibration = calibrate(model, tokenizer, config.calibration, cache_dir=config.cache_dir,
                                    progress=progress)
        evaluator = Evaluator(model, tokenizer, config.evaluation)
        return cls(config, model, tokenizer, evaluator, calibration=calibration, progress=progress)

    # --- study-level ----------------------------------------------------------------------------
    def prepare(self, study: optuna.Study, target: Optional[int] = None) -> None:
        """Check the study belongs to this model; evaluate and store the baseline once."""
        meta = study.user_attrs.get("dse")
        fingerprint = model_fingerprint(self.model, self.table)
        if meta and meta.get("fingerprint") != fingerprint:
            raise TrialFailed(f"study {study.study_name!r} was run on model {meta.get('model')!r} "
                              f"(fingerprint {meta.get('fingerprint')}), not on this one ({fingerprint})")
        if not meta:
            study.set_user_attr("dse", {
                "version": __version__, "model": self.config.model, "fingerprint": fingerprint,
                "method": self.config.method, "method_options": dict(self.config.method_options),
                "objectives": list(self.config.objectives), "dtype": self.config.dtype,
                "tasks": list(self.config.evaluation.tasks), "limit": self.config.evaluation.limit,
                "calibration": dataclasses.asdict(self.config.calibration) if self.config.calibration else None})
        self.baseline = study.user_attrs.get("baseline") or {}
        if not self.baseline:
            self.baseline = self.measure(Plan({}, self.config.method, self.config.method_options))
            study.set_user_attr("baseline", self.baseline)
        if self.progress:
            done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                  optuna.trial.TrialState.PRUNED)))
            self._bar = tqdm(total=target or self.config.n_trials, initial=done, desc=f"study {self.config.name}",
                             unit="trial")

    def report(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback: advance the progress bar with the trial's result."""
        if self._bar is None:
            return
        self._bar.update(1)
        attrs = trial.user_attrs
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
        spec = trial.user_attrs.get("baseline_spec")
        method, options = self.config.method, dict(self.config.method_options)
        if spec is None:
            return self.config.space.suggest(trial, self.table, method, options)
        kind, value = spec
        if kind == "dense":
            return Plan({}, method, options)
        if kind == "ratio":
            return uniform_plan(self.table, ratio=value, method=method, method_options=options)
        return Plan({n: resolve_rank(value, p.full_rank) for n, p in self.table.items()}, method, options)

    def measure(self, plan: Plan) -> Dict[str, Any]:
        """Decompose with ``plan``, evaluate, restore; return sizes and metrics."""
        size = plan_size(self.model, plan, self.table)
        out: Dict[str, Any] = {**size.as_dict(), "n_modules": len(plan)}
        t0 = time.perf_counter()
        try:
            if len(plan):
                decompose_(self.model, plan, cache=self.cache, calibration=self.calibration)
            out["decompose_seconds"] = time.perf_counter() - t0
            if not len(plan) and self.baseline:  # the dense model was measured once already
                metrics = {k: v for k, v in self.baseline.items() if k not in out}
            else:
                metrics = self.evaluator.run(progress=self.progress)
        finally:
            restore_(self.model)
        out.update(metrics)
        tps = out.get("latency_tokens_per_s")
        if finite(tps) and tps > 0:
            out["latency_ms_per_token"] = 1000.0 / tps
        return out

    @staticmethod
    def earlier_result(study: optuna.Study, plan: Plan) -> Optional[Dict[str, Any]]:
        """The metrics of a completed trial with the same plan (samplers repeat themselves in small
        spaces): the plan is not evaluated twice, and the trial records ``duplicate_of``."""
        wanted = plan.to_dict()
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get("plan") == wanted:
                kept = {k: v for k, v in t.user_attrs.items() if k not in TRIAL_ONLY}
                return {**kept, "duplicate_of": t.number}
        return None

    def objective(self, trial: optuna.Trial) -> List[float]:
        plan = self.plan_for(trial)
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("plan_summary", plan.summary())
        try:
            metrics = self.earlier_result(trial.study, plan)
            if metrics is None:
                metrics = self.measure(plan)
            values = [metrics.get(OBJECTIVES[o][1]) for o in self.config.objectives]
            bad = [o for o, v in zip(self.config.objectives, values) if v is None or not math.isfinite(v)]
            if bad:
                raise TrialFailed(f"objective {bad[0]} is {metrics.get(OBJECTIVES[bad[0]][1])!r} (not finite)")
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}".splitlines()[0][:500])
            raise
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        if self.config.constraints:
            trial.set_user_attr("constraints", self.config.constraints.violations(metrics, self.baseline))
        return values
