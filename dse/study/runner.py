"""Optuna studies over rank plans: storage, sampler, baselines, and the optimisation loop.

``run_study(config)`` creates or resumes the study named in ``config`` in its storage, evaluates
the undecomposed baseline once (kept in the study's user attributes), enqueues the configured
baseline plans once, and runs trials until ``n_trials`` trials have finished (complete or pruned),
so running it again resumes where it stopped.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ..core.errors import ConfigError, StorageError, StudyError
from .config import StudyConfig
from .pinning import available_cores, parse_devices, start_pinned, visible_gpus, worker_slots
from .samplers import optuna_log_level, quiet_optuna
from .storage import open_study
from .worker import Worker

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
log = logging.getLogger("dse")


def enqueue_baselines(study: optuna.Study, config: StudyConfig) -> None:
    """Enqueue the configured baseline plans once per study (marked in the study's attributes)."""
    if study.user_attrs.get("baselines_enqueued"):
        return
    for baseline in config.baselines:
        study.enqueue_trial(
            {}, user_attrs={"baseline": baseline.label, "baseline_spec": [baseline.kind, baseline.value]}
        )
    study.set_user_attr("baselines_enqueued", True)


def _warn_unsteered(config: StudyConfig) -> None:
    if config.constraints and not config.sampler.unit.honours_constraints:
        log.warning(
            f"dse: warning: sampler: {config.sampler.name} cannot steer by the study's constraints; "
            "they still decide which trials are feasible"
        )


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@optuna_log_level()
def run_study(
    config: StudyConfig,
    *,
    n_trials: Optional[int] = None,
    storage: Optional[str] = None,
    progress: bool = True,
    measurer=None,
    join: bool = False,
    wait: float = 0.0,
) -> optuna.Study:
    """Create or resume the study and run trials until ``n_trials`` have finished in total.

    ``join=True`` only joins a study that exists (as ``dse worker`` does; waiting up to ``wait``
    seconds for another process to create it) and enqueues nothing;
    the process that creates the study enqueues the baselines and the space's starts, once. ``measurer`` (a
    :class:`dse.study.measure.Measurer`) reuses a loaded model
    (:meth:`~dse.study.measure.Measurer.for_study`). KeyboardInterrupt marks the running trial
    failed and propagates; running again resumes.
    """
    _warn_unsteered(config)
    if measurer is None:
        config.evaluation.check_tasks()  # a misspelt task fails before any study or model is made
    target = n_trials or config.n_trials
    study = _joined(config, storage, wait) if join else open_study(config, storage)
    if not join:
        enqueue_baselines(study, config)
    done = finished_trials(study)
    if done >= target:
        return study
    worker = Worker.from_config(config, progress=progress, measurer=measurer)
    worker.prepare(study, target)
    if not join:
        worker.enqueue_starts(study)
    deadline = time.monotonic() + config.timeout if config.timeout else None
    try:
        # Failed trials do not count: run rounds until the target is met, or a round finishes nothing.
        while (remaining := target - finished_trials(study)) > 0:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            study.optimize(
                worker.objective,
                n_trials=remaining,
                timeout=timeout,
                catch=(Exception,),
                callbacks=[optuna.study.MaxTrialsCallback(target, states=FINISHED), worker.bar],
                gc_after_trial=False,
            )
            if target - finished_trials(study) == remaining:
                break  # every trial of the round failed: see their "error" attributes
        _settle(study, worker, config, storage or config.storage_url)
    finally:
        worker.bar.close()
    return study


def _joined(config: StudyConfig, storage: Optional[str], wait: float) -> optuna.Study:
    """The existing study, polled for up to ``wait`` seconds (a cluster job's workers may start
    before the process that creates it)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return open_study(config, storage, create=False, shared=True)
        except StorageError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def _settle(study: optuna.Study, worker, config: StudyConfig, url: str) -> None:
    """Before a worker leaves: a trial still RUNNING whose worker died (no heartbeat for
    ``grace_s``) is failed and its retry run here, so no trial is left RUNNING forever. Waits at
    most ``grace_s + 2·heartbeat_s`` for other workers' running trials. Journal storage has no
    heartbeats, so nothing is done there."""
    if url.startswith("journal:"):
        return
    deadline = time.monotonic() + config.grace_s + 2 * config.heartbeat_s
    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or _retries(study):
        with quiet_optuna():
            optuna.storages.fail_stale_trials(study)
        if _retries(study):
            study.optimize(
                worker.objective,
                n_trials=len(_retries(study)),
                catch=(Exception,),
                callbacks=[worker.bar],
                gc_after_trial=False,
            )
        elif time.monotonic() > deadline:
            return
        else:
            time.sleep(config.heartbeat_s)


def _retries(study: optuna.Study) -> list:
    """WAITING trials that re-run a trial whose worker died."""
    with quiet_optuna():
        return [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None
        ]


def run_workers(
    config: StudyConfig,
    n_workers: int,
    *,
    n_trials: Optional[int] = None,
    storage: Optional[str] = None,
    devices: Optional[str] = None,
) -> optuna.Study:
    """Create the study, enqueue its baselines, then run ``n_workers`` ``dse worker`` processes,
    each pinned to its share of the cores and, with ``devices`` (``auto`` or ``cuda:0,cuda:1,...``),
    of the GPUs (see :mod:`dse.study.pinning`)."""
    url = storage or config.storage_url
    gpus = None if devices is None else parse_devices(devices, visible_gpus())
    slots = worker_slots(n_workers, gpus, available_cores())
    config.evaluation.check_tasks()
    if url.startswith("sqlite"):
        raise ConfigError(
            "storage: several workers need journal:///FILE (one host) or postgresql://... (many hosts), not SQLite"
        )
    study = open_study(config, url)
    enqueue_baselines(study, config)
    cmd = [sys.executable, "-m", "dse.cli", "worker", str(config.path), "--storage", url, "--quiet"]
    if n_trials:
        cmd += ["--n-trials", str(n_trials)]
    procs = [start_pinned(cmd, slot) for slot in slots]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.wait()  # each worker got the SIGINT too: it marks its trial and exits
        raise
    if any(codes):
        raise StudyError(f"workers: exited with status {codes}; their messages are above")
    return study
