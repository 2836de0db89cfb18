"""The lm-eval models an :class:`~dse.evaluate.Evaluator` scores tasks with (``evaluation.engine``).

* ``hflm``: :class:`InMemoryLM`, lm-eval's ``HFLM`` over the in-memory model as it is. For every
  (context, continuation) request it runs context + continuation and projects every position of
  the batch onto the vocabulary.
* ``fast``: :class:`SharedContextLM`, the same ``HFLM`` with the same per-request loglikelihoods and
  ``is_greedy`` (to float tolerance) for less compute:

  - each distinct context runs once; its KV cache is repeated for each of its continuations
    (multiple-choice tasks score 2 to 5 continuations of one context), which then run alone;
  - the vocabulary projection is applied only at the positions whose score is read (the hidden
    states of the base model go through ``get_output_embeddings()`` there, with Gemma's final
    logit soft-capping where the config has one).

  Both are checked once, on a probe context with two continuations, against the full forward's
  log-probabilities: a model whose logits are not its head on its last hidden states is scored
  from its full logits (contexts still run once), and one where a repeated KV cache does not give
  its numbers either runs ``HFLM``'s path; each said once. Contexts run in batches of one length,
  so none is padded, and a continuation batch is padded only at its end, where no score is read.

  It reads the tokens as ``HFLM`` does: a request's scored input is
  ``(context + continuation)[-(max_length + 1):][:-1]``, its last ``len(continuation)`` positions
  scored. Rolling loglikelihoods (perplexity tasks) and generation run the plain ``HFLM`` path,
  said once per engine.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from ..model import input_device
from ..model.devices import execution_device
from ..model.timing import cache_keyword, cache_of
from .prefix import PrefixStore, reusing

log = logging.getLogger(__name__)

WHO = "evaluation.engine fast"
HEAD_CHUNK = 512  # scored positions projected onto the vocabulary at once (bounds the logits' memory)


class InMemoryLM(HFLM):
    """lm-eval's ``HFLM`` over an in-memory model (never reloaded); progress bars only if ``verbose``."""

    def __init__(self, model, tokenizer, *, batch_size: int, max_length: int, verbose: bool = False):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self.quiet = not verbose

    def loglikelihood(self, requests, disable_tqdm: Optional[bool] = None):
        return super().loglikelihood(requests, disable_tqdm=self.quiet if disable_tqdm is None else disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: Optional[bool] = None):
        return super().loglikelihood_rolling(
            requests, disable_tqdm=self.quiet if disable_tqdm is None else disable_tqdm
        )

    def generate_until(self, requests, disable_tqdm: Optional[bool] = None):
        return super().generate_until(requests, disable_tqdm=self.quiet if disable_tqdm is None else disable_tqdm)

    @property
    def device(self):  # where inputs go: HFLM takes the first parameter's, which may be offloaded (meta)
        return input_device(self._model)


