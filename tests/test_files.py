"""What ``dse`` writes for users honours the umask, like any file a plain ``open`` makes: a compressed
model on a shared filesystem is readable by whoever the umask lets read it."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import make_tiny

from dse.core.io import atomic_dir, atomic_path
from dse.decompose import FactorCache, decompose_, model_fingerprint, restore_, uniform_plan
from dse.model import find_projections
from dse.results.compressed import FORMATS, apply_config
from dse.results.rankconfig import RankConfig


@pytest.fixture()
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder):
    """``{relative path: mode}`` of ``folder`` and everything in it."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def expected(path, mask):
    return (0o777 if path.is_dir() else 0o666) & ~mask


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_an_applied_model_honours_the_umask(umask, fmt, tmp_path):
    model = make_tiny("llama")
    table = find_projections(model)
    config = RankConfig("tiny", model_fingerprint(model, table), "float32", uniform_plan(table, 4))
    out = apply_config(config, tmp_path / fmt, model=model, format=fmt)
    found = modes(out)
    assert "model.safetensors" in found  # safetensors writes private files: the one that was 0600
    assert found == {name: expected(out / name if name != "." else out, umask) for name in found}


@pytest.mark.parametrize("umask", [0o022], indirect=True)
def test_atomic_writes_and_the_factor_cache_honour_the_umask(umask, tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("a")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "private").touch(mode=0o600)
        (tmp / "sub").mkdir(mode=0o700)
    model = make_tiny("llama")
    table = find_projections(model)
    decompose_(model, uniform_plan(table, 2), cache=FactorCache(tmp_path / "cache"), table=table)
    restore_(model)
    found = {p: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert len(found) > 4 and all(mode == expected(p, umask) for p, mode in found.items()), found


def test_a_passing_suite_leaves_nothing_in_the_temp_folder(tmp_path):
    """The suite's own settings (``tmp_path_retention_policy``, torch.compile's cache in the session's
    temp folder) remove what its tests wrote: run this file's tests and a compiled-speed test in a
    fresh temp folder and measure what is left."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # as a fresh shell has it
    env.update(TMPDIR=str(temp), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__)),
            str(root / "tests" / "test_speed.py"),
            "-k",
            "applied_model or compiled_speed_of_a_config",  # torch.compile writes a kernel cache
            "-x",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    left = [p for p in temp.rglob("*") if p.is_file()]
    assert left == []  # the run wrote six model folders (600 kB kept with the retention policy "all")
