"""The measurer: a plan in, a measurement out.

A :class:`Measurer` is built once from a study config: the loaded model, its projection table,
the factor cache, the calibration (data-aware methods), the evaluator and, on first use, the
latency table and the components' importances. :meth:`Measurer.measure` decomposes with a plan,
evaluates and restores (:func:`dse.decompose.decomposed`); nothing else changes it. Another study
or another evaluation on the same loaded model goes through :meth:`Measurer.for_study` or
:meth:`Measurer.with_evaluation`, which share what is the same and rebuild what differs (or refuse
in one line).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from ..core.errors import StudyError
from ..decompose import FactorCache, Plan, calibrate, decomposed, factor_forms, plan_size, temporarily_healed
from ..decompose.latency import LatencyTable, TableSpec, latency_table
from ..evaluate import EarlyStop, EvalConfig, Evaluator, derive_metrics, healed_metrics, staged_run
from ..model import family_of, find_projections, load_model, param_count, token_windows
from ..space import importance
from .config import StudyConfig

# What a loaded model, its cache and its calibration were made from: a study that differs in any
# of these needs its own process.
SHARED = (
    "model",
    "device",
    "dtype",
    "device_map",
    "max_memory",
    "offload_dir",
    "family",
    "calibration",
    "cache_dir",
    "cache_memory",
)


class Measurer:
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
        self.model_params = param_count(model)
        self._latency = latency
        self._importances: Optional[Dict[str, Any]] = None
        self._heal_windows = None

    @classmethod
    def from_config(cls, config: StudyConfig, progress: bool = True) -> "Measurer":
        """Load the model (placed by ``device`` or ``device_map``), calibrate if the study has a
        calibration, and build the evaluator."""
        model, tokenizer = load_model(config.model, **config.placement)
        table = find_projections(model, config.family)
        cache = FactorCache(config.cache_dir, config.cache_memory)
        calibration = _calibration(config, model, tokenizer, table, cache, progress)
        evaluator = Evaluator(model, tokenizer, config.evaluation)
        return cls(
            config, model, tokenizer, evaluator, cache=cache, calibration=calibration, table=table, progress=progress
        )

    def for_study(self, config: StudyConfig) -> "Measurer":
        """This measurer for another study on the same loaded model: itself when nothing it holds
        differs, else a new one sharing the model, table, cache and calibration (and the evaluator
        and latency table where the study's are the same). A study that needs another model,
        placement, dtype, family, calibration or cache is refused in one line."""
        _check_shared(self.config, config, self.calibration)
        if config == self.config:
            return self
        evaluator = (
            self.evaluator
            if config.evaluation == self.config.evaluation
            else Evaluator(self.model, self.tokenizer, config.evaluation)
        )
        latency = self._latency if config.latency_table == self.config.latency_table else None
        other = self._sharing(config, evaluator, latency)
        if config.method == self.config.method:  # the same factors: the same importances
            other._importances = self._importances
        return other

    def with_evaluation(self, evaluation: EvalConfig) -> "Measurer":
        """A measurer of the same study that evaluates ``evaluation`` instead (e.g. perplexity alone)."""
        return self._sharing(self.config, Evaluator(self.model, self.tokenizer, evaluation), self._latency)

    def _sharing(self, config: StudyConfig, evaluator, latency: Optional[LatencyTable]) -> "Measurer":
        """A measurer on this one's model, table, cache and calibration."""
        kw = dict(cache=self.cache, calibration=self.calibration, table=self.table, progress=self.progress)
        return Measurer(config, self.model, self.tokenizer, evaluator, latency=latency, **kw)

    def latency(self) -> Optional[LatencyTable]:
        """The study's latency table (measured, or read from the cache, on first use), or None when
        the study needs none (:attr:`StudyConfig.uses_latency`)."""
        if not self.config.uses_latency:
            return None
        if self._latency is None:
            spec = self.config.latency_table or TableSpec()
            self._latency = latency_table(self.model, self.table, spec, self.config.cache_dir, progress=self.progress)
        return self._latency

    def importances(self) -> Dict[str, Any]:
        """Every projection's per-component :func:`dse.space.importance` under the study's
        method (factorizing on first use); needs a calibration with gradients."""
        if self._importances is None:
            self._importances = _importances(self)
        return self._importances

    def params_after(self, plan: Plan) -> int:
        return plan_size(self.model, plan, self.table).params_after

    def measure(self, plan: Plan, early_stop=None) -> Dict[str, Any]:
        """Decompose with ``plan``, evaluate, restore; return sizes, metrics (with every derived
        objective's value) and the seconds of each step (``decompose_seconds``, the evaluator's
        ``seconds/<measure>`` and ``eval_seconds``, ``restore_seconds``). ``early_stop``
        (multi-fidelity, see :func:`dse.evaluate.staged_run`) may end the evaluation early:
        :class:`dse.evaluate.EarlyStop` then carries the sizes and the metrics so far."""
        out, metrics = self._measured(plan, early_stop)
        return derive_metrics({**out, **metrics})

    def measure_baseline(self) -> Dict[str, Any]:
        """The dense model's :meth:`measure`; with a ``heal:`` block also its healed measures, which
        are its own (a dense model has nothing to heal), so it is evaluated once."""
        out, metrics = self._measured(Plan({}, self.config.method))
        if self.config.heal is not None:
            out.update(heal_steps=0, heal_seconds=0.0, **healed_metrics(derive_metrics(metrics)))
        return derive_metrics({**out, **metrics})

    def _measured(self, plan: Plan, early_stop=None):
        """(sizes, predicted latencies and step seconds; the evaluator's metrics) of ``plan``."""
        size = plan_size(self.model, plan, self.table)
        out: Dict[str, Any] = {**size.as_dict(), "n_modules": len(plan)}
        if self.latency() is not None:
            out.update(self.latency().predict(plan, self.table))
        t0 = time.perf_counter()
        try:
            with decomposed(self.model, plan, cache=self.cache, calibration=self.calibration, table=self.table):
                out["decompose_seconds"] = time.perf_counter() - t0
                if early_stop is not None:
                    metrics = staged_run(self.evaluator, self.config.multi_fidelity.first, early_stop, self.progress)
                else:
                    metrics = self.evaluator.run(progress=self.progress)
                t1 = time.perf_counter()
        except EarlyStop as stop:
            stop.metrics = {**out, **stop.metrics}
            raise
        out["restore_seconds"] = time.perf_counter() - t1
        return out, metrics

    def measure_healed(self, plan: Plan) -> Dict[str, Any]:
        """Decompose with ``plan``, heal by the study's ``heal:`` recipe, evaluate, restore: the
        evaluation's metrics under their healed names (``accuracy_healed`` ...) and what the heal
        did (``heal_steps``, ``heal_seconds``, ``heal_tokens_per_s``, ``heal_losses``). The model is restored bit-exact
        and the factor cache is not changed (:func:`dse.decompose.temporarily_healed`)."""
        heal = self.config.heal
        if heal is None:
            raise StudyError("heal: the study has no heal: block")
        if not len(plan):
            raise StudyError("plan: the dense plan has nothing to heal (see measure_baseline)")
        if self._heal_windows is None:
            text = heal.text.read()
            self._heal_windows = token_windows(self.tokenizer, text, heal.recipe.seq_len, where="heal.seq_len")
        with decomposed(self.model, plan, cache=self.cache, calibration=self.calibration, table=self.table):
            with temporarily_healed(self.model, self._heal_windows, heal.recipe, self.progress) as report:
                metrics = self.evaluator.run(progress=self.progress)
        done = dict(heal_steps=report.steps, heal_seconds=report.seconds, heal_tokens_per_s=report.tokens_per_s)
        return {**done, "heal_losses": report.losses, **healed_metrics(derive_metrics(metrics))}


def _importances(m: Measurer) -> Dict[str, Any]:
    """Every projection's per-component :func:`dse.space.importance` under ``m``'s method."""
    calibration = m.calibration
    if calibration is None or not calibration.grads:
        raise StudyError("calibration: importances need a calibration with gradients (allocation space, errormodel)")
    kw = dict(cache=m.cache, calibration=calibration, table=m.table, progress=m.progress)
    forms = factor_forms(m.model, m.table, m.config.method, **kw)
    return {n: importance(f, calibration.grads[n], calibration.stats_for(n).xtx) for n, f in forms.items()}


def _calibration(config: StudyConfig, model, tokenizer, table, cache: FactorCache, progress: bool):
    """The study's calibration (None without one). A streamed calibration for a data-aware method
    factorizes each layer into the factor cache as soon as its statistics are final."""
    if config.calibration is None:
        return None
    keeps = cache.memory != "none" or cache.directory is not None
    on_layer = None
    if config.calibration.streamed and config.method.needs_calibration and keeps:

        def on_layer(names, cal):
            factor_forms(model, names, config.method, cache=cache, calibration=cal, table=table)

    return calibrate(
        model,
        tokenizer,
        config.calibration,
        cache_dir=config.cache_dir,
        gradients=config.needs_importance,
        grad_moments=config.method.needs_grad_moments,
        on_layer=on_layer,
        progress=progress,
        table=table,
    )


def _check_shared(loaded: StudyConfig, config: StudyConfig, cal) -> None:
    """Refuse, in one line, a study that needs something other than what ``loaded``'s model,
    cache and calibration ``cal`` were made of."""
    for field in SHARED:
        if getattr(config, field) != getattr(loaded, field):
            raise StudyError(
                f"{field}: study {config.name!r} needs {getattr(config, field)!r}, but the loaded "
                f"model was made for {getattr(loaded, field)!r}; run it in its own process"
            )
    if config.needs_importance and (cal is None or not cal.grads):
        raise StudyError(f"space: study {config.name!r} needs a calibration with gradients; run it in its own process")
    if config.method.needs_grad_moments and (cal is None or not cal.has_grad_moments()):
        raise StudyError(f"method: study {config.name!r} needs output-gradient moments; run it in its own process")
