"""The steps the benchmarks share, on dse's public API: where the checkout and the protocols' data
are, and a plan's perplexities."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, Mapping

from dse.decompose import Plan, decomposed
from dse.evaluate import perplexity
from dse.model import token_windows
from dse.results import TrialRecord
from dse.space import Budget, parse_baseline
from dse.study.protocols import wikitext_pages
from dse.study.runner import run_study

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT.parent / "shared" / "benchmarks"  # the protocols' texts, beside the checkout
HEAL_PAGES = (12, 40)  # WikiText-2 test pages the heal benchmarks train on: disjoint from P1's 0-11 and 40-61


def heal_training_windows(tokenizer, benchmarks_dir, seq_len: int):
    """The heal benchmarks' training text (:data:`HEAL_PAGES`) cut into windows of ``seq_len``."""
    text = wikitext_pages(benchmarks_dir, HEAL_PAGES).read()
    return token_windows(tokenizer, text, seq_len, where="heal.seq_len")


def plan_perplexities(model, plan: Plan, windows: Mapping, **kw) -> Dict[str, float]:
    """``{name: perplexity}`` of ``model`` decomposed by ``plan`` on each set of ``windows`` (``kw``
    as :func:`dse.decomposed` takes), restored afterwards."""
    with decomposed(model, plan, **kw):
        return {name: perplexity(model, w) for name, w in windows.items()}


def equal_size_study(base, ratio: float, measurer, storage: str, trials: int, space=None, **changes):
    """Run study ``base`` (with ``changes``) over its allocation ``space`` at the size of the uniform
    plan of ``ratio``, that plan enqueued as its baseline; return the study, its best plan and the
    minutes it took."""
    space = dataclasses.replace(space or base.space, budget=Budget(ratio=ratio))
    baseline = parse_baseline({"ratio": ratio}, "baselines[0]")
    config = dataclasses.replace(base, space=space, baselines=(baseline,), n_trials=trials, **changes)
    start = time.perf_counter()
    study = run_study(config, storage=storage, progress=False, measurer=measurer)
    return study, Plan.from_dict(TrialRecord.of(study.best_trial).plan), (time.perf_counter() - start) / 60
