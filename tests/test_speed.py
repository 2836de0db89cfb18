"""``dse speed``: speed reports of a rank config, a compressed folder and a model, and its bad inputs."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import FAMILIES, make_tiny
from helpers import token_ids

from dse.cli import main
from dse.decompose import LowRankLinear, decompose_, model_fingerprint, plan_size, uniform_plan
from dse.evaluate.speed import SpeedConfig, copy_bandwidth, measure_speed
from dse.model import find_projections, load_model, model_bytes
from dse.model.timing import CompiledDecode, Timing, decode, prefill, timed
from dse.results.compressed import apply_config
from dse.results.rankconfig import RankConfig

QUICK = ["--prompt", "8", "--batch", "2", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"]


def test_timed_counts_repeats_and_orders_its_figures():
    calls = []
    timing = timed(lambda: calls.append(1), torch.device("cpu"), repeats=4, warmup=2)
    assert len(calls) == 6 and isinstance(timing, Timing) and timing.repeats == 4
    assert 0 <= timing.low <= timing.median <= timing.high and timing.spread >= 0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timed(lambda: None, torch.device("cpu"), repeats=0)


def test_measure_speed_reports_every_figure(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    report = measure_speed(model, tokenizer, SpeedConfig(prompt=8, batch=2, new_tokens=3, repeats=2), label="tiny")
    row = report.row()
    assert report.weight_bytes == model_bytes(model) and report.threads == torch.get_num_threads()
    for key in (
        "prefill_tokens_per_s",
        "ttft_ms",
        "decode_tokens_per_s",
        "decode_batch_tokens_per_s",
        "host_peak_bytes",
        "attained_bandwidth",
        "decode_ms_per_token",
    ):
        assert row[key] > 0, key
    assert row["workload_batch"] == 2 and set(report.spreads) == {"prefill", "ttft", "decode", "decode_batch"}
    assert report.attained_bandwidth == pytest.approx(report.weight_bytes * report.decode_tokens_per_s)
    assert copy_bandwidth(torch.device("cpu"), megabytes=16, repeats=2) > 1e8  # at least 0.1 GB/s


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.startswith("bert")])  # decoders
def test_compiled_decode_of_a_decomposed_model_follows_the_eager_one(family, monkeypatch):
    """The static cache and compiled step give the eager tokens and logits, every decoder family in
    one process (past torch's recompile limit of 8 models, which the reset keeps from falling back
    to eager silently). Inductor generates code for the Llama; the other families are traced by
    dynamo as a compile traces them and run by its ``eager`` backend (a third of the time: code
    generation for nine families would be five minutes of the suite)."""
    if family != "llama":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = make_tiny(family).eval()
    decompose_(model, uniform_plan(find_projections(model), 4))
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    ids = token_ids(batch=2, length=6)
    compiled = CompiledDecode(model, max_len=10)
    for steps in (1, 4, 2):  # the cache starts afresh at each prefill
        eager, fast = decode(model, prefill(model, ids), steps), compiled.decode(compiled.prefill(ids), steps)
        torch.testing.assert_close(fast.logits[:, -1], eager.logits[:, -1], rtol=1e-4, atol=1e-5)
        assert torch.equal(fast.logits[:, -1].argmax(-1), eager.logits[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="no room"):
        compiled.prefill(token_ids(batch=2, length=10))


@pytest.fixture()
def tiny_config(tiny_llama_dir, tmp_path):
    model, _ = load_model(str(tiny_llama_dir))
    table = find_projections(model)
    config = RankConfig(str(tiny_llama_dir), model_fingerprint(model, table), "float32", uniform_plan(table, 4))
    config.save(tmp_path / "config.json")
    return config, model, table


def test_speed_of_a_config_against_dense(tiny_config, tmp_path, capsys):
    config, model, table = tiny_config
    assert (
        main(
            [
                "speed",
                str(tmp_path / "config.json"),
                "--against",
                "dense",
                "--json",
                str(tmp_path / "s.json"),
                "--csv",
                str(tmp_path / "s.csv"),
                *QUICK,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ratio" in out and "decode tokens/s, batch 1" in out and "threads" in out
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [r["label"] for r in rows] == [str(tmp_path / "config.json"), f"dense {config.model}"]
    assert rows[0]["weight_bytes"] == plan_size(model, config.plan, table).bytes_after
    assert rows[1]["weight_bytes"] == model_bytes(model)
    assert (tmp_path / "s.csv").read_text().count("\n") == 3
    # the table shows GB/s where JSON and CSV keep bytes/s
    line = next(row for row in out.splitlines() if row.startswith("decode bandwidth, GB/s"))
    shown = [float(v) for v in line.split()[3:5]]
    assert shown == pytest.approx([r["attained_bandwidth"] / 1e9 for r in rows], abs=0.006)


def test_compiled_speed_of_a_config(tiny_config, tmp_path, capsys):
    assert main(["speed", str(tmp_path / "config.json"), "--compile", "--json", str(tmp_path / "c.json"), *QUICK]) == 0
    assert "decode compiled over a static cache" in capsys.readouterr().out
    report = json.loads((tmp_path / "c.json").read_text())[0]
    assert report["workload_compile"] is True and report["compile_seconds"] > 0
    assert report["decode_tokens_per_s"] > 0 and report["decode_batch_tokens_per_s"] > 0


def test_speed_of_a_compressed_folder_equals_its_config(tiny_config, tmp_path, capsys):
    config, model, _ = tiny_config
    folder = apply_config(config, tmp_path / "folder", model=model)
    assert main(["speed", str(folder), "--json", str(tmp_path / "f.json"), *QUICK]) == 0
    report = json.loads((tmp_path / "f.json").read_text())[0]
    assert report["weight_bytes"] == plan_size(model, config.plan, find_projections(model)).bytes_after


@pytest.mark.parametrize("case", ["not-a-model", "another-model", "dense-against-dense", "against-what"])
def test_bad_speed_targets_are_one_line(case, tiny_config, tiny_llama_dir, tmp_path, capsys):
    config, _, _ = tiny_config
    if case == "not-a-model":
        (tmp_path / "empty").mkdir()
        argv, expected = [str(tmp_path / "empty")], "model "
    elif case == "another-model":
        foreign = RankConfig(str(tiny_llama_dir), "0123456789abcdef", "float32", config.plan)
        foreign.save(tmp_path / "foreign.json")
        argv, expected = [str(tmp_path / "foreign.json")], "config.model.fingerprint: "
    elif case == "dense-against-dense":
        argv, expected = [str(tiny_llama_dir), "--against", "dense"], "against: "
    else:
        argv, expected = [str(tmp_path / "config.json"), "--against", "sparse"], "against: only 'dense'"
    assert main(["speed", *argv, *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # loading a model may draw transformers' progress bars
    assert err[-1].startswith(f"dse: error: {expected}") and sum("dse: error" in line for line in err) == 1, err
