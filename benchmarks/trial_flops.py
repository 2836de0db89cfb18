"""The FLOPs of one trial of a six-task Llama-2-7B study, with lm-eval's ``HFLM`` and with the fast
engine (``evaluation.engine: fast``), computed from shapes and the tasks' real token requests
(issue 31's 7B-shaped estimate; no model is run).

    python benchmarks/trial_flops.py [--tasks arc_challenge arc_easy boolq hellaswag piqa winogrande]
                                     [--start-layers 0 8 16] [--batch-size 16]

The six tasks are the seed thesis' (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c), every row
of the local copies in ``../shared/benchmarks`` (HellaSwag's first 2000 of 10 042 validation rows;
the ``full split`` column scales its count to 10 042). The requests are lm-eval's own (its task
objects and ``TemplateLM``'s tokenization); the tokenizer is SmolLM2's, the one on this machine, a
stand-in for Llama-2's (both byte-level BPE over English text of similar granularity). The shapes
are Llama-2-7B's (``spaces/llama2-7b-layer-ranks.yaml``), dense: a decomposed plan lowers both
engines' layer FLOPs alike. Counted:

* layers: 2 x (weights of the layer's projections) per position run, padding included (both
  engines pad a batch to its longest row), plus attention 4 x d x (keys) per query position;
* head: 2 x vocabulary x hidden per position projected (``HFLM``: every position of the batch; the
  fast engine: the scored positions only);
* ``HFLM`` runs one input per distinct ``context + continuation[:-1]`` (its one-token-continuation
  grouping), sorted longest first, in batches of ``--batch-size``; the fast engine runs each
  distinct context once and each continuation after its context's cache (``dse.evaluate.engine``'s
  own grouping and batching);
* prefix reuse: a trial whose plan starts at layer ``k`` runs only layers ``k..31`` of both
  passes (the layers below see the dense model's hidden states, computed once per study).
"""

from __future__ import annotations

import argparse

from common import BENCHMARKS, ROOT
from lm_eval.api.model import TemplateLM

from dse.evaluate import load_tasks
from dse.evaluate.engine import batched
from dse.model.shapes import projection_table
from dse.space import load_space

FULL_SPLIT = {"hellaswag": 10042}  # rows of the split the local copy is a prefix of


class Recorder(TemplateLM):
    """lm-eval's tokenization of loglikelihood requests, recorded instead of scored."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.requests = []

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _loglikelihood_tokens(self, requests, **kwargs):
        self.requests.extend(requests)
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def hflm_passes(requests, batch: int):
    """(rows, width) of each batch HFLM runs, and its positions projected onto the vocabulary."""
    inputs = {tuple(ctx + cont[:-1]): len(ctx) + len(cont) for _, ctx, cont in requests}
    lengths = sorted(inputs.values(), reverse=True)
    shapes = [(len(chunk), chunk[0] - 1) for chunk in (lengths[i : i + batch] for i in range(0, len(lengths), batch))]
    return shapes, sum(rows * width for rows, width in shapes)


def fast_passes(requests, batch: int, max_length: int):
    """(rows, width, keys) of each context and continuation pass of the fast engine, and its scored
    positions."""
    _, tails, plan = batched(requests, max_length, batch)
    shapes = []
    for prefixes in plan:
        width = max(len(p) for p in prefixes)
        shapes.append((len(prefixes), width, width))
        fed = [t for p in prefixes for t in tails[p]]
        if max(fed):
            shapes.append((len(fed), max(fed), width + max(fed)))
    return shapes, sum(len(cont) for _, _, cont in requests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tasks", nargs="+", default=["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande"]
    )
    ap.add_argument("--start-layers", nargs="+", type=int, default=[0, 8, 16])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=4096, help="Llama-2's context")
    args = ap.parse_args()

    space = load_space(ROOT / "spaces" / "llama2-7b-layer-ranks.yaml")
    config = dict(space.model_config)
    table = projection_table(model_config=config)
    n_layers = config["num_hidden_layers"]
    layer_weights = sum(p.dense_params for p in table.values()) / n_layers
    d_attn = config["hidden_size"]
    head = config["vocab_size"] * config["hidden_size"]
    from transformers import AutoTokenizer

    from dse.model.shipped import model_source

    src, kw = model_source("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)

    def layer_flops(shapes, share: float) -> float:
        """FLOPs of the layers of passes ``shapes`` ((rows, width, keys)), ``share`` of the layers run."""
        return share * n_layers * sum(r * w * (2 * layer_weights + 4 * d_attn * k) for r, w, k in shapes)

    print(
        f"Llama-2-7B shapes: {n_layers} layers of {layer_weights / 1e6:.1f} M projection weights, head "
        f"{head / 1e6:.1f} M; batch {args.batch_size}; tokens by SmolLM2's tokenizer\n"
    )
    tasks = load_tasks(args.tasks, BENCHMARKS)
    header = ["task", "docs", "requests", "HFLM positions", "fast positions", "HFLM head", "fast head", "HFLM TFLOPs"]
    header += [f"fast k={k}" for k in args.start_layers] + ["ratio k=0", "full split x"]
    rows, totals = [], {}
    for name, task in tasks.items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        recorder = Recorder(tokenizer)
        recorder.loglikelihood(list(task.instances), disable_tqdm=True)
        requests = recorder.requests
        hflm_shapes, hflm_head = hflm_passes(requests, args.batch_size)
        hflm = layer_flops([(r, w, w) for r, w in hflm_shapes], 1.0) + 2 * head * hflm_head
        shapes, scored = fast_passes(requests, args.batch_size, args.max_length)
        fast = {k: layer_flops(shapes, (n_layers - k) / n_layers) + 2 * head * scored for k in args.start_layers}
        scale = FULL_SPLIT.get(name, len(task.eval_docs)) / len(task.eval_docs)
        row = [name, len(task.eval_docs), len(requests), sum(r * w for r, w in hflm_shapes)]
        row += [sum(r * w for r, w, _ in shapes), hflm_head, scored, hflm / 1e12]
        row += [fast[k] / 1e12 for k in args.start_layers] + [hflm / fast[args.start_layers[0]], scale]
        rows.append(row)
        for key, value in [("HFLM", hflm * scale)] + [(k, fast[k] * scale) for k in args.start_layers]:
            totals[key] = totals.get(key, 0.0) + value
    widths = [max(len(h), 12) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join((f"{v:.2f}" if isinstance(v, float) else str(v)).rjust(w) for v, w in zip(row, widths)))
    print(f"\nper trial over the full splits (PFLOPs): HFLM {totals['HFLM'] / 1e15:.2f}", end="")
    for k in args.start_layers:
        print(f"; fast, plan from layer {k}: {totals[k] / 1e15:.2f} ({totals['HFLM'] / totals[k]:.2f}x)", end="")
    print()


if __name__ == "__main__":
    main()
