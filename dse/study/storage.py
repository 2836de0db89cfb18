"""Study storage: an Optuna storage chosen by URL, and the study of a config opened in it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from ..core.errors import ConfigError, StorageError
from ..results.record import TrialRecord
from .config import StudyConfig
from .samplers import quiet_optuna


def make_storage(url: str, heartbeat_s: int = 30, grace_s: int = 120):
    """An Optuna storage from a URL.

    ``sqlite:///FILE``, ``postgresql://...``, ``mysql://...``: RDB storage with heartbeats (a trial
    whose worker fell silent for ``grace_s`` seconds is failed and re-queued once);
    ``journal:///FILE``: Optuna's journal file storage (several processes on one host).
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:") :].removeprefix("//"))  # journal:///abs or journal:rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise StorageError(f"storage: {url!r} is not a URL (sqlite:///FILE, postgresql://..., journal:///FILE)")
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return _rdb_storage(url, heartbeat_s, grace_s)
    except Exception as e:  # sqlalchemy: bad URL, missing driver, server unreachable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"storage: cannot open {_redact(url)}: {msg}") from None


SCHEMA_ATTEMPTS = 6


def _rdb_storage(url: str, heartbeat_s: int, grace_s: int):
    """Optuna's RDB storage, which creates its tables in a new database. Workers that start together
    on a new database race to create them, and PostgreSQL fails the losers' ``CREATE TABLE`` (a
    duplicate key in its catalogue, or the table already there): those try again, finding the
    tables made."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            with quiet_optuna():
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace_s,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                )
        except (IntegrityError, ProgrammingError) as e:
            lost_race = "duplicate key" in str(e) or "already exists" in str(e)
            if not lost_race or attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * 2**attempt)


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def _constraints(trial):
    return TrialRecord.of(trial).constraints or []


def make_sampler(config: StudyConfig, shared: bool = False):
    """The study's sampler (see :meth:`dse.study.samplers.SamplerConfig.make`)."""
    return config.sampler.make(config.seed, _constraints if config.constraints else None, shared)


def open_study(
    config: StudyConfig, storage: Optional[str] = None, *, create: bool = True, shared: bool = False
) -> optuna.Study:
    """The study ``config.name`` in ``storage`` (or the config's), created if ``create``;
    ``shared`` when several workers run it (see :func:`make_sampler`)."""
    url = storage or config.storage_url
    if not create and url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise StorageError(f"storage: no study database at {url[len('sqlite:///') :]} (run `dse run` first)")
    storage_obj = make_storage(url, config.heartbeat_s, config.grace_s)
    if create:
        study = optuna.create_study(
            study_name=config.name,
            storage=storage_obj,
            sampler=make_sampler(config, shared),
            directions=config.directions,
            load_if_exists=True,
        )
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in config.directions]:
            raise ConfigError(
                f"objectives: the stored study {config.name!r} has other directions; use a new study name"
            )
        return study
    try:
        return optuna.load_study(study_name=config.name, storage=storage_obj, sampler=make_sampler(config, shared))
    except KeyError:
        raise StorageError(f"storage: no study named {config.name!r} in {_redact(url)}") from None
