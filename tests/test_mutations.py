"""Malformed values in the shipped study and space files, drawn by Hypothesis: each is accepted, or
refused as a user's mistake (a ``DseError``: ``dse`` prints one ``dse: error:`` line and exits 2);
no value reaches Python's own errors (a bug, exit 1 with a traceback)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from helpers import DELETE, mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dse.core.errors import DseError
from dse.space import space_from_dict
from dse.study.config import study_config_from_dict

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))
SPACES = sorted((ROOT / "spaces").glob("*.yaml"))
BAD = [
    DELETE,
    [],
    {},
    "",
    " ",
    0,
    -1,
    10**30,
    1e308,
    -1e308,
    math.nan,
    math.inf,
    -math.inf,
    True,
    None,
    b"\x00\xff\xfe",
    "\x00",
    ["x", 3],
    {"x": [1]},
    [[]],
    "../../../nowhere",
    0.5,
    "dense",
]


def paths(data, prefix=()):
    """Every key path of a nested mapping/list (the mutation sites)."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield prefix + (key,)
            yield from paths(value, prefix + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield prefix + (i,)
            yield from paths(value, prefix + (i,))


def anchored(data, base: Path):
    """``data`` with its relative paths made absolute against ``base`` (to move the file)."""
    if isinstance(data, dict):
        return {key: anchored(value, base) for key, value in data.items()}
    if isinstance(data, list):
        return [anchored(value, base) for value in data]
    return str((base / data).resolve()) if isinstance(data, str) and data.startswith(".") else data


def accepted_or_one_line(parse, data, path):
    try:
        parse(data)
    except DseError as e:
        assert "\n" not in str(e) and str(e).strip(), f"{path}: {e!r}"


@st.composite
def mutation(draw, files):
    path = draw(st.sampled_from(files))
    data = yaml.safe_load(path.read_text())
    site = draw(st.sampled_from(list(paths(data))))
    return path, data, site, draw(st.sampled_from(BAD))


@settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(mutation(STUDIES))
def test_a_mutated_study_file_is_accepted_or_refused_in_one_line(case):
    path, data, site, value = case
    accepted_or_one_line(lambda d: study_config_from_dict(d, path), mutated(data, site, value), site)


@settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(mutation(SPACES))
def test_a_mutated_space_file_is_accepted_or_refused_in_one_line(case):
    path, data, site, value = case

    def parse(d):
        space = space_from_dict(d)
        if getattr(space, "model_config", None):  # counted from its shapes, as `dse space` does
            space.describe(space.table())

    accepted_or_one_line(parse, mutated(data, site, value), site)


@pytest.mark.parametrize("value", [math.nan, b"\x00\xff", {"x": 1}])
def test_the_cli_prints_one_line_for_a_mutated_study(value, tmp_path, capsys):
    from dse.cli import main

    data = mutated(
        anchored(yaml.safe_load((ROOT / "studies" / "smollm2-quick.yaml").read_text()), ROOT / "studies"),
        ("n_trials",),
        value,
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.dump(data))
    assert main(["estimate", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dse: error: n_trials: "), err
