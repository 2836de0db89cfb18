"""Helpers shared by several test modules: random plans, snapshots, a real tiny study."""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import BENCHMARKS, make_tiny

from dse.decompose import METHODS, Plan, is_decomposed
from dse.model import family_of, find_projections


@contextmanager
def registered(registry, name, unit):
    """``unit`` registered under ``name`` for the duration of the block."""
    registry.register(name, unit)
    try:
        yield unit
    finally:
        registry.unregister(name)


def token_ids(vocab: int = 97, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


class CharTokenizer:
    """Characters as token ids: enough for a tiny model's vocabulary of 97."""

    def __call__(self, s, return_tensors=None, add_special_tokens=False):
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 97 for c in s]])})()


def char_spec(tmp_path, streamed: bool = False, n_samples: int = 6, chars: int = 600):
    """A calibration of ``n_samples`` windows of 16 characters of a digit text written to ``tmp_path``."""
    from dse.decompose import CalibrationSpec
    from dse.model import TextSource

    text = tmp_path / "t.txt"
    text.write_text(" ".join(str(i % 90) for i in range(chars)))
    return CalibrationSpec(TextSource(path=str(text)), n_samples=n_samples, seq_len=16, seed=1, streamed=streamed)


def calibration_for(model, method: str):
    """Statistics over random tokens for data-aware methods (with output-gradient moments for
    those that need them); ``None`` for the others. A method that needs moments skips the test on
    a model with no language-modeling loss (a bare encoder), which cannot give them."""
    config = METHODS[method].config_cls
    if not config.needs_calibration:
        return None
    import pytest

    from dse.core.errors import ModelError
    from dse.decompose import collect_calibration

    try:
        return collect_calibration(
            model, token_ids(batch=8, length=16, seed=1), f"random-{method}", grad_moments=config.needs_grad_moments
        )
    except ModelError as e:  # tests/test_twosided.py checks this error
        pytest.skip(str(e))


def full_rank_plan(table, method: str) -> Plan:
    pair = METHODS[method].pair_ranks
    return Plan({n: ((p.full_rank, p.full_rank) if pair else p.full_rank) for n, p in table.items()}, method)


def random_plan(table, method: str, rng: random.Random) -> Plan:
    """A random subset of the modules (at least one) at random valid ranks."""
    names = [n for n in table if rng.random() < 0.5] or [rng.choice(list(table))]
    ranks = {}
    for n in names:
        full = table[n].full_rank
        ranks[n] = (rng.randint(1, full), rng.randint(1, full)) if METHODS[method].pair_ranks else rng.randint(1, full)
    return Plan(ranks, method)


def snapshot(model):
    """Copies of every parameter and buffer, and the module object at each projection."""
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    modules = {n: model.get_submodule(n) for n in find_projections(model)}
    return state, modules


def assert_unchanged(model, snap) -> None:
    state, modules = snap
    now = model.state_dict(keep_vars=True)
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    for n, m in modules.items():
        assert model.get_submodule(n) is m, n
    assert not is_decomposed(model)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class AgreementEvaluator:
    """Real metrics of the model in its current (decomposed) state on fixed random tokens."""

    def __init__(self, model, n_tasks: int = 2):
        g = torch.Generator().manual_seed(1)
        self.model = model
        self.inputs = [torch.randint(0, model.config.vocab_size, (2, 24), generator=g) for _ in range(n_tasks)]
        self.reference = [self._logits(x).argmax(-1) for x in self.inputs]

    def _logits(self, ids):
        with torch.no_grad():
            return self.model(ids).logits

    def run(self, progress=False):
        out = {}
        nll = []
        for i, (ids, ref) in enumerate(zip(self.inputs, self.reference)):
            logits = self._logits(ids)
            out[f"acc/task{i}"] = float((logits.argmax(-1) == ref).float().mean())
            nll.append(float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())))
        out["accuracy"] = float(np.mean([out[f"acc/task{i}"] for i in range(len(self.inputs))]))
        out["perplexity"] = math.exp(float(np.mean(nll)))
        out["eval_seconds"] = 0.0
        return out


