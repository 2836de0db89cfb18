"""Pinned local workers: GPUs dealt out by CUDA_VISIBLE_DEVICES, cores by threads and affinity.

The environment each worker gets is checked in real child processes (what torch there sees);
GPU ids are checked on lists of ids, since no GPU is lent to this project's CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dse.cli import main
from dse.study import pinning
from dse.study.pinning import Slot, parse_devices, start_pinned, worker_slots


@pytest.mark.parametrize(
    "n, gpus, expected",
    [
        (4, ["3", "5", "6", "7"], [["3"], ["5"], ["6"], ["7"]]),
        (2, ["0", "1", "2", "3"], [["0", "1"], ["2", "3"]]),  # blocks, for a device_map over two GPUs
        (3, ["0", "1", "2", "3"], [["0"], ["1"], ["2"]]),
        (4, ["0", "1"], [["0"], ["1"], ["0"], ["1"]]),  # more workers than GPUs: round robin
        (2, [], [[], []]),  # --devices auto on a CPU host: none visible
    ],
)
def test_gpus_are_dealt_out(n, gpus, expected):
    slots = worker_slots(n, gpus, list(range(8)))
    assert [
        s.env["CUDA_VISIBLE_DEVICES"].split(",") if s.env["CUDA_VISIBLE_DEVICES"] else [] for s in slots
    ] == expected


@pytest.mark.parametrize("n, cores, threads", [(2, 8, 4), (3, 8, 2), (4, 2, 1), (1, 6, 6)])
def test_cores_are_split(n, cores, threads):
    slots = worker_slots(n, None, list(range(cores)))
    assert all(s.env["OMP_NUM_THREADS"] == s.env["MKL_NUM_THREADS"] == str(threads) for s in slots)
    assert all(len(s.cores) == threads and "CUDA_VISIBLE_DEVICES" not in s.env for s in slots)
    used = [c for s in slots for c in s.cores]
    if n * threads <= cores:
        assert len(set(used)) == len(used)  # no two workers share a core while there are enough


def test_devices_index_the_visible_gpus():
    visible = ["3", "5"]  # e.g. a SLURM job that was given GPUs 3 and 5
    assert parse_devices("cuda:1", visible) == ["5"]
    assert parse_devices("cuda:0,1", visible) == ["3", "5"]
    assert parse_devices("auto", visible) == visible
    for text, message in (
        ("cuda:2", "cuda:2 requested but this host has 2 visible GPU"),
        ("gpu0", "expected auto or a list"),
        ("0,cuda:0", "listed twice"),
    ):
        with pytest.raises(ValueError, match=f"^--devices: .*{message}"):
            parse_devices(text, visible)


PROBE = (
    "import json, os, torch; print(json.dumps({'threads': torch.get_num_threads(), "
    "'cores': sorted(os.sched_getaffinity(0)), 'cuda': torch.cuda.device_count(), "
    "'visible': os.environ.get('CUDA_VISIBLE_DEVICES')}))"
)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="this OS has no CPU affinity to check")
def test_each_worker_process_sees_only_its_share():
    cores = pinning.available_cores()
    slots = worker_slots(2, [], cores)  # --devices auto where no GPU is visible: every GPU hidden
    procs = [start_pinned([sys.executable, "-c", PROBE], slot, stdout=subprocess.PIPE, text=True) for slot in slots]
    seen = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    for slot, got in zip(slots, seen):
        assert got == {
            "threads": int(slot.env["OMP_NUM_THREADS"]),
            "cores": sorted(set(slot.cores)),
            "cuda": 0,
            "visible": "",
        }
    assert sum(s["threads"] for s in seen) <= max(len(cores), 2)


def test_run_workers_starts_each_worker_in_its_slot(tmp_path, tiny_llama_dir, monkeypatch):
    from helpers import write_study

    from dse.study import runner
    from dse.study.config import load_study_config

    started = []

    class Done:
        def wait(self):
            return 0

    monkeypatch.setattr(runner, "start_pinned", lambda cmd, slot: started.append((cmd, slot)) or Done())
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["0", "1", "2", "3"])
    monkeypatch.setattr(runner, "available_cores", lambda: list(range(8)))
    config = load_study_config(
        write_study(
            tmp_path, tiny_llama_dir, evaluation={"tasks": [], "latency": True}, objectives=["latency", "params"]
        )
    )
    runner.run_workers(config, 2, storage=f"journal://{tmp_path / 'j.log'}", devices="auto")
    assert [slot for _, slot in started] == [
        Slot({"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, (0, 1, 2, 3)),
        Slot({"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "2,3"}, (4, 5, 6, 7)),
    ]
    assert all(cmd[2:4] == ["dse.cli", "worker"] for cmd, _ in started)


def test_cli_devices_errors(tmp_path, tiny_llama_dir, capsys):
    from helpers import write_study

    path = write_study(
        tmp_path, tiny_llama_dir, evaluation={"tasks": [], "latency": True}, objectives=["latency", "params"]
    )
    assert main(["run", str(path), "--devices", "cuda:0"]) == 2
    assert "dse: error: --devices: pins several local workers" in capsys.readouterr().err
    journal = f"journal://{tmp_path / 'j.log'}"
    assert main(["run", str(path), "--workers", "2", "--devices", "cuda:7", "--storage", journal]) == 2
    assert "dse: error: --devices: cuda:7 requested but this host has" in capsys.readouterr().err
