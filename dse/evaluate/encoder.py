"""Measures for encoders: how close the compressed model's sentence embeddings stay to the dense
model's, and pseudo-perplexity on masked tokens.

Both read a :class:`TextSet`: the first ``n_texts`` texts of a text source (split at its separator:
the rows of a JSONL field, the paragraphs of a text file), each cut to ``max_tokens`` tokens.

* :func:`sentence_embeddings`: the mean of the last hidden states over each text's tokens (the
  pooling of sentence-transformers models such as all-MiniLM-L6-v2);
  :func:`embedding_similarity` is the mean cosine similarity of each text's embedding to a
  reference (the dense model's, taken when the evaluator is built), 1.0 for the dense model.
* :func:`pseudo_perplexity` (Salazar et al., 2020): every token of every text is masked in turn
  and scored by the masked-LM head; ``exp`` of the mean negative log-likelihood of the true tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional

import torch

from ..core.errors import ConfigError
from ..core.validate import integer
from ..model import TextSource, input_device, text_section


@dataclass(frozen=True)
class TextSet:
    """``n_texts`` texts of ``text``, each at most ``max_tokens`` tokens, in batches of ``batch_size``."""

    text: TextSource
    n_texts: int = 64
    max_tokens: int = 128
    batch_size: int = 16
    where: str = "evaluation.similarity"

    def __post_init__(self):
        integer(self.n_texts, f"{self.where}.n_texts", 1)
        integer(self.max_tokens, f"{self.where}.max_tokens", 3)  # [CLS], a token, [SEP]
        integer(self.batch_size, f"{self.where}.batch_size", 1)

    @classmethod
    def from_dict(cls, data, where: str, base: Optional[Path] = None) -> "TextSet":
        return cls(**text_section(data, where, {f.name for f in fields(cls)} - {"where"}, base), where=where)

    def batches(self, tokenizer) -> List[dict]:
        """The texts tokenized (with the tokenizer's special tokens), padded per batch."""
        texts = [t.strip() for t in self.text.read().split(self.text.separator) if t.strip()][: self.n_texts]
        if not texts:
            raise ConfigError(f"{self.where}.text: no text found")
        return [
            dict(
                tokenizer(
                    texts[i : i + self.batch_size],
                    truncation=True,
                    max_length=self.max_tokens,
                    padding=True,
                    return_tensors="pt",
                    return_special_tokens_mask=True,
                )
            )
            for i in range(0, len(texts), self.batch_size)
        ]


@torch.no_grad()
def sentence_embeddings(model, batches: List[dict]) -> torch.Tensor:
    """``(n_texts, hidden)`` float64: each text's last hidden states averaged over its tokens."""
    out = []
    for batch in batches:
        mask = batch["attention_mask"].to(input_device(model))
        hidden = (
            model(input_ids=batch["input_ids"].to(mask.device), attention_mask=mask, output_hidden_states=True)
            .hidden_states[-1]
            .double()
        )
        weights = mask.unsqueeze(-1).double()
        out.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))
    return torch.cat(out)


def embedding_similarity(model, batches: List[dict], reference: torch.Tensor) -> float:
    """Mean cosine similarity of ``model``'s sentence embeddings to ``reference``'s, text by text."""
    current = sentence_embeddings(model, batches)
    return float(torch.nn.functional.cosine_similarity(current, reference.to(current.device), dim=-1).mean())


@torch.no_grad()
def pseudo_perplexity(model, batches: List[dict], mask_id: int, rows: int = 64) -> float:
    """``exp`` of the mean negative log-likelihood of each non-special token, masked alone, under
    ``model``'s masked-LM head; ``rows`` masked copies are scored per forward pass."""
    device = input_device(model)
    total, count = 0.0, 0
    for batch in batches:
        for ids, attention, special in zip(batch["input_ids"], batch["attention_mask"], batch["special_tokens_mask"]):
            positions = torch.nonzero((attention == 1) & (special == 0)).flatten()
            for chunk in positions.split(rows):
                masked = ids.repeat(len(chunk), 1)
                masked[torch.arange(len(chunk)), chunk] = mask_id
                logits = model(
                    input_ids=masked.to(device), attention_mask=attention.repeat(len(chunk), 1).to(device)
                ).logits
                picked = logits[torch.arange(len(chunk), device=device), chunk.to(device)]
                logp = torch.log_softmax(picked.double(), dim=-1)
                total -= float(logp.gather(1, ids[chunk].to(device).unsqueeze(1)).sum())
                count += len(chunk)
    if count == 0:
        raise ConfigError("evaluation.pseudo_perplexity.text: no token to mask (only special tokens)")
    return math.exp(total / count)
