"""The fast evaluation engine (dse.evaluate.engine) gives HFLM's per-request loglikelihoods and
is_greedy (1e-4 in float32) and HFLM's accuracy, on every local task, a user YAML task and every
causal family (left truncation and a sliding window included); what it cannot speed up falls back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, TINY

from dse.core.errors import ConfigError
from dse.evaluate import BENCHMARK_FILES, EvalConfig, Evaluator, load_tasks
from dse.evaluate.engine import InMemoryLM, SharedContextLM, batches

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def requests_of(name: str, benchmarks_dir, limit: int, include_path=None):
    task = load_tasks([name], benchmarks_dir, include_path)[name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def assert_same(model, tokenizer, requests, max_length: int = 2048, batch_size: int = 4) -> SharedContextLM:
    plain = InMemoryLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    fast = SharedContextLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    expected, got = plain.loglikelihood(requests), fast.loglikelihood(requests)
    assert len(got) == len(expected) == len(requests)
    for (want, want_greedy), (have, have_greedy) in zip(expected, got):
        assert have == pytest.approx(want, abs=TOL)
        assert have_greedy == want_greedy
    return fast


def causal_tiny(family: str, vocab: int, **extra):
    """A tiny model of ``family`` with the real tokenizer's vocabulary (cf. conftest.make_tiny)."""
    cls_name, options, _ = TINY[family]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**{**options, "vocab_size": vocab, **extra})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


LOCAL_TASKS = [*BENCHMARK_FILES, "piqa_qa"]  # the shared benchmarks and the README's user YAML task


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_same_scores_and_accuracy_on_every_local_task(name, tiny_llama, tokenizer, benchmarks_dir):
    include = str(ROOT / "tasks") if name == "piqa_qa" else None
    requests = requests_of(name, benchmarks_dir, 12, include)
    fast = assert_same(tiny_llama, tokenizer, requests)
    assert fast.mode == "head"  # Llama: the tied head on the last hidden states
    data = str(benchmarks_dir)
    config = EvalConfig(tasks=[name], limit=12, batch_size=4, data_dir=data, include_path=include, engine="fast")
    evaluator = Evaluator(tiny_llama, tokenizer, config)
    assert isinstance(evaluator.lm, SharedContextLM)
    accuracy = evaluator.accuracy(name)
    evaluator.lm = InMemoryLM(tiny_llama, tokenizer, batch_size=4, max_length=2048)
    assert evaluator.accuracy(name) == accuracy


CAUSAL = [f for f in FAMILIES if TINY[f][2] is None]


@pytest.mark.parametrize("family", CAUSAL)
def test_same_scores_on_every_causal_family_with_truncation(family, tokenizer, benchmarks_dir):
    """max_length 24 truncates most ARC requests from the left (HFLM's rule); Gemma 3's tiny
    sliding window (8) is crossed by every context."""
    model = causal_tiny(family, len(tokenizer))
    requests = requests_of("arc_easy", benchmarks_dir, 8)
    assert max(len(tokenizer(r.args[0] + r.args[1]).input_ids) for r in requests) > 25
    assert_same(model, tokenizer, requests, max_length=24, batch_size=3)


def test_gemma_soft_capping_and_a_head_that_is_not_the_logits(tokenizer, benchmarks_dir):
    requests = requests_of("piqa", benchmarks_dir, 6)
    capped = causal_tiny("gemma3_text", len(tokenizer), final_logit_softcapping=0.5)
    assert assert_same(capped, tokenizer, requests).mode == "head"
    scaled = transformers.CohereForCausalLM(  # logits = head(hidden) * logit_scale: scored from full logits
        transformers.CohereConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            logit_scale=3.0,
        )
    ).eval()
    assert assert_same(scaled, tokenizer, requests).mode == "logits"


