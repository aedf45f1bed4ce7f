"""Cold build time, query time and recall@10 of the cluster index against an exact scan, over class counts.

    python benchmarks/index_recall.py --quick                         # CPU: C 10^4, 10^5, 10^6 at D 64
    python benchmarks/index_recall.py --sizes 1e6,1e7 --dim 512       # a GPU: the defaults at scale
    python benchmarks/index_recall.py --sizes 1e5 --settings 100x4,316x2,auto   # LEAFxPROBES sweeps

Rows are "trained-like" as in ``benchmarks/selected.py`` (group directions plus noise) and the queries are
features drawn as the training ones are (near their class rows). For every size the exact chunked scan is the
baseline row (recall 1 by definition); each index setting is built cold (timed to completion), queried for
the batch (median of ``--reps``), then rebuilt warm over every row, as a training run's later builds are.
"build peak" is what the cold build allocates at its peak (a GPU's allocator peak; on the CPU the C heap's
bytes in use, :class:`~_harness.HeapPeak`), beside what the memory plan counts for it
(:func:`~megaclass.index.kmeans.cold_build_scratch_bytes`).
``auto`` is the default index: clusters of ``sqrt(C) / 16`` rows (at least 32) and the search its build
calibrates for ``--recall-target`` (the index's default); "thorough" is the wider search its build
calibrates for evaluation (``query(..., thorough=True)``), timed and scored on the same batch, with the
scan a batch takes when its search would gather more rows than the index holds turned off, so that the
column scores the search itself. Shared
centroids: scored in one matmul for the whole batch (``K``, or ``G`` group centroids when groups are probed
first); gathered rows: centroids of the probed groups and member rows gathered and scored for each query
(probes times the padded cluster width).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import HeapPeak, synchronize  # noqa: E402
from megaclass.index.exact import exact_topk  # noqa: E402
from megaclass.index.kmeans import ClusterIndex, cold_build_scratch_bytes  # noqa: E402
from selected import batch_for, device, plant_rows_  # noqa: E402

QUICK_SIZES = (10**4, 10**5, 10**6)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated class counts C")
    parser.add_argument("--dim", type=int, default=512, help="D")
    parser.add_argument("--batch", type=int, default=512, help="B, queries at once")
    parser.add_argument("--reps", type=int, default=5, help="timed queries per setting (median)")
    parser.add_argument("--metric", choices=["cosine", "dot"], default="cosine")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="rows' and scores' dtype (default: the index's)"
    )
    parser.add_argument(
        "--settings",
        default="auto",
        help="comma-separated LEAFxPROBES pairs (PROBES may be auto) or auto (both chosen)",
    )
    parser.add_argument(
        "--recall-target",
        type=float,
        default=None,
        help="recall@10 the auto probe counts are chosen for (default: the index's)",
    )
    parser.add_argument("--quick", action="store_true", help="CPU-sized: C 10^4..10^6, D 64, B 256")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.dim, args.batch, args.reps = ",".join(map(str, QUICK_SIZES)), 64, 256, 3
    return args


def _timed(fn, reps: int) -> tuple[float, object]:
    """Median milliseconds of ``reps`` calls of ``fn`` and its last result."""
    times, result = [], None
    for _ in range(reps):
        synchronize()
        started = time.perf_counter()
        result = fn()
        synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2], result


def _build(
    make_index: Callable[[], ClusterIndex], rows: torch.Tensor
) -> tuple[ClusterIndex, float, int | None]:
    """A cold build of ``make_index()`` over ``rows``: the index, its milliseconds and the bytes it allocates
    at its peak (on the CPU from a second build of its own: reading the heap after every op slows it)."""
    index = make_index()
    if rows.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        build_ms, _ = _timed(lambda: index.build(rows), 1)
        return index, build_ms, torch.cuda.max_memory_allocated() - before
    build_ms, _ = _timed(lambda: index.build(rows), 1)
    with HeapPeak() as heap:
        make_index().build(rows)
    return index, build_ms, heap.peak


def _recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float((found[:, :, None] == truth[:, None, :]).any(2).sum()) / truth.numel()


def _settings(text: str) -> list[tuple[int | None, int | None]]:
    settings: list[tuple[int | None, int | None]] = []
    for part in text.split(","):
        if part == "auto":
            settings.append((None, None))
        else:
            leaf, probes = part.split("x")
            settings.append((int(leaf), None if probes == "auto" else int(probes)))
    return settings


def main() -> None:
    args = parse_args()
    dtype = args.dtype or "default"
    print(f"D {args.dim}, B {args.batch}, metric {args.metric}, on {device()}, dtype {dtype}\n")
    print(
        "| C | index | leaf | clusters | groups / clusters probed | shared centroids | gathered rows "
        "| build s | build peak MiB (planned) | query ms | recall@10 | after a warm rebuild "
        "| thorough: gathered rows | query ms | recall@10 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for classes in (int(float(size)) for size in args.sizes.split(",")):
        torch.manual_seed(0)
        rows = torch.empty(classes, args.dim, device=device())
        plant_rows_(rows)
        features = batch_for(rows, args.batch)[0].detach()

        def scan(rows=rows, features=features):
            return exact_topk(features, rows, 10, metric=args.metric, chunk_size=1 << 16)[1]

        scan_ms, truth = _timed(scan, args.reps)
        print(f"| {classes} | exact | | | | {classes} | | 0 | | {scan_ms:.2f} | 1.000 | 1.000 | | | |")
        for leaf_size, probes in _settings(args.settings):
            target = {} if args.recall_target is None else {"recall_target": args.recall_target}
            make_index = functools.partial(
                ClusterIndex,
                metric=args.metric,
                leaf_size=leaf_size,
                probes=probes,
                **target,
                row_dtype=args.dtype,
                compute_dtype=args.dtype,
                background=False,
            )
            index, build_ms, build_peak = _build(make_index, rows)
            row_bytes = {"float32": 4, "bfloat16": 2}[
                args.dtype or ("bfloat16" if rows.is_cuda else "float32")
            ]
            planned = cold_build_scratch_bytes(
                classes, args.dim, row_bytes=row_bytes, device_type=rows.device.type
            )
            query_ms, found = _timed(lambda index=index, x=features: index.query(x, 10), args.reps)
            recall = _recall(found, truth)
            index.scan_when_cheaper = False  # the thorough search itself, not the scan that stands in for it
            wide_ms, wide = _timed(
                lambda index=index, x=features: index.query(x, 10, thorough=True), args.reps
            )
            index.scan_when_cheaper = True
            stats = index.metrics()
            index.build(rows)  # warm over every row: each moves to its best nearby cluster, as in training
            warm = _recall(index.query(features, 10), truth)
            cells = [
                classes,
                "cluster",
                index.leaf_size,
                int(stats["index_clusters"]),
                f"{int(stats['index_group_probes'])} / {int(stats['index_probes'])}",
                int(stats["index_shared_centroids"]),
                int(stats["index_gathered_rows"]),
                f"{build_ms / 1e3:.2f}",
                f"{build_peak / 2**20:.0f} ({planned / 2**20:.0f})" if build_peak is not None else "",
            ]
            cells += [f"{query_ms:.2f}", f"{recall:.3f}", f"{warm:.3f}"]
            cells += [
                int(stats.get("index_eval_gathered_rows", 0)),
                f"{wide_ms:.2f}",
                f"{_recall(wide, truth):.3f}",
            ]
            print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