def save_tiny_llama(folder: Path) -> Path:
    """A tiny random llama plus a word-level tokenizer in ``folder`` (loadable by dse.load_model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_tiny("llama")
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size - 1)} | {"<unk>": model.config.vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(folder)
    return folder


def save_tiny_rank_config(root: Path) -> Path:
    """``root/c.json``: the rank config (uniform rank 3) of a tiny Llama saved in ``root/tiny-llama``."""
    from dse.decompose import model_fingerprint, uniform_plan
    from dse.model import load_model
    from dse.results.rankconfig import RankConfig

    folder = save_tiny_llama(root / "tiny-llama")
    model, _ = load_model(str(folder))
    table = find_projections(model)
    config = RankConfig(str(folder), model_fingerprint(model, table), "float32", uniform_plan(table, 3))
    return config.save(root / "c.json")


STUDY_YAML = """\
name: tiny
model: {model}
space: {{name: tiny, model: {model}, ranks: [4, 8, dense], group: module}}
evaluation: {{tasks: [task0, task1]}}
objectives: [accuracy, params]
sampler: random
n_trials: {n_trials}
constraints: {{max_params: 0.97}}
baselines: [dense, {{uniform: 4}}, {{ratio: 0.3}}]
storage: sqlite:///study.db
"""


def build_study(root: Path, n_trials: int = 14):
    """Run a real tiny study from ``root/tiny.yaml`` into ``root/study.db``.

    Returns ``(study, config, model)``; the model is the one the worker measured (dense again).
    """
    from dse.model import load_model
    from dse.study.config import load_study_config
    from dse.study.measure import Measurer
    from dse.study.runner import run_study

    model_dir = save_tiny_llama(root / "tiny-llama")
    (root / "tiny.yaml").write_text(STUDY_YAML.format(model=model_dir, n_trials=n_trials))
    config = load_study_config(root / "tiny.yaml")
    model, tokenizer = load_model(str(model_dir))
    measurer = Measurer(config, model, tokenizer, AgreementEvaluator(model), progress=False)
    study = run_study(config, measurer=measurer, progress=False)
    return study, config, model


def write_study(tmp_path, model_dir, **overrides):
    """``tmp_path/study.yaml``: a tiny Llama study with real lm-eval (piqa) and perplexity; keys in
    ``overrides`` replace the defaults'."""
    space = {"name": "tiny", "model": str(model_dir), "ranks": [0.5, 0.25, 2, "dense"], "group": "layer"}
    study = {
        "name": "tiny-study",
        "model": str(model_dir),
        "space": space,
        "evaluation": {
            "tasks": ["piqa"],
            "limit": 4,
            "batch_size": 4,
            "data_dir": str(BENCHMARKS),
            "perplexity": {
                "text": {
                    "path": str(BENCHMARKS / "wikitext/wikitext2_raw_test_pages.jsonl"),
                    "field": "page",
                    "rows": [0, 1],
                },
                "window": 64,
                "max_tokens": 256,
            },
        },
        "objectives": ["accuracy", "params"],
        "sampler": "random",
        "n_trials": 3,
        "baselines": ["dense", {"uniform": 0.5}],
    }
    study.update(overrides)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


DELETE = object()  # a value of mutated(): remove the key


def mutated(data, path, value):
    """A deep copy of ``data`` with ``path`` set to ``value`` (or removed)."""
    data = yaml.safe_load(yaml.safe_dump(data))
    *parents, last = path
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


def offload_map(model, *, layer=lambda i: "disk" if i % 2 else "cpu", rest="cpu"):
    """An explicit device map: each layer by ``layer(index)``, every other top-level part on ``rest``."""
    layers, out = family_of(model).layers, {}

    def walk(prefix: str, module) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if path == layers:
                out.update({f"{path}.{i}": layer(i) for i in range(len(child))})
            elif layers.startswith(path + "."):
                walk(path + ".", child)
            else:
                out[path] = rest

    walk("", model)
    return out


def dispatched(model, folder, device_map):
    """``model`` saved to ``folder`` and loaded again, spread by ``device_map``."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder / "model")
    return AutoModelForCausalLM.from_pretrained(
        folder / "model", device_map=device_map, offload_folder=str(folder / "offload")
    ).eval()
