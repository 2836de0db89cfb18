"""Peak host memory of ``dse.load_compressed`` on a SmolLM2-135M folder written by ``dse apply``.

    python benchmarks/load_compressed.py [--out DIR] [--fraction 0.25]

Writes (once) a folder with every projection at ``fraction`` of its full rank, then loads it in
fresh processes and prints each one's peak resident memory (``ru_maxrss``) beside the size of
its ``model.safetensors`` and the peak of a process that only imports what loading needs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, json
import torch, transformers, safetensors, dse
from dse.results.compressed import load_compressed
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] != "-":
    model, _ = load_compressed(sys.argv[1])
print(json.dumps({"imports_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak(folder: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, folder], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write(folder: Path, fraction: float) -> None:
    """Every projection of SmolLM2-135M at ``fraction`` of its full rank, applied to ``folder``."""
    import dse
    from dse.decompose import model_fingerprint
    from dse.model import find_projections
    from dse.results.compressed import apply_config
    from dse.results.rankconfig import RankConfig

    model, tokenizer = dse.load_model("smollm2-135m")
    table = find_projections(model)
    plan = dse.Plan({n: max(1, round(fraction * p.full_rank)) for n, p in table.items()})
    apply_config(
        RankConfig("smollm2-135m", model_fingerprint(model, table), "float32", plan),
        folder,
        model=model,
        tokenizer=tokenizer,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the applied folder (written if absent); default: a temporary one")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="dse-load-compressed-")) / "applied"
    if args.write:
        return write(folder, args.fraction)
    if not folder.is_dir():  # written by a child: Linux carries a parent's peak into its children's
        subprocess.run(
            [sys.executable, __file__, "--out", str(folder.parent), "--fraction", str(args.fraction), "--write"],
            check=True,
        )
    size = (folder / "model.safetensors").stat().st_size
    runs = [peak(str(folder)) for _ in range(args.repeats)]
    imports = peak("-")
    peaks = sorted(r["peak_kb"] / 1024 for r in runs)
    print(f"model.safetensors {size / 2**20:.1f} MiB; imports alone {imports['peak_kb'] / 1024:.0f} MiB")
    print(
        f"load_compressed peak RSS, median of {args.repeats}: {peaks[len(peaks) // 2]:.0f} MiB "
        f"(over the imports: {peaks[len(peaks) // 2] - imports['peak_kb'] / 1024:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
