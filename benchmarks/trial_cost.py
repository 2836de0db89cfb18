"""Evaluation seconds per trial of the quick study (``studies/smollm2-quick.yaml``'s evaluation
block) with lm-eval's plain ``HFLM`` and with the fast engine (``evaluation.engine``), in one run.

    python benchmarks/trial_cost.py [--repeats 3] [--limit 100] [--model gemma3-270m] [--tasks piqa arc_easy]

The study's model (SmolLM2-135M) or ``--model``, dense (a trial's plan changes the model's cost,
not the engines' ratio), is evaluated ``repeats`` times by each engine, the two alternating.
Prints the median seconds of each measure (``seconds/<task>``, ``seconds/perplexity``) and of
the whole evaluation per engine, their ratio, and whether the metrics are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from dse.evaluate import Evaluator
from dse.model import load_model
from dse.study.config import load_study_config

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("hflm", "fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="rows per task (default: the study's)")
    parser.add_argument("--model", default=None, help="another model name (default: the study's)")
    parser.add_argument("--tasks", nargs="+", default=None, help="other tasks (default: the study's)")
    args = parser.parse_args()
    config = load_study_config(ROOT / "studies/smollm2-quick.yaml")
    evaluation = config.evaluation
    changes = {"limit": args.limit, "tasks": args.tasks}
    evaluation = dataclasses.replace(evaluation, **{k: v for k, v in changes.items() if v is not None})
    model, tokenizer = load_model(args.model or config.model, device=config.device, dtype=config.dtype)
    evaluators = {e: Evaluator(model, tokenizer, dataclasses.replace(evaluation, engine=e)) for e in ENGINES}
    runs = {e: [] for e in ENGINES}
    print(
        f"{args.model or config.model}, torch threads {torch.get_num_threads()}, tasks {list(evaluation.tasks)} "
        f"(limit {evaluation.limit})",
        flush=True,
    )
    for _ in range(args.repeats):
        for engine, evaluator in evaluators.items():
            runs[engine].append(evaluator.run(progress=False))
            print(f"{engine}: {runs[engine][-1]['eval_seconds']:.1f} s", flush=True)
    keys = [k for k in runs["fast"][0] if k.startswith("seconds/")] + ["eval_seconds"]
    median = {e: {k: statistics.median(r[k] for r in runs[e]) for k in keys} for e in ENGINES}
    print(f"{'median seconds':<22}{'hflm':>9}{'fast':>9}{'ratio':>8}")
    for k in keys:
        print(f"{k:<22}{median['hflm'][k]:>9.2f}{median['fast'][k]:>9.2f}{median['hflm'][k] / median['fast'][k]:>8.2f}")
    measured = [k for k in runs["fast"][0] if k.startswith("acc/") or k in ("accuracy", "perplexity")]
    for k in measured:
        values = {e: runs[e][0][k] for e in ENGINES}
        same = "same" if values["hflm"] == values["fast"] else f"differs by {values['fast'] - values['hflm']:.2e}"
        print(f"{k}: hflm {values['hflm']:.4f}, fast {values['fast']:.4f} ({same})")


if __name__ == "__main__":
    main()
