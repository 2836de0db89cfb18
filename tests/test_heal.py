"""Healing (``dse.decompose.heal_``, ``dse heal``) on tiny models: the loss falls, ``factors`` keeps
every size, ``lora`` merges to exactly the model its adapters describe, sequential freezing leaves
the frozen factors bit-identical, a resumed heal ends where an uninterrupted one does, a failure
leaves the model as it was, and the healed ``transformers`` export loads without dse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from helpers import save_tiny_rank_config
from test_transformers_export import load_without_dse

from dse.cli import main
from dse.core.errors import ConfigError, HealError
from dse.decompose import (
    HealConfig,
    LowRankLinear,
    add_lora,
    decompose_,
    heal_,
    heal_memory,
    is_decomposed,
    low_rank_modules,
    uniform_plan,
)
from dse.model import find_projections, model_bytes, param_count
from dse.results.compressed import FORMATS, WEIGHTS_FILE, load_compressed, read_meta
from dse.results.rankconfig import RankConfig

SEQ = 16
SLOT = re.compile(r"_proj\.(?:factors\.)?(\d)(?:\.|$)")  # the factor index of a trained tensor's name


def decomposed(method: str = "svd", seed: int = 0):
    model = make_tiny("llama", seed=seed)
    decompose_(model, uniform_plan(find_projections(model), 3, method=method))
    return model


def windows(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Counting sequences (``s, s+1, ...`` mod 97) from random starts: a text a model can learn."""
    starts = torch.randint(0, 97, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(SEQ)) % 97


def recipe(**kw) -> HealConfig:
    return HealConfig(**{"steps": 12, "seq_len": SEQ, "batch": 4, "lr": 1e-2, **kw})


