"""Fixed evaluation protocols, so that benchmarks measured at different times compare.

**P1** (WikiText-2 raw test, document-level pages, field ``page``, pages joined with ``"\\n\\n"``):
perplexity on the first 4096 tokens of pages 0–5 as 8 non-overlapping windows of 512 (held out: the
same on pages 6–11);
calibration on 32 random windows of 256 tokens (seed 3) from pages 40–61.
``benchmarks_dir`` is the folder holding ``wikitext/wikitext2_raw_test_pages.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..decompose import CalibrationSpec
from ..model import TextSource, token_windows

WIKITEXT_PAGES = "wikitext/wikitext2_raw_test_pages.jsonl"
P1_EVAL_PAGES = (0, 6)
P1_EVAL_TOKENS = 4096
P1_WINDOW = 512
P1_CALIBRATION_PAGES = (40, 62)
P1_HELD_OUT_PAGES = (6, 12)


def wikitext_pages(benchmarks_dir, rows) -> TextSource:
    """Pages ``rows[0]:rows[1]`` of the local WikiText-2 test file, joined with blank lines."""
    return TextSource(path=str(Path(benchmarks_dir) / WIKITEXT_PAGES), field="page", rows=tuple(rows))


def p1_windows(tokenizer, benchmarks_dir, pages=P1_EVAL_PAGES) -> torch.Tensor:
    """The ``(8, 512)`` token windows on which P1 measures perplexity; ``pages=P1_HELD_OUT_PAGES``
    gives the same measure on pages 6–11, which neither calibration nor search sees."""
    text = wikitext_pages(benchmarks_dir, pages).read()
    return token_windows(tokenizer, text, P1_WINDOW, max_tokens=P1_EVAL_TOKENS)


def p1_calibration(benchmarks_dir) -> CalibrationSpec:
    """P1's calibration: 32 random windows of 256 tokens, seed 3, from pages 40–61."""
    return CalibrationSpec(wikitext_pages(benchmarks_dir, P1_CALIBRATION_PAGES), n_samples=32, seq_len=256, seed=3)
