"""Recall@10 of the GPU cluster index against exact search, over cluster sizes and probes, at equal or growing
candidate counts (``probes x leaf_size`` rows scored per sample).

    python benchmarks/index_recall.py                                # C = 10^6, D = 512, B = 512 (a GPU)
    python benchmarks/index_recall.py --classes 100000 --dim 128 --batch 256   # CPU-sized

Rows are "trained-like" as in ``benchmarks/selected.py`` (group directions plus noise) and the queries are
features near their class rows. Each setting builds the index once (cold) and times one query of the batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megaclass.index.exact import exact_topk  # noqa: E402
from megaclass.index.kmeans import ClusterIndex  # noqa: E402
from selected import batch_for, device, plant_rows_  # noqa: E402

SETTINGS = ((64, 8), (32, 16), (16, 32), (64, 16), (32, 32))  # (leaf_size, probes)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=1_000_000, help="C")
    parser.add_argument("--dim", type=int, default=512, help="D")
    parser.add_argument("--batch", type=int, default=512, help="B, queries at once")
    parser.add_argument("--reps", type=int, default=5, help="timed queries per setting (median)")
    return parser.parse_args()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    rows = torch.empty(args.classes, args.dim, device=device())
    plant_rows_(rows)
    features = batch_for(rows, args.batch)[0].detach()
    truth = exact_topk(features, rows, 10, metric="cosine", chunk_size=1 << 16)[1]  # (B, 10)
    print(f"C {args.classes}, D {args.dim}, B {args.batch} on {rows.device}\n")
    print("| leaf_size | probes | candidates | recall@10 | build ms | query ms |")
    print("|---|---|---|---|---|---|")
    for leaf_size, probes in SETTINGS:
        index = ClusterIndex(metric="cosine", leaf_size=leaf_size, probes=probes)
        _sync()
        started = time.perf_counter()
        index.build(rows)
        _sync()
        build_ms = (time.perf_counter() - started) * 1e3
        times = []
        for _ in range(args.reps):
            started = time.perf_counter()
            found = index.query(features, 10)
            _sync()
            times.append((time.perf_counter() - started) * 1e3)
        recall = float((found[:, :, None] == truth[:, None, :]).any(2).sum()) / truth.numel()
        query_ms = sorted(times)[len(times) // 2]
        cells = [leaf_size, probes, leaf_size * probes, f"{recall:.3f}", f"{build_ms:.1f}", f"{query_ms:.2f}"]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


if __name__ == "__main__":
    main()
