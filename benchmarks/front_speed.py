"""Benchmark: the decode speed of every configuration on a study's front, measured on the exported models.

Each front trial is exported (``dse export --front``), applied (``dse apply``, low-rank folder), and
measured with ``dse speed`` in a fresh process, beside the dense model (an empty plan applied the
same way), in ``--rounds`` interleaved rounds (medians). Prints a table to paste into the README.

    python benchmarks/front_speed.py studies/smollm2-quick.yaml [--rounds 3] [--out /tmp/front-speed]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from speed import speed_rows

from dse.decompose import Plan
from dse.results.compressed import apply_config
from dse.results.export import rank_config
from dse.results.front import front_trials
from dse.study.config import load_study_config
from dse.study.storage import open_study


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study")
    ap.add_argument("--storage")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for the exported models (default: a temporary one)")
    args = ap.parse_args(argv)
    config = load_study_config(args.study)
    study = open_study(config, args.storage, create=False)
    out = Path(args.out or tempfile.mkdtemp(prefix="dse-front-speed-"))
    configs = {f"trial {t.number}": rank_config(study, t) for t in front_trials(study)}
    first = next(iter(configs.values()))
    configs = {"dense": dataclasses.replace(first, plan=Plan({}, first.plan.config), metrics={}), **configs}
    folders = {}
    for name, rc in configs.items():
        folder = out / name.replace(" ", "-")
        folders[name] = folder if folder.is_dir() else apply_config(rc, folder)
    frame = speed_rows(folders, args.rounds, config.device, config.dtype, out)
    dense = frame.iloc[0]
    print(f"{dense['device']}, {config.dtype}, {dense['threads']} threads, median of {args.rounds} rounds\n")
    print("| configuration | params % | weight MB | decode tok/s (batch 1) | speed-up | bytes ratio |")
    print("|---|---|---|---|---|---|")
    for (name, rc), (_, row) in zip(configs.items(), frame.iterrows()):
        ratio = rc.metrics.get("params_ratio", 1.0)
        print(
            f"| {name} | {100 * ratio:.1f} | {row['weight_bytes'] / 1e6:.1f} | {row['decode_tokens_per_s']:.2f} | "
            f"{row['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.3f} | "
            f"{dense['weight_bytes'] / row['weight_bytes']:.3f} |"
        )


if __name__ == "__main__":
    main()