def test_generation_and_rolling_fall_back_saying_so_once(tiny_llama, tokenizer, caplog):
    from lm_eval.api.instance import Instance

    plain = InMemoryLM(tiny_llama, tokenizer, batch_size=2, max_length=64)
    fast = SharedContextLM(tiny_llama, tokenizer, batch_size=2, max_length=64)
    generate = [
        Instance("generate_until", {}, (text, {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}), i)
        for i, text in enumerate(["The cat sat on", "Water is"])
    ]
    rolling = [Instance("loglikelihood_rolling", {}, (text * 9,), i) for i, text in enumerate(["one two. ", "a b c "])]
    with caplog.at_level(logging.WARNING, logger="dse.evaluate.engine"):
        for _ in range(2):
            assert fast.generate_until(generate) == plain.generate_until(generate)
            assert fast.loglikelihood_rolling(rolling) == pytest.approx(plain.loglikelihood_rolling(rolling), abs=TOL)
    said = [r.getMessage() for r in caplog.records if r.name == "dse.evaluate.engine"]
    assert said == [
        "evaluation.engine fast: generate_until requests run lm-eval's plain HFLM path",
        "evaluation.engine fast: loglikelihood_rolling requests run lm-eval's plain HFLM path",
    ]


def test_engine_switch(tiny_llama, tokenizer, benchmarks_dir):
    with pytest.raises(ConfigError, match=r"^evaluation.engine: must be one of fast, hflm, got 'quick'$"):
        EvalConfig(tasks=["piqa"], engine="quick")
    config = EvalConfig.from_dict({"tasks": ["piqa"], "engine": "hflm", "limit": 2, "data_dir": str(benchmarks_dir)})
    evaluator = Evaluator(tiny_llama, tokenizer, config)
    assert type(evaluator.lm) is InMemoryLM
    metrics = evaluator.run(progress=False)
    assert set(metrics) == {"acc/piqa", "accuracy", "seconds/piqa", "eval_seconds"}
    assert 0 < metrics["seconds/piqa"] <= metrics["eval_seconds"]
    fast = EvalConfig.from_dict({"tasks": ["piqa"], "engine": "fast", "limit": 2, "data_dir": str(benchmarks_dir)})
    assert type(Evaluator(tiny_llama, tokenizer, fast).lm) is SharedContextLM
    assert EvalConfig().engine == "fast"  # the quick study gives the same trials with both (docs/speed.md)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hellaswag", "arc_challenge"])
def test_smollm2_same_scores(name, smollm2, benchmarks_dir):
    model, tokenizer = smollm2
    fast = assert_same(model, tokenizer, requests_of(name, benchmarks_dir, 6), batch_size=8)
    assert fast.mode == "head"


def padded(tails, chunks) -> int:
    """Positions run by passes over ``chunks``, written out: each context batch pads to its
    longest context, its continuation pass to its longest continuation."""
    out = 0
    for chunk in chunks:
        fed = [t for p in chunk for t in tails[p]]
        out += len(chunk) * max(map(len, chunk)) + (len(fed) * max(fed) if fed else 0)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_batches_hold_every_prefix_once_and_pad_no_more_than_sorting_by_length(seed):
    """Contexts short with long answers of varied length (PIQA's shape) batch by their answers;
    contexts of varied length with short answers (ARC's) by themselves."""
    import random

    rng = random.Random(seed)
    for context, answer in [((3, 6), (5, 60)), ((10, 120), (1, 4))]:
        tails = {
            tuple(range(i, i + rng.randint(*context))): [rng.randint(*answer) for _ in range(rng.randint(2, 4))]
            for i in range(40)
        }
        chunks = batches(tails, 8)
        assert sorted(p for c in chunks for p in c) == sorted(tails) and max(map(len, chunks)) <= 8
        by_length = [sorted(tails, key=lambda p: (-len(p), p))[i : i + 8] for i in range(0, 40, 8)]
        assert padded(tails, chunks) <= padded(tails, by_length)
        one = batches(tails, 8, one_length=True)
        assert all(len({len(p) for p in c}) == 1 for c in one)
