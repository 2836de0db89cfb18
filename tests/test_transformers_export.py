"""``dse apply --format transformers``: a folder that plain transformers loads, with dse blocked from
import, at the low-rank size; its logits equal ``dse.load_compressed``'s and it generates."""

from __future__ import annotations

import ast
import inspect
import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny

from dse.core.errors import ExportError
from dse.decompose import LowRankLinear, model_fingerprint, plan_size, uniform_plan
from dse.model import find_projections
from dse.results.compressed import apply_config, load_compressed
from dse.results.formats import MODELING_FILE, WEIGHTS_FILE, modeling_source
from dse.results.rankconfig import RankConfig

CAUSAL = ["llama", "gemma3_text", "phi3", "gpt2", "opt"]

# Runs in a fresh interpreter where any import of dse fails, as in an environment without it.
LOAD_WITHOUT_DSE = textwrap.dedent("""
    import importlib.abc, sys
    class NoDse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dse" or name.startswith("dse."):
                raise ImportError("dse is not installed here")
    sys.meta_path.insert(0, NoDse())
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_file, out_file = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "generated": generated, "class": type(model).__name__,
                "dse_loaded": any(m.startswith("dse") for m in sys.modules)}, out_file)
""")


def load_without_dse(folder, ids, tmp_path) -> dict:
    """Load ``folder`` with plain transformers in a fresh interpreter where dse cannot be imported:
    its logits and greedy continuation of ``ids``, its class, and whether dse was loaded."""
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_DSE, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def rank_config(model, name) -> RankConfig:
    table = find_projections(model)
    return RankConfig(name, model_fingerprint(model, table), "float32", uniform_plan(table, 3))


@pytest.mark.parametrize("family", CAUSAL)
def test_transformers_folder_loads_without_dse(family, tmp_path):
    model = make_tiny(family)
    config = rank_config(model, f"tiny-{family}")
    out = apply_config(config, tmp_path / "export", format="transformers", model=model)
    assert (out / MODELING_FILE).is_file() and json.loads((out / "config.json").read_text())["auto_map"]

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    result = load_without_dse(out, ids, tmp_path)
    assert not result["dse_loaded"] and result["class"].startswith("DseLowRank")
    assert result["generated"].shape == (2, 14)

    reference, _ = load_compressed(out)
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-5)

    # the file is the low-rank parameters and a header, nothing more
    weights = (out / WEIGHTS_FILE).read_bytes()
    header = struct.unpack("<Q", weights[:8])[0]
    predicted = plan_size(model, config.plan, find_projections(model)).params_after * 4
    assert len(weights) - 8 - header == predicted


def test_unknown_format_is_one_line(tmp_path, capsys):
    model = make_tiny("llama")
    config = rank_config(model, "tiny-llama")
    with pytest.raises(ExportError, match=r"^format: unknown format 'onnx'; known: dse, merged, transformers$"):
        apply_config(config, tmp_path / "out", format="onnx", model=model)
    assert not (tmp_path / "out").exists()
    from dse.cli import main

    config.save(tmp_path / "c.json")
    assert main(["apply", str(tmp_path / "c.json"), "--out", str(tmp_path / "o"), "--format", "tranformers"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith("dse: error: format: unknown format 'tranformers' (did you mean 'transformers'?)")
    )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ranks", [[3], [3, 4]])
def test_the_modeling_files_low_rank_module_is_dses(ranks, bias):
    """The modeling file's ``LowRankLinear.forward`` is dse's own source, and its shells hold the
    tensors of dse's module under the same names and shapes and compute the same outputs."""
    source = modeling_source("LlamaForCausalLM", "DseLowRankLlamaForCausalLM")
    exported = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "LowRankLinear")
    forward = next(n for n in exported.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    assert ast.dump(forward) == ast.dump(ast.parse(textwrap.dedent(inspect.getsource(LowRankLinear.forward))).body[0])

    namespace: dict = {}
    exec(compile(source, MODELING_FILE, "exec"), namespace)
    shell = namespace["LowRankLinear"](8, 6, ranks, bias)
    sizes = [8, *ranks, 6]
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(o, i, generator=generator) for i, o in zip(sizes, sizes[1:])]
    ours = LowRankLinear(factors, torch.randn(6, generator=generator) if bias else None)
    assert {k: v.shape for k, v in shell.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    shell.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, generator=generator)
    torch.testing.assert_close(shell(x), ours(x), rtol=0, atol=0)
