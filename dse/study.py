"""Optuna studies over rank plans: storage, sampler, baselines, and the optimisation loop.

``run_study(config)`` creates or resumes the study named in ``config`` in its storage, evaluates
the undecomposed baseline once (kept in the study's user attributes), enqueues the configured
baseline plans once, and runs trials until ``n_trials`` trials have finished (complete or pruned),
so running it again resumes where it stopped.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from .baselines import baseline_label, parse_baseline
from .config import ConfigError, StudyConfig

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@contextmanager
def _quiet_optuna():
    """Optuna's experimental-feature warnings (heartbeats, grouped TPE) are not the user's concern.

    Also hidden: optuna 5 deprecates ``constraints_func`` (removal planned for v7) in favour of
    ``Trial.set_constraint``; ``dse`` keeps the former while it supports optuna 4.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
        yield


class StorageError(RuntimeError):
    pass


def make_storage(url: str, heartbeat_s: int = 30, grace_s: int = 120):
    """An Optuna storage from a URL.

    ``sqlite:///FILE``, ``postgresql://...``, ``mysql://...``: RDB storage with heartbeats (a trial
    whose worker fell silent for ``grace_s`` seconds is failed and re-queued once);
    ``journal:///FILE``: Optuna's journal file storage (several processes on one host).
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):].removeprefix("//"))  # journal:///abs or journal:rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise StorageError(f"storage: {url!r} is not a URL (sqlite:///FILE, postgresql://..., journal:///FILE)")
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_optuna():
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as e:  # sqlalchemy: bad URL, missing driver, server unreachable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"storage: cannot open {_redact(url)}: {msg}") from None


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def make_sampler(config: StudyConfig, shared: bool = False):
    """The study's sampler. ``shared``: one of several workers, so the seed is made distinct per
    process (equal seeds would make every worker propose the same plans) and TPE lies
    constantly about running trials so that workers spread out."""
    seed = config.seed + os.getpid() if shared else config.seed
    with _quiet_optuna():
        return _sampler(config, seed, shared)


def _sampler(config: StudyConfig, seed: int, shared: bool):
    constraints_func = _constraints if config.constraints else None
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=shared,
                                          constraints_func=constraints_func, n_startup_trials=8)
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func)
    if config.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=constraints_func)
    return optuna.samplers.RandomSampler(seed=seed)


def _constraints(trial):
    return trial.user_attrs.get("constraints", [])


def open_study(config: StudyConfig, storage: Optional[str] = None, *, create: bool = True,
               shared: bool = False) -> optuna.Study:
    """The study ``config.name`` in ``storage`` (or the config's), created if ``create``;
    ``shared`` when several workers run it (see :func:`make_sampler`)."""
    url = storage or config.storage_url
    if not create and url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise StorageError(f"storage: no study database at {url[len('sqlite:///'):]} (run `dse run` first)")
    storage_obj = make_storage(url, config.heartbeat_s, config.grace_s)
    if create:
        study = optuna.create_study(study_name=config.name, storage=storage_obj, sampler=make_sampler(config, shared),
                                    directions=config.directions, load_if_exists=True)
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in config.directions]:
            raise ConfigError(f"study.objectives: the stored study {config.name!r} has other directions; "
                              "use a new study name")
        return study
    try:
        return optuna.load_study(study_name=config.name, storage=storage_obj, sampler=make_sampler(config, shared))
    except KeyError:
        raise StorageError(f"storage: no study named {config.name!r} in {_redact(url)}") from None


def enqueue_baselines(study: optuna.Study, config: StudyConfig) -> None:
    """Enqueue the configured baseline plans once per study (marked in the study's attributes)."""
    if study.user_attrs.get("baselines_enqueued"):
        return
    for i, spec in enumerate(config.baselines):
        kind, value = parse_baseline(spec, f"study.baselines[{i}]")
        study.enqueue_trial({}, user_attrs={"baseline": baseline_label(kind, value), "baseline_spec": [kind, value]})
    study.set_user_attr("baselines_enqueued", True)


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_study(config: StudyConfig, *, n_trials: Optional[int] = None, storage: Optional[str] = None,
              progress: bool = True, worker=None, join: bool = False) -> optuna.Study:
    """Create or resume the study and run trials until ``n_trials`` have finished in total.

    ``join=True`` only joins a study that exists (as ``dse worker`` does) and enqueues nothing;
    the process that creates the study enqueues the baselines and the space's starts, once. ``worker`` (a
    :class:`dse.worker.Worker`) may be passed to reuse a loaded model. KeyboardInterrupt marks
    the running trial failed and propagates; running again resumes.
    """
    from .worker import Worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if worker is None:
        config.evaluation.check_tasks()  # a misspelt task fails before any study or model is made
    target = n_trials or config.n_trials
    study = open_study(config, storage, create=not join, shared=join)
    if not join:
        enqueue_baselines(study, config)
    done = finished_trials(study)
    if done >= target:
        return study
    if worker is None:
        worker = Worker.from_config(config, progress=progress)
    else:
        worker.config = config  # a loaded model reused for another study (space, objectives, baselines)
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
            study.optimize(worker.objective, n_trials=remaining, timeout=timeout, catch=(Exception,),
                           callbacks=[optuna.study.MaxTrialsCallback(target, states=FINISHED), worker.report],
                           gc_after_trial=False)
            if target - finished_trials(study) == remaining:
                break  # every trial of the round failed: see their "error" attributes
        _settle(study, worker, config, storage or config.storage_url)
    finally:
        worker.close()
    return study


def _settle(study: optuna.Study, worker, config: StudyConfig, url: str) -> None:
    """Before a worker leaves: a trial still RUNNING whose worker died (no heartbeat for
    ``grace_s``) is failed and its retry run here, so no trial is left RUNNING forever. Waits at
    most ``grace_s + 2·heartbeat_s`` for other workers' running trials. Journal storage has no
    heartbeats, so nothing is done there."""
    if url.startswith("journal:"):
        return
    deadline = time.monotonic() + config.grace_s + 2 * config.heartbeat_s
    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or _retries(study):
        with _quiet_optuna():
            optuna.storages.fail_stale_trials(study)
        if _retries(study):
            study.optimize(worker.objective, n_trials=len(_retries(study)), catch=(Exception,),
                           callbacks=[worker.report], gc_after_trial=False)
        elif time.monotonic() > deadline:
            return
        else:
            time.sleep(config.heartbeat_s)


def _retries(study: optuna.Study) -> list:
    """WAITING trials that re-run a trial whose worker died."""
    with _quiet_optuna():
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None]


def run_workers(config: StudyConfig, n_workers: int, *, n_trials: Optional[int] = None,
                storage: Optional[str] = None) -> optuna.Study:
    """Create the study, enqueue its baselines, then run ``n_workers`` ``dse worker`` processes."""
    import subprocess
    import sys

    url = storage or config.storage_url
    config.evaluation.check_tasks()
    if url.startswith("sqlite"):
        raise ConfigError("study.storage: several workers need journal:///FILE (one host) or "
                          "postgresql://... (many hosts), not SQLite")
    study = open_study(config, url)
    enqueue_baselines(study, config)
    cmd = [sys.executable, "-m", "dse.cli", "worker", str(config.path), "--storage", url, "--quiet"]
    if n_trials:
        cmd += ["--n-trials", str(n_trials)]
    procs = [subprocess.Popen(cmd) for _ in range(n_workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.wait()  # each worker got the SIGINT too: it marks its trial and exits
        raise
    if any(codes):
        raise RuntimeError(f"workers exited with status {codes}")
    return study
