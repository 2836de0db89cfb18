"""Evaluation seconds per trial of the quick study (``studies/smollm2-quick.yaml``'s evaluation
block) with lm-eval's plain ``HFLM`` and with the fast engine (``evaluation.engine``), in one run.

    python benchmarks/trial_cost.py [--repeats 3] [--limit 100] [--ratio 0.5]

SmolLM2-135M is decomposed with a uniform plan (every projection at ``ratio`` of its full rank, the
quick study's ``uniform: 0.5`` baseline) and evaluated ``repeats`` times by each engine, the two
alternating. Prints the median seconds of each measure (``seconds/<task>``, ``seconds/perplexity``)
and of the whole evaluation per engine, their ratio, and checks the metrics are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from dse.decompose import decomposed, uniform_plan
from dse.evaluate import Evaluator
from dse.model import find_projections, load_model
from dse.study.config import load_study_config

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("hflm", "fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="rows per task (default: the study's)")
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    config = load_study_config(ROOT / "studies/smollm2-quick.yaml")
    evaluation = config.evaluation
    if args.limit is not None:
        evaluation = dataclasses.replace(evaluation, limit=args.limit)
    model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
    evaluators = {e: Evaluator(model, tokenizer, dataclasses.replace(evaluation, engine=e)) for e in ENGINES}
    runs = {e: [] for e in ENGINES}
    plan = uniform_plan(find_projections(model), ratio=args.ratio)
    print(
        f"torch threads {torch.get_num_threads()}, tasks {evaluation.tasks} (limit {evaluation.limit}), "
        f"uniform plan {args.ratio}, {args.repeats} repeats"
    )
    with decomposed(model, plan):
        for _ in range(args.repeats):
            for engine, evaluator in evaluators.items():
                runs[engine].append(evaluator.run(progress=False))
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
