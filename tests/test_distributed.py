"""Several worker processes on one study: PostgreSQL (with a SIGKILLed worker) and a journal file.

The PostgreSQL tests need a server: ``.ci/run`` starts one and sets ``DSE_TEST_POSTGRES_URL``;
without it they skip, saying so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import yaml
from conftest import BENCHMARKS
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from dse.results.record import TrialRecord
from dse.study.config import load_study_config
from dse.study.runner import open_study
from dse.study.storage import make_storage

PG_URL = os.environ.get("DSE_TEST_POSTGRES_URL")


def write_study(tmp_path, model_dir, name, n_trials):
    study = {
        "name": name,
        "model": str(model_dir),
        # 3^28 plans: a random sampler repeats one only by accident, which the test would catch
        "space": {"name": "tiny", "model": str(model_dir), "ranks": [4, 2, "dense"], "group": "module"},
        "evaluation": {
            "tasks": [],
            "perplexity": {
                "text": {
                    "path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"),
                    "field": "page",
                    "rows": [0, 2],
                },
                "window": 128,
                "max_tokens": 512,
            },
        },
        "objectives": ["perplexity", "params"],
        "sampler": "random",
        "n_trials": n_trials,
        "heartbeat_s": 1,
        "grace_s": 4,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def start_workers(path, storage, n):
    """``n`` ``dse worker`` processes, one thread each (four on two cores would fight over OpenMP)."""
    cmd = [sys.executable, "-m", "dse.cli", "worker", str(path), "--storage", storage, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i in range(n):
        log = open(path.parent / f"worker-{i}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env))
        procs[-1].log = path.parent / f"worker-{i}.log"
    return procs


def wait_all(procs, timeout):
    end = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1, end - time.monotonic()))


def plan_key(trial):
    return tuple(sorted(trial.params.items()))


def worker_pid(trial) -> str:
    return (TrialRecord.of(trial).worker or "").rpartition(":")[2]  # each trial names its worker, host:pid


def kill_mid_trial(study, procs, timeout=300):
    """SIGKILL a worker while it runs a trial, once some trials have finished. Returns the killed
    processes, the numbers of the trials the last one left RUNNING, and every trial RUNNING at a kill.

    Trials are short, so a kill can land just after the victim finished its trial: it then held no
    trial and is simply gone, and the next running worker is killed (leaving at least one)."""
    by_pid = {str(p.pid): p for p in procs}
    killed, running_before, deadline = [], set(), time.monotonic() + timeout
    while time.monotonic() < deadline and len(by_pid) > 1:
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING and worker_pid(t) in by_pid]
        if sum(t.state == TrialState.COMPLETE for t in trials) < 4 or not running:
            time.sleep(0.2)
            continue
        victim = by_pid.pop(worker_pid(running[0]))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        killed.append(victim)
        after = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        running_before |= {t.number for t in after}
        held = {t.number for t in after if worker_pid(t) == str(victim.pid)}
        if held:
            return killed, held, running_before
    raise AssertionError(f"no kill landed during a trial in {timeout} s ({len(killed)} workers killed)")


@pytest.mark.slow
def test_postgres_four_workers_survive_sigkill(tmp_path, tiny_llama_dir):
    if not PG_URL:
        pytest.skip("DSE_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server for this test)")
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    target = 24
    path = write_study(tmp_path, tiny_llama_dir, f"pg-{uuid.uuid4().hex[:8]}", target)
    config = load_study_config(path)
    open_study(config, PG_URL)  # created once, before the workers join
    procs = start_workers(path, PG_URL, 4)
    storage = make_storage(PG_URL)
    study = optuna.load_study(study_name=config.name, storage=storage)

    try:
        killed, held, running_before = kill_mid_trial(study, procs)
        others = [p for p in procs if p not in killed]
        wait_all(others, timeout=600)
    finally:  # no worker outlives a failed test
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in others:
        assert p.returncode == 0, p.log.read_text()[-2000:]

    trials = study.get_trials()
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) >= target
    assert len(complete) + len(failed) == len(trials)
    # the killed worker's trial failed and was retried once, as a new trial with the same choices
    # (the kill may land while the plan is being sampled: the retry completes the choices made)
    assert held <= {t.number for t in failed} <= running_before
    retried = {
        RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t
        for t in trials
        if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None
    }
    for f in failed:
        assert f.number in retried and f.params.items() <= retried[f.number].params.items()
    # no plan evaluated twice by accident: the evaluated plans are distinct (a plan proposed again
    # reuses the earlier result and says so), and the workers did not all propose the same plans
    keys = [plan_key(t) for t in complete if TrialRecord.of(t).duplicate_of is None]
    assert len(set(keys)) == len(keys) and len(keys) >= target - 4


def test_journal_storage_two_workers(tmp_path, tiny_llama_dir):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    path = write_study(tmp_path, tiny_llama_dir, "journal", 6)
    url = f"journal://{tmp_path / 'study.log'}"  # journal:///abs/path
    config = load_study_config(path)
    open_study(config, url)
    procs = start_workers(path, url, 2)
    wait_all(procs, timeout=600)
    assert [p.returncode for p in procs] == [0, 0], procs[0].log.read_text()[-2000:]
    study = open_study(config, url, create=False)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert 6 <= len(complete) <= 7  # the second worker may finish the trial it had started
    evaluated = [plan_key(t) for t in complete if TrialRecord.of(t).duplicate_of is None]
    assert len(set(evaluated)) == len(evaluated) >= 5


OPEN_TOGETHER = """
import sys
from dse.study.storage import make_storage
print("ready", flush=True)
sys.stdin.readline()
make_storage(sys.argv[1])
"""


def test_workers_opening_a_new_postgres_database_together():
    """Six processes open a new PostgreSQL database at the same moment, as cluster workers do on their
    first start: Optuna's tables are created once, and no worker fails on another's ``CREATE TABLE``."""
    if not PG_URL:
        pytest.skip("DSE_TEST_POSTGRES_URL is not set (bash .ci/postgres.sh starts a loopback PostgreSQL)")
    import sqlalchemy

    name = f"dse_race_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    url = f"{PG_URL.rsplit('/', 1)[0]}/{name}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_TOGETHER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in procs)  # every one imported, none opened
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, "\n".join(e[-1500:] for e in errors if e)
        assert make_storage(url).get_all_studies() == []
    finally:
        for p in procs:
            p.kill()
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def test_a_lost_schema_race_is_tried_again(monkeypatch):
    """``make_storage`` opens the storage again when another process created Optuna's tables first,
    and turns any other database error into one line at once."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    from dse.core.errors import StorageError

    calls = []

    def storage(errors):
        def make(url, **kw):
            calls.append(url)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return "storage"

        return make

    race = IntegrityError(
        "CREATE TABLE studies",
        {},
        Exception('duplicate key value violates unique constraint "pg_type_typname_nsp_index"'),
    )
    exists = ProgrammingError("CREATE TABLE studies", {}, Exception('relation "studies" already exists'))
    monkeypatch.setattr("dse.study.storage.time.sleep", lambda s: None)
    monkeypatch.setattr(optuna.storages, "RDBStorage", storage([race, exists]))
    assert make_storage("postgresql://u@h/db") == "storage" and len(calls) == 3
    calls.clear()
    denied = ProgrammingError("CREATE TABLE studies", {}, Exception("permission denied for schema public"))
    monkeypatch.setattr(optuna.storages, "RDBStorage", storage([denied]))
    with pytest.raises(StorageError, match=r"^storage: cannot open postgresql://u:\*\*\*@h/db: .*permission denied"):
        make_storage("postgresql://u@h/db")
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", storage([race] * 10))
    with pytest.raises(StorageError, match="duplicate key"):
        make_storage("postgresql://u@h/db")
    assert len(calls) == 6
