"""Benchmark: does an aligned rank (a multiple of 64) run faster than its neighbours?

Times the forward pass of a stack of ``LowRankLinear`` layers shaped like SmolLM2's MLP
(576 → 1536 → 576, repeated) at aligned ranks ``r`` and at ``r + offset`` (default ``r − 1`` and
``r + 1``). All variants are timed in interleaved rounds after a warm-up, so that load on a shared
machine hits them alike; each figure is the median over rounds (``torch.cuda.synchronize`` on CUDA).

    python benchmarks/latency_align.py [--device cpu] [--ranks 64 128 192 256] [--tokens 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dse.decompose import LowRankLinear
from dse.model.timing import sync


def lowrank_stack(rank: int, hidden: int, inner: int, depth: int, device, dtype) -> nn.Sequential:
    """``depth`` pairs of rank-``rank`` layers ``hidden → inner → hidden`` with random factors."""
    layers = []
    for _ in range(depth):
        for n_in, n_out in ((hidden, inner), (inner, hidden)):
            factors = [torch.randn(rank, n_in) / n_in**0.5, torch.randn(n_out, rank) / rank**0.5]
            layers.append(LowRankLinear([f.to(device=device, dtype=dtype) for f in factors]))
    return nn.Sequential(*layers).eval()


@torch.no_grad()
def time_once(model: nn.Module, x: torch.Tensor) -> float:
    sync(x.device)
    start = time.perf_counter()
    model(x)
    sync(x.device)
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[64, 128, 192, 256, 320])
    ap.add_argument("--offsets", nargs="+", type=int, default=[-1, 1])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--inner", type=int, default=1536)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)
    ranks = sorted({r + d for r in args.ranks for d in [0, *args.offsets] if r + d >= 1})
    stacks = {r: lowrank_stack(r, args.hidden, args.inner, args.depth, device, dtype) for r in ranks}
    for stack in stacks.values():
        for _ in range(args.warmup):
            time_once(stack, x)
    times = {r: [] for r in ranks}
    for _ in range(args.repeats):  # interleaved rounds
        for r, stack in stacks.items():
            times[r].append(time_once(stack, x))
    median = {r: statistics.median(t) for r, t in times.items()}

    print(
        f"{args.depth}×({args.hidden}→{args.inner}→{args.hidden}) LowRankLinear stack, {args.tokens} tokens, "
        f"{device} {args.dtype}, torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    print("| aligned r | ms | " + " | ".join(f"r{d:+d} ms | ratio" for d in args.offsets) + " |")
    print("|---|---|" + "---|---|" * len(args.offsets))
    for r in args.ranks:
        cells = " | ".join(
            f"{median[r + d] * 1e3:.2f} | {median[r + d] / median[r]:.3f}" for d in args.offsets if r + d >= 1
        )
        print(f"| {r} | {median[r] * 1e3:.2f} | {cells} |")


if __name__ == "__main__":
    main()
