"""Every "to add a ..." example of docs/architecture.md runs as written, and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, model_output

from dse.cli import REGISTRIES, _registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
SECTIONS = dict(re.findall(r"### (.+?)\n+```python\n(.*?)```", DOC.read_text(), flags=re.S))


@pytest.fixture
def clean_registries():
    """Whatever an example registers is removed again afterwards."""
    before = {kind: set(_registry(kind)) for kind in REGISTRIES}
    yield
    for kind, names in before.items():
        registry = _registry(kind)
        for name in set(registry) - names:
            registry.unregister(name)


def test_the_doc_has_an_example_per_plug_in_kind():
    assert set(SECTIONS) == {"A method", "A model family", "A measurement", "A sampler", "A task source"}
    assert all(len(code.strip().splitlines()) <= 25 for code in SECTIONS.values())


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_example_runs(section, clean_registries, tmp_path):
    model = make_tiny("llama")
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    before = model_output(model, ids)
    namespace = {"model": model}
    exec(compile(SECTIONS[section], f"{DOC.name}: {section}", "exec"), namespace)
    if section == "A method":
        from dse.decompose import get_method

        assert "colscaled" in _registry("methods")
        weight = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        form = get_method("colscaled").factorize(weight, namespace["ColumnScaledConfig"](), None)
        assert torch.allclose(form.U * form.S @ form.Vh, weight, atol=1e-12)  # exact at full rank
        assert torch.equal(model_output(model, ids), before)  # restored bit for bit
    if section == "A measurement":
        import yaml

        from dse.study.config import ConfigError, study_config_from_dict

        assert "bits" in _registry("objectives")
        path = DOC.parents[1] / "studies" / "smollm2-quick.yaml"
        study = {**yaml.safe_load(path.read_text()), "objectives": ["bits", "params"]}
        assert study_config_from_dict(study, path).objectives == ("bits", "params")
        del study["evaluation"]["perplexity"]
        with pytest.raises(ConfigError, match=r"^objectives\[0\]: 'bits' needs evaluation.perplexity$"):
            study_config_from_dict(study, path)
    if section == "A task source":
        from dse.evaluate import local_copy

        (tmp_path / "piqa.jsonl").write_text("{}\n")
        assert local_copy("piqa", tmp_path) == ((tmp_path / "piqa.jsonl").resolve(), "validation")
