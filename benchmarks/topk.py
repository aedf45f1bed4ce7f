"""Exact top-k of a batch of features over every class row: the scan that evaluation, prediction and the
index's recall checks run, against a plain PyTorch chunk loop in the same run.

    python benchmarks/topk.py --sizes 1e7,1e8 --dim 32 --chunks 8192,131072      # a GPU
    python benchmarks/topk.py --quick                                             # CPU smoke run

``torch``: each chunk's ``(B, chunk)`` scores reduced with ``torch.topk`` and merged with the running best;
``megaclass``: :func:`~megaclass.ops.chunked_topk.chunked_topk` (on a GPU the fused kernel, whose scores
never reach memory, and ``--chunks`` does not apply; on the CPU the chunk loop, a wide chunk's top-k taken
through the maxima of column groups). Both score cosines of bf16 rows in fp32 and must return the same
scores.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import time_fn  # noqa: E402
from megaclass.ops.chunked_topk import chunked_topk  # noqa: E402


def plain_topk(x: torch.Tensor, rows: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: a chunk loop with ``torch.topk`` per chunk (cosine scores, as ``chunked_topk``)."""
    x = torch.nn.functional.normalize(x.float(), dim=1)
    best_scores = x.new_empty(x.shape[0], 0)
    best_ids = torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device)
    for start in range(0, rows.shape[0], chunk):
        block = rows[start : start + chunk]
        scores = (x @ block.float().T) / block.float().norm(dim=1).clamp_min(1e-12)
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        merged = torch.cat([best_scores, top.values], 1)
        ids = torch.cat([best_ids, top.indices + start], 1)
        best_scores, order = merged.topk(min(k, merged.shape[1]), dim=1)
        best_ids = ids.gather(1, order)
    return best_scores, best_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e7,1e8", help="comma-separated class counts C")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--chunks", default="8192,131072", help="comma-separated classes scored at once")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="C 10^5 and 10^6, D 32, B 64, on the CPU")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batch, args.chunks = "1e5,1e6", 64, "8192,65536"
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"D {args.dim}, B {args.batch}, k {args.k}, bf16 rows, cosine, on {where}\n")
    print("| C | chunk | torch ms | megaclass ms | speed-up | same scores |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator(device=where).manual_seed(0)
    for size in (int(float(text)) for text in args.sizes.split(",")):
        rows = torch.randn(size, args.dim, generator=generator, device=where, dtype=torch.bfloat16)
        x = torch.randn(args.batch, args.dim, generator=generator, device=where)
        for chunk in (int(text) for text in args.chunks.split(",")):
            baseline = functools.partial(plain_topk, x, rows, args.k, chunk)
            plain = time_fn(baseline, reps=args.reps, warmup=1)[0]
            ours = time_fn(
                functools.partial(chunked_topk, x, rows, args.k, cosine=True, chunk_size=chunk),
                reps=args.reps,
                warmup=1,
            )[0]
            same = torch.allclose(
                plain_topk(x, rows, args.k, chunk)[0],
                chunked_topk(x, rows, args.k, cosine=True, chunk_size=chunk)[0],
                atol=1e-5,
            )
            print(f"| {size:,} | {chunk:,} | {plain:.2f} | {ours:.2f} | {plain / ours:.2f}x | {same} |")
        del rows


if __name__ == "__main__":
    main()
