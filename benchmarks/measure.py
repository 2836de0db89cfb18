"""Helpers of the memory benchmarks: process memory from ``/proc`` (Linux), and one measurement
per fresh process, so that what one variant allocated never hides in another's peak."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from common import ROOT


def vm(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since start or :func:`reset_peak`), in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def reset_peak() -> None:
    """Start a new peak: ``VmHWM`` becomes ``VmRSS``."""
    Path("/proc/self/clear_refs").write_text("5")


def child(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; its last stdout line is a JSON object."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, script, "--child", *args], env=env, stdout=subprocess.PIPE, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
