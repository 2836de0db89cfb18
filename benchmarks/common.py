"""The steps the benchmarks share, on dse's public API: where the checkout and the protocols' data
are, and a plan's perplexities."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping

from dse.decompose import Plan, decomposed
from dse.evaluate import perplexity

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT.parent / "shared" / "benchmarks"  # the protocols' texts, beside the checkout


def plan_perplexities(model, plan: Plan, windows: Mapping, **kw) -> Dict[str, float]:
    """``{name: perplexity}`` of ``model`` decomposed by ``plan`` on each set of ``windows`` (``kw``
    as :func:`dse.decomposed` takes), restored afterwards."""
    with decomposed(model, plan, **kw):
        return {name: perplexity(model, w) for name, w in windows.items()}
