"""The cluster recipes of docs/cluster.md, run as written against a loopback PostgreSQL.

``deploy/slurm/dse-array.sbatch`` is run by bash with the variables SLURM sets for three array
tasks, and the container command of ``deploy/k8s/dse-job.yaml`` with those an Indexed Job sets for
two pods; all of them start at once, share one factor cache folder and fill one study. Needs a
server: ``bash .ci/postgres.sh`` starts one and writes ``DSE_TEST_POSTGRES_URL`` to
``.ci/postgres.env``; without it the tests skip, saying so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import BENCHMARKS
from optuna.trial import TrialState

from dse.study.config import load_study_config
from dse.study.storage import open_study

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("DSE_TEST_POSTGRES_URL")
pytestmark = pytest.mark.slow


def _study(tmp_path, model_dir, n_trials: int) -> Path:
    text = {"path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"), "field": "page"}
    study = {
        "name": f"cluster-{uuid.uuid4().hex[:8]}",
        "model": str(model_dir),
        "space": {"name": "tiny", "model": str(model_dir), "ranks": [4, 2, "dense"], "group": "module"},
        "method": "svdllm",
        "calibration": {"text": {**text, "rows": [40, 42]}, "n_samples": 4, "seq_len": 32, "streamed": True},
        "evaluation": {"tasks": [], "perplexity": {"text": {**text, "rows": [0, 2]}, "window": 64, "max_tokens": 256}},
        "objectives": ["perplexity", "params"],
        "sampler": "random",
        "n_trials": n_trials,
        "baselines": ["dense", {"ratio": 0.3}],
        "cache": {"dir": str(tmp_path / "shared-cache")},
        "heartbeat_s": 1,
        "grace_s": 10,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
    return {
        **env,
        "DSE": f"{sys.executable} -m dse.cli",
        "PYTHONPATH": str(ROOT),
        "DSE_STORAGE": PG_URL,
        "DSE_WAIT": "300",
        **extra,
    }


def _run_all(commands, envs, tmp_path):
    logs = [tmp_path / f"worker-{i}.log" for i in range(len(envs))]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        for cmd, env, log in zip(commands, envs, logs)
    ]
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]


def _check(path: Path, n_trials: int) -> None:
    config = load_study_config(path)
    study = open_study(config, PG_URL, create=False)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) >= n_trials and TrialState.RUNNING not in states
    assert "baseline" in study.user_attrs and study.user_attrs["baselines_enqueued"]
    forms = [
        f for f in Path(config.cache_dir).rglob("model.layers.*.pt") if not f.parent.name.startswith("calibration-")
    ]
    stats = list(Path(config.cache_dir).glob("calibration-*/index.pt"))
    assert len(stats) == 1 and forms  # one calibration and one set of factors, shared by every worker


@pytest.fixture
def recipe_study(tmp_path, tiny_llama_dir):
    if not PG_URL:
        pytest.skip(
            "DSE_TEST_POSTGRES_URL is not set (bash .ci/postgres.sh starts a loopback PostgreSQL; "
            "export the URL it writes to .ci/postgres.env)"
        )
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark data not found at {BENCHMARKS}")
    return _study(tmp_path, tiny_llama_dir, n_trials=8)


def test_slurm_array_recipe(recipe_study, tmp_path):
    script = ROOT / "deploy" / "slurm" / "dse-array.sbatch"
    assert "#SBATCH --array=" in script.read_text()
    envs = [_environment(SLURM_ARRAY_TASK_ID=str(i), SLURM_CPUS_PER_TASK="1") for i in range(3)]
    _run_all([["bash", str(script), str(recipe_study)]] * 3, envs, tmp_path)
    _check(recipe_study, 8)


def test_kubernetes_indexed_job_recipe(recipe_study, tmp_path):
    job = yaml.safe_load((ROOT / "deploy" / "k8s" / "dse-job.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    container = job["spec"]["template"]["spec"]["containers"][0]
    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    envs = [_environment(**{**plain, "DSE_STUDY": str(recipe_study), "JOB_COMPLETION_INDEX": str(i)}) for i in range(2)]
    envs = [{**env, "OMP_NUM_THREADS": "1"} for env in envs]  # two pods on this 2-core machine
    _run_all([container["command"]] * 2, envs, tmp_path)
    _check(recipe_study, 8)
