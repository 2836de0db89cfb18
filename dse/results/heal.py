"""Healing a compressed model end to end (:func:`heal_compressed`, ``dse heal``): a rank config
(decomposed as ``dse apply`` does) or a ``dse apply`` folder, fine-tuned by
:func:`dse.decompose.heal_`, its perplexity measured before and after, written as ``dse apply``
writes it with the recipe, the heal's report and the measures in ``dse_compressed.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..core.errors import ExportError
from ..core.io import atomic_dir
from ..decompose import HealConfig, heal_
from ..decompose.heal import CHECKPOINT_FILE
from ..evaluate import PerplexityConfig, perplexity
from ..model import TextSource, load_model, token_windows
from .compressed import FORMATS, decompose_config, load_compressed, read_meta, write_folder
from .rankconfig import RankConfig, load_config_file

CHECKPOINT_SUFFIX = ".checkpoint"


def heal_compressed(
    source,
    out_dir,
    config: HealConfig,
    text: TextSource,
    *,
    measures: Mapping[str, PerplexityConfig] = {},
    format: str = "dse",
    device: str = "cpu",
    checkpoint_dir=None,
    checkpoint_every: int = 50,
    progress: bool = True,
) -> Path:
    """Heal the model of ``source`` (a rank config JSON or a ``dse apply`` folder) on ``text`` by
    ``config`` and write it to ``out_dir`` in ``format`` (a low-rank one); return the folder.

    ``measures`` (label -> perplexity text) are measured before and after and must not overlap
    ``text``. The heal checkpoints to ``checkpoint_dir`` (default: ``OUT.checkpoint`` beside the
    output), resumes from it when run again, and removes it once the folder is written.
    """
    writer = FORMATS.get(format, "format", ExportError)
    if not writer.low_rank:
        raise ExportError(
            f"format: a heal writes a low-rank format ({', '.join(FORMATS.where(lambda f: f.low_rank))}), not {format}"
        )
    for measure in measures.values():
        text.check_disjoint(measure.text)
    source, out_dir = Path(source), Path(out_dir)
    meta = read_meta(source) if source.is_dir() else {}
    rank_config = RankConfig.from_dict(meta.get("rank_config"), "rank_config") if meta else load_config_file(source)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.with_name(out_dir.name + CHECKPOINT_SUFFIX)
    with atomic_dir(out_dir) as tmp:
        model, tokenizer, teacher = _load(source, rank_config, config, device, progress)
        windows = token_windows(tokenizer, text.read(), config.seq_len, where="heal.seq_len")
        measured = {
            label: token_windows(tokenizer, m.text.read(), m.window, m.max_tokens, m.text.where)
            for label, m in measures.items()
        }
        before = {label: perplexity(model, w, measures[label].batch_size) for label, w in measured.items()}
        report = heal_(
            model,
            windows,
            config,
            teacher=teacher,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
        after = {label: perplexity(model, w, measures[label].batch_size) for label, w in measured.items()}
        heal = {
            "recipe": config.to_dict(),
            "text": text.to_dict(),
            "report": report.to_dict(),
            "perplexity": {
                label: {
                    "before": before[label],
                    "after": after[label],
                    "text": measures[label].text.to_dict(),
                    "window": measures[label].window,
                    "max_tokens": measures[label].max_tokens,
                }
                for label in measures
            },
        }
        write_folder(model, tokenizer, rank_config, tmp, writer, format, heal=[*meta.get("heal", []), heal])
    (checkpoint_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    if checkpoint_dir.is_dir() and not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()
    return out_dir


def _load(source: Path, rank_config: RankConfig, config: HealConfig, device: str, progress: bool):
    """``(model, tokenizer, teacher)``: the decomposed model and, for a folder healed by
    ``distill``, the dense model's logits (a decomposed model keeps its own dense originals)."""
    if not source.is_dir():
        model, tokenizer = load_model(rank_config.model, device=device, dtype=rank_config.dtype)
        decompose_config(rank_config, model, tokenizer, progress=progress)
        return model, tokenizer, None
    model, tokenizer = load_compressed(source, device=device)
    if config.loss != "distill":
        return model, tokenizer, None
    dense, _ = load_model(rank_config.model, device=device, dtype=rank_config.dtype)
    rank_config.check(dense, "rank_config")
    return model, tokenizer, lambda ids: dense(ids, use_cache=False).logits