class SharedContextLM(InMemoryLM):
    """``HFLM``'s loglikelihoods with each context run once and the head applied at scored positions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain = False  # True while a request type this engine does not speed up runs
        self.said: set = set()
        self.mode: Optional[str] = None  # "head", "logits" or "plain": how the model is scored (see probe)
        self.prefix: Optional[PrefixStore] = None  # set by the Evaluator under evaluation.reuse_prefix

    def say_once(self, what: str, message: str) -> None:
        if what not in self.said:
            self.said.add(what)
            log.warning(message)

    @contextmanager
    def plain_path(self, kind: str):
        self.say_once(kind, f"{WHO}: {kind} requests run lm-eval's plain HFLM path")
        self.plain = True
        try:
            yield
        finally:
            self.plain = False

    def loglikelihood_rolling(self, requests, disable_tqdm: Optional[bool] = None):
        with self.plain_path("loglikelihood_rolling"):
            return super().loglikelihood_rolling(requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: Optional[bool] = None):
        with self.plain_path("generate_until"):
            return super().generate_until(requests, disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        fast = not self.plain and self.backend == "causal" and self.mixed_precision_dtype is None
        if fast and self.mode is None:
            self.mode = self.probe()
        if not fast or self.mode == "plain":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        start = self.prefix.start() if self.prefix is not None else 0
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            return self._score_all(requests, bar.update, start)

    def _score_all(self, requests, done=lambda n: None, start: int = 0) -> List[Tuple[float, bool]]:
        """Every request's answer; with ``start``, each batch from layer ``start`` on (:mod:`.prefix`)."""
        groups, _, plan = batched(requests, self.max_length, self.batch_size, _sliding(self._model.config))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        for batch in plan:
            members = [groups[p] for p in batch]
            with reusing(self.prefix, start, batch, [[requests[i][2] for i in m] for m in members]):
                scores = self._score_batch(batch, members, requests)
            for i, answer in scores.items():
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            done(len(scores))
        return results

    @torch.no_grad()
    def _score_batch(self, prefixes: Sequence[tuple], members: Sequence[List[int]], requests) -> Dict[int, tuple]:
        """Loglikelihood and is_greedy of every request of ``members`` (request indices per prefix).

        The prefixes run right-padded (causal: a token never sees the padding after it); the
        continuations then run after their prefix's repeated cache, the padding masked out and
        their positions given."""
        model = self._model
        head = self.mode == "head"
        run = model.base_model if head else model
        lengths = [len(p) for p in prefixes]
        width = max(lengths)
        ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prefixes], device=self.device)
        out = run(ids, use_cache=True)
        states = out.last_hidden_state if head else out.logits
        rows = [(b, i) for b, ids in enumerate(members) for i in ids]
        tails = [requests[i][2][:-1] for _, i in rows]  # continuation tokens fed after the context
        span = max(len(t) for t in tails)
        if span:
            cache = cache_of(out)
            cache.batch_select_indices(torch.tensor([b for b, _ in rows]))  # on the CPU: a spread cache's layers differ
            fed = torch.tensor([t + [0] * (span - len(t)) for t in tails], device=self.device)
            row_lengths = torch.tensor([lengths[b] for b, _ in rows]).unsqueeze(1)
            mask = torch.cat(
                [torch.arange(width).unsqueeze(0) < row_lengths, torch.ones(len(rows), span, dtype=torch.bool)], 1
            )
            positions = row_lengths + torch.arange(span).unsqueeze(0)
            more = run(
                fed,
                attention_mask=mask.long().to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                **{cache_keyword(run): cache},
            )
            tail_states = more.last_hidden_state if head else more.logits
        picked, targets, counts = [], [], []
        for r, (b, i) in enumerate(rows):
            continuation = requests[i][2]
            picked.append(states[b, lengths[b] - 1 : lengths[b]])
            if len(continuation) > 1:
                picked.append(tail_states[r, : len(continuation) - 1])
            targets.extend(continuation)
            counts.append(len(continuation))
        logprobs, greedy = self._scored(torch.cat(picked), torch.tensor(targets))
        return {
            i: (float(lp.sum()), bool(g.all()))
            for (_, i), lp, g in zip(rows, logprobs.split(counts), greedy.split(counts))
        }

    @torch.no_grad()
    def probe(self, length: int = 9) -> str:
        """How to score this model, checked once on probe requests (two share a context): ``head``
        (the head at scored positions), else ``logits`` (full logits, contexts still run once), else
        ``plain`` (``HFLM``'s path): the first that gives the full forward's log-probabilities."""
        model = self._model
        ids = [(7 * i + 3) % model.config.vocab_size for i in range(length)]
        logprobs = F.log_softmax(model(torch.tensor([ids], device=self.device)).logits[0].double(), dim=-1)
        cut = length // 2  # two continuations of one context and one of a shorter context
        spans = [(cut, length), (cut, length - 1), (cut - 2, length - 2)]
        requests = [(None, ids[:c], ids[c:e]) for c, e in spans]
        expected = [float(sum(logprobs[j - 1, ids[j]] for j in range(c, e))) for c, e in spans]
        eps = torch.finfo(next(model.parameters()).dtype).eps
        tolerance = max(1e-3, 50 * eps) * max(1.0, abs(expected[0]))
        has_head = model.get_output_embeddings() is not None and model.base_model is not model
        for mode in ("head", "logits") if has_head else ("logits",):
            self.mode = mode
            got = self._score_all(requests)
            if all(abs(have - want) <= tolerance for (have, _), want in zip(got, expected)):
                if mode == "logits":
                    self.say_once(
                        "logits",
                        f"{WHO}: the model's logits are not its head on its last hidden states; "
                        "scoring from full logits (contexts still run once)",
                    )
                return mode
        self.say_once(
            "plain",
            f"{WHO}: shared contexts do not give the model's log-probabilities; lm-eval's plain HFLM path scores it",
        )
        return "plain"

    def _scored(self, states: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The target tokens' log-probabilities and whether each is the argmax, position by position."""
        logprobs, greedy = [], []
        for chunk, target in zip(states.split(HEAD_CHUNK), targets.split(HEAD_CHUNK)):
            logits = _logits(self._model, chunk) if self.mode == "head" else chunk
            lsm = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            target = target.to(lsm.device)
            logprobs.append(lsm.gather(1, target.unsqueeze(1)).squeeze(1))
            greedy.append(lsm.argmax(dim=-1) == target)
        return torch.cat(logprobs), torch.cat(greedy)


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last hidden states: its head, then Gemma's soft-capping if set."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(execution_device(head)))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _groups(requests, max_length: int) -> Dict[tuple, List[int]]:
    """Request indices by the tokens fed before their continuation (``HFLM``'s left truncation applied)."""
    groups: Dict[tuple, List[int]] = {}
    for i, (_, context, continuation) in enumerate(requests):
        whole = (context + continuation)[-(max_length + 1) :]
        groups.setdefault(tuple(whole[: len(whole) - len(continuation)]), []).append(i)
    return groups


def batched(requests, max_length: int, size: int, one_length: bool = False):
    """How the engine runs ``requests``: ``(groups, tails, batches)``, the request indices per
    prefix (:func:`_groups`), the continuation lengths fed after each prefix, and the prefixes'
    batches (:func:`batches`)."""
    groups = _groups(requests, max_length)
    tails = {prefix: [len(requests[i][2]) - 1 for i in members] for prefix, members in groups.items()}
    return groups, tails, batches(tails, size, one_length)


def _sliding(config) -> bool:
    """Whether some attention layer has a sliding window (its reach counts padding: one length per batch)."""
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


def batches(tails: Mapping[tuple, List[int]], size: int, one_length: bool = False) -> List[List[tuple]]:
    """The prefixes (keys of ``tails``: each prefix's continuation lengths fed after it) in batches
    of at most ``size``, longest first: of one length each if ``one_length``; else sorted by their
    length, by their longest continuation, or by the two summed, whichever pads the fewest
    positions (a batch's contexts pad to its longest, its continuations to the longest of them):
    multiple-choice tasks differ in which of the two varies more (ARC: contexts; PIQA: answers)."""
    longest = {p: max(t, default=0) for p, t in tails.items()}
    orders = [lambda p: (-len(p), p)]
    if not one_length:
        orders += [lambda p: (-longest[p], -len(p), p), lambda p: (-len(p) - longest[p], p)]
    return min((_chunked(sorted(tails, key=order), size, one_length) for order in orders), key=partial(_padded, tails))


def _chunked(prefixes: List[tuple], size: int, one_length: bool) -> List[List[tuple]]:
    chunks: List[List[tuple]] = []
    for prefix in prefixes:
        if chunks and len(chunks[-1]) < size and (not one_length or len(chunks[-1][0]) == len(prefix)):
            chunks[-1].append(prefix)
        else:
            chunks.append([prefix])
    return chunks


def _padded(tails: Mapping[tuple, List[int]], chunks: List[List[tuple]]) -> int:
    """Positions the passes over ``chunks`` run, padding included: contexts, then continuations."""
    total = 0
    for chunk in chunks:
        rows = [t for p in chunk for t in tails[p]]
        total += len(chunk) * max(len(p) for p in chunk) + len(rows) * max(rows, default=0)
    return total
