"""Recall@10 of the GPU cluster index against exact search, over cluster sizes and probes, at equal or growing
candidate counts (rows scored per sample).

    python benchmarks/index_recall.py                                # C = 10^6, D = 512, B = 512 (a GPU)
    python benchmarks/index_recall.py --classes 100000 --dim 512 --batch 256 --dtype bfloat16   # CPU-sized

``--dtype bfloat16`` stores and scores rows in bfloat16, as the index does by default on a GPU, also on a CPU
(where its default is float32).

Rows are "trained-like" as in ``benchmarks/selected.py`` (group directions plus noise) and the queries are
features near their class rows. Each setting builds the index (cold), times a query of the batch, then
rebuilds it warm over every row and measures recall again. Candidates: rows scored per query (probes times
the padded cluster width).
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
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="rows' and scores' dtype (default: the index's)"
    )
    parser.add_argument(
        "--settings",
        default=",".join(f"{leaf}x{probes}" for leaf, probes in SETTINGS),
        help="comma-separated LEAFxPROBES pairs",
    )
    return parser.parse_args()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float((found[:, :, None] == truth[:, None, :]).any(2).sum()) / truth.numel()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    rows = torch.empty(args.classes, args.dim, device=device())
    plant_rows_(rows)
    features = batch_for(rows, args.batch)[0].detach()
    truth = exact_topk(features, rows, 10, metric="cosine", chunk_size=1 << 16)[1]  # (B, 10)
    settings = [tuple(int(part) for part in pair.split("x")) for pair in args.settings.split(",")]
    dtype = args.dtype or "default"
    print(f"C {args.classes}, D {args.dim}, B {args.batch} on {rows.device}, dtype {dtype}\n")
    print("| leaf_size | probes | candidates | recall@10 | after a warm rebuild | build ms | query ms |")
    print("|---|---|---|---|---|---|---|")
    for leaf_size, probes in settings:
        index = ClusterIndex(
            metric="cosine",
            leaf_size=leaf_size,
            probes=probes,
            row_dtype=args.dtype,
            compute_dtype=args.dtype,
        )
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
        recall = _recall(found, truth)
        query_ms = sorted(times)[len(times) // 2]
        index.build(rows)  # warm over every row: each moves to its best nearby cluster, as in training
        warm = _recall(index.query(features, 10), truth)
        candidates = probes * int(index.metrics()["index_cluster_width"])
        cells = [leaf_size, probes, candidates, f"{recall:.3f}", f"{warm:.3f}", f"{build_ms:.1f}"]
        cells.append(f"{query_ms:.2f}")
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


if __name__ == "__main__":
    main()