def state(model) -> dict:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def saved_size(model, config, folder) -> int:
    """Bytes of the weights file ``dse apply`` would write for ``model``."""
    folder.mkdir()
    FORMATS["dse"].write(model, config, folder)
    return (folder / WEIGHTS_FILE).stat().st_size


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_recipe_counts_steps_and_schedules_the_rate():
    assert HealConfig().total_steps == 100
    by_tokens = HealConfig(tokens=1000, seq_len=16, batch=4)
    assert by_tokens.total_steps == 16 and HealConfig.from_dict(by_tokens.to_dict()) == by_tokens  # 1000 / 64, up
    cosine = HealConfig(steps=10, warmup=2, schedule="cosine")
    assert [cosine.lr_factor(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and 0 < cosine.lr_factor(9) < 0.05
    assert HealConfig(steps=10, warmup=2).lr_factor(9) == 1.0
    sequential = HealConfig(freeze="sequential", switch_every=3)
    assert [sequential.phase(s, 2) for s in range(7)] == [0, 0, 0, 1, 1, 1, 0]
    assert HealConfig().phase(5, 2) is None


@pytest.mark.parametrize(
    "train, loss, freeze",
    [
        ("factors", "lm", "none"),
        ("lora", "lm", "none"),
        ("factors", "distill", "sequential"),
        ("lora", "distill", "none"),
    ],
)
def test_a_heal_lowers_the_training_loss(train, loss, freeze):
    model = decomposed()
    modules = low_rank_modules(model)
    report = heal_(
        model, windows(), recipe(steps=24, train=train, loss=loss, freeze=freeze, switch_every=4), progress=False
    )
    first, last = report.losses[0], sum(report.losses[-4:]) / 4
    assert last < 0.99 * first, report.losses
    assert report.steps == 24 and report.tokens == 24 * 4 * SEQ and report.tokens_per_s > 0
    # the same modules, frozen again, in eval mode, the dense originals still kept
    assert low_rank_modules(model) == modules and is_decomposed(model) and not model.training
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_factors_keep_every_size(method, tmp_path):
    model = decomposed(method)
    table = find_projections(model)
    config = RankConfig("tiny", "x", "float32", uniform_plan(table, 3, method=method))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    sizes = param_count(model), model_bytes(model)
    before, saved = state(model), saved_size(model, config, tmp_path / "before")
    heal_(model, windows(), recipe(freeze="sequential", switch_every=2), progress=False)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert (param_count(model), model_bytes(model)) == sizes
    assert saved_size(model, config, tmp_path / "after") == saved
    after = state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".factors." in n for n in changed)  # only factors train (no norms asked)


def test_lora_merges_to_the_model_its_adapters_describe():
    model = decomposed()
    modules = low_rank_modules(model)
    ids = windows(2, seed=5)
    start = logits(model, ids)
    seen = {}

    def on_step(step, loss):  # the adapter model as it stands after the last step
        if step == 7:
            model.eval()
            seen["logits"] = logits(model, ids)
            seen["adapters"] = sum("lora_" in n for n, _ in model.named_parameters())
            model.train()

    heal_(model, windows(), recipe(steps=8, train="lora", lora_rank=2), on_step=on_step, progress=False)
    merged = logits(model, ids)
    assert seen["adapters"] > 0 and not any("lora_" in n for n, _ in model.named_parameters())
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert (merged - start).abs().max() > 1e-3  # the adapters did something
    torch.testing.assert_close(merged, seen["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("train", ["factors", "lora"])
def test_sequential_freezing_leaves_the_frozen_factors_bit_identical(train):
    model = decomposed()
    k, trained = 3, []
    snaps = []

    def on_step(step, loss):
        snaps.append(
            {
                n: p.detach().clone()
                for n, p in model.named_parameters()
                if SLOT.search(n) and ("lora_" in n or train == "factors")
            }
        )

    config = recipe(steps=4 * k, train=train, freeze="sequential", switch_every=k, weight_decay=0.1)
    heal_(model, windows(), config, on_step=on_step, progress=False)
    for step in range(1, len(snaps)):
        phase = (step // k) % 2
        for n, value in snaps[step].items():
            same = torch.equal(value, snaps[step - 1][n])
            slot = int(SLOT.search(n).group(1))
            if slot != phase:
                assert same, (step, n)  # frozen this phase: untouched by decay or momentum
            else:
                trained.append(not same)
    assert trained and all(trained)


@pytest.mark.parametrize("train, freeze", [("factors", "none"), ("lora", "sequential")])
def test_resume_after_a_kill_gives_the_same_weights(train, freeze, tmp_path):
    config = recipe(
        steps=10, train=train, freeze=freeze, switch_every=2, schedule="cosine", warmup=2, weight_decay=0.01
    )
    whole = decomposed()
    heal_(whole, windows(), config, progress=False)

    model = decomposed()
    start = state(model)

    def kill(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal_(model, windows(), config, checkpoint_dir=tmp_path, checkpoint_every=3, on_step=kill, progress=False)
    assert all(torch.equal(start[n], t) for n, t in state(model).items())  # the interrupted model is as it was
    report = heal_(model, windows(), config, checkpoint_dir=tmp_path, checkpoint_every=3, progress=False)
    assert report.resumed_from == 6 and report.steps == 10 and len(report.losses) == 10
    final, expected = state(model), state(whole)
    for n in expected:
        torch.testing.assert_close(final[n], expected[n], rtol=0, atol=1e-6, msg=n)


def test_resume_refuses_a_checkpoint_of_another_recipe_or_text(tmp_path):
    heal_(decomposed(), windows(), recipe(steps=3), checkpoint_dir=tmp_path, progress=False)
    for text, config in ((windows(), recipe(steps=3, lr=1e-3)), (windows(seed=1), recipe(steps=3))):
        with pytest.raises(ConfigError, match=r"^checkpoint_dir: .* another recipe, text or model"):
            heal_(decomposed(), text, config, checkpoint_dir=tmp_path, progress=False)


@pytest.mark.parametrize("train", ["factors", "lora"])
def test_a_nan_loss_stops_in_one_line_and_leaves_the_model_as_it_was(train):
    model = decomposed()
    start, modules = state(model), low_rank_modules(model)

    def teacher(ids):
        return torch.full((*ids.shape, 97), float("nan"))

    with pytest.raises(HealError, match=r"^heal: the loss became nan at step 0; the model is left as it was") as e:
        heal_(model, windows(), recipe(train=train, loss="distill", norms=True), teacher=teacher, progress=False)
    assert "\n" not in str(e.value)
    assert state(model).keys() == start.keys() and all(torch.equal(start[n], t) for n, t in state(model).items())
    assert all(model.get_submodule(n) is m for n, m in modules.items())


def test_a_text_shorter_than_one_batch_is_refused():
    message = r"^heal\.batch: the text gives 3 windows of 16 tokens, fewer than one batch of 4$"
    with pytest.raises(ConfigError, match=message):
        heal_(decomposed(), windows(3), recipe(), progress=False)


def test_the_default_teacher_is_the_dense_model_exactly():
    """With the norms training, step 1's loss is the KL from the dense model (a separate copy) to
    the model as step 0 left it: the teacher swaps in the dense modules and the starting norms."""
    model, dense = decomposed(), make_tiny("llama")
    ids = windows(4)  # one batch: every step sees these windows (in some order; the mean does not care)
    seen = {}

    def on_step(step, loss):
        if step == 0:
            student, target = logits(model, ids), logits(dense, ids)
            seen["kl"] = torch.nn.functional.kl_div(
                student.log_softmax(-1).flatten(0, 1),
                target.log_softmax(-1).flatten(0, 1),
                log_target=True,
                reduction="batchmean",
            ).item()

    report = heal_(model, ids, recipe(steps=2, loss="distill", norms=True), on_step=on_step, progress=False)
    assert report.losses[1] == pytest.approx(seen["kl"], rel=1e-4)
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    assert norms and any(not torch.equal(model.get_parameter(n), dense.get_parameter(n)) for n in norms)


@pytest.mark.parametrize("method", ["svd", "tucker2"])
@pytest.mark.parametrize("train", ["factors", "lora"])
def test_heal_memory_counts_what_trains(method, train):
    """The estimate's trained part is four copies of exactly the tensors a heal trains."""
    model = make_tiny("llama")
    table = find_projections(model)
    plan = uniform_plan(table, 3, method=method)
    config = recipe(train=train, lora_rank=4, norms=True)
    estimate = heal_memory(model, table, plan, config, 4)
    decompose_(model, plan)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    if train == "lora":
        add_lora(model, low_rank_modules(model), 4, 8)
    marker = "lora_" if train == "lora" else ".factors."
    trained = sum(p.numel() for n, p in model.named_parameters() if marker in n)
    assert estimate["trained"] == 4 * 4 * (trained + norms)
    assert estimate["activations"] > 0 and estimate["logits"] == 4 * SEQ * 97 * (4 + 12)


def checkpointing(model) -> bool:
    """Whether transformers' activation checkpointing is on in any layer."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("train", ["factors", "lora"])
def test_recompute_trains_the_same_weights_with_less_kept(train):
    plain, recomputed, seen = decomposed(), decomposed(), []
    heal_(plain, windows(), recipe(steps=3, train=train), progress=False)
    heal_(
        recomputed,
        windows(),
        recipe(steps=3, train=train, recompute=True),
        on_step=lambda step, loss: seen.append(checkpointing(recomputed)),
        progress=False,
    )
    assert seen == [True] * 3 and not checkpointing(recomputed)  # on for the heal only
    for name, tensor in state(plain).items():
        torch.testing.assert_close(state(recomputed)[name], tensor, rtol=0, atol=1e-6, msg=name)
    model = make_tiny("llama")
    table = find_projections(model)
    kept = [
        heal_memory(model, table, uniform_plan(table, 3), recipe(recompute=r), 4)["activations"] for r in (False, True)
    ]
    assert kept[1] < kept[0]


# ---- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A saved tiny Llama (word-level tokenizer), its rank config and two word texts."""
    root = tmp_path_factory.mktemp("heal")
    save_tiny_rank_config(root)
    g = torch.Generator().manual_seed(0)
    for name, n in (("heal.txt", 800), ("eval.txt", 300)):
        (root / name).write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 96, (n,), generator=g)))
    return root


def test_healed_transformers_export_loads_without_dse(tiny_source, tmp_path):
    out = tmp_path / "healed"
    code = main(
        [
            "heal",
            str(tiny_source / "c.json"),
            "--out",
            str(out),
            "--format",
            "transformers",
            "--quiet",
            "--text",
            str(tiny_source / "heal.txt"),
            "--eval-text",
            str(tiny_source / "eval.txt"),
            "--eval-window",
            "32",
            "--steps",
            "6",
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--lr",
            "1e-2",
            "--checkpoint-every",
            "2",
        ]
    )
    assert code == 0
    assert not (tmp_path / "healed.checkpoint").exists()
    heal = read_meta(out)["heal"]
    assert len(heal) == 1 and heal[0]["recipe"]["steps"] == 6 and len(heal[0]["report"]["losses"]) == 6
    measured = heal[0]["perplexity"]["eval"]
    assert measured["before"] > 0 and measured["after"] > 0 and measured["before"] != measured["after"]

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    result = load_without_dse(out, ids, tmp_path)
    assert not result["dse_loaded"] and result["class"].startswith("DseLowRank")
    reference, _ = load_compressed(out)
    torch.testing.assert_close(result["logits"], logits(reference, ids), rtol=0, atol=1e-5)

    # healed again, from the folder: the recipe history grows, the sizes stay
    again = tmp_path / "again"
    assert (
        main(
            [
                "heal",
                str(out),
                "--out",
                str(again),
                "--quiet",
                "--text",
                str(tiny_source / "heal.txt"),
                "--steps",
                "2",
                "--seq-len",
                "32",
                "--batch",
                "2",
                "--train",
                "lora",
                "--loss",
                "distill",
            ]
        )
        == 0
    )
    assert len(read_meta(again)["heal"]) == 2
    assert (again / WEIGHTS_FILE).stat().st_size == (out / WEIGHTS_FILE).stat().st_size
    model, _ = load_compressed(again)
    assert all(isinstance(m, LowRankLinear) for m in low_rank_modules(model).values())


def test_estimate_sizes_the_study_heal_per_train_choice(benchmarks_dir):
    import yaml

    from dse.study.config import study_config_from_dict
    from dse.study.estimate import estimate

    path = Path(__file__).resolve().parents[1] / "studies" / "smollm2-quick.yaml"
    data = yaml.safe_load(path.read_text())
    text = {"path": str(benchmarks_dir / "wikitext/wikitext2_raw_test_pages.jsonl"), "field": "page", "rows": [12, 40]}
    config = study_config_from_dict({**data, "heal": {"text": text, "batch": 2, "lora_rank": 4}}, path)
    assert config.heal.recipe.batch == 2 and config.heal.text.rows == (12, 40)
    lines = {line.what: line.host for line in estimate(config).lines}
    assert 0 < lines["heal, train lora (2 x 256 tokens)"] < lines["heal, train factors (2 x 256 tokens)"]


def test_a_killed_dse_heal_resumes_to_the_same_model(tiny_source, tmp_path):
    """``kill -9`` (of a separate process) after a checkpoint, then the same command: the model an
    uninterrupted ``dse heal`` writes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]

    def command(out):
        return [
            "heal",
            str(tiny_source / "c.json"),
            "--out",
            str(out),
            "--quiet",
            "--text",
            str(tiny_source / "heal.txt"),
            "--steps",
            "40",
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--lr",
            "1e-2",
            "--schedule",
            "cosine",
            "--checkpoint-every",
            "2",
        ]

    proc = subprocess.Popen(
        [sys.executable, "-m", "dse.cli", *command(tmp_path / "killed")],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "killed.checkpoint" / "heal.pt"
    while not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=600) == -signal.SIGKILL and checkpoint.exists() and not (tmp_path / "killed").exists()
    assert main(command(tmp_path / "killed")) == 0 and main(command(tmp_path / "whole")) == 0
    report = read_meta(tmp_path / "killed")["heal"][0]["report"]
    assert report["resumed_from"] >= 2 and report["steps"] == 40 and not checkpoint.exists()
    whole, _ = load_compressed(tmp_path / "whole")
    resumed, _ = load_compressed(tmp_path / "killed")
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
