"""Data pipeline throughput on the CPU: XMC readers (uncached and cached), the text featuriser, the generator.

``python benchmarks/data.py --data data/deb-tags/train_bow.txt.gz data/deb-tags/train.txt.gz``
``python benchmarks/data.py --quick`` (synthetic data in a temporary folder)

Prints a markdown table (wall and CPU seconds, rows a second) and appends CSV rows to ``--results``. Text
files are featurised with the featuriser's defaults (what ``megaclass train`` fits) on each thread count of
``--threads`` (torch's thread count; the featuriser uses at most 8), and the rows of every thread count are
checked equal to the first's.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from megaclass.data.featurizer import FeaturizerConfig, TextFeaturizer, featurizer_threads
from megaclass.data.synthetic import synthesize, write_label_names
from megaclass.data.xmc import load_xmc


def _timed(step: str, name: str, rows: int, call: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    row = {"step": step, "file": name, "rows": rows, "wall_s": wall, "cpu_s": cpu, "rows_per_s": rows / wall}
    return row, value


@contextlib.contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _featurizer_rows(name: str, texts: list[str], threads: list[int]) -> list[dict[str, Any]]:
    """Fit and transform with the default config on each thread count; the rows must not depend on it."""
    rows, first = [], None
    for count in threads:
        featurizer = TextFeaturizer(FeaturizerConfig())
        with _torch_threads(count):
            used = featurizer_threads()  # torch's count, capped
            on = f"{used} thread" + ("s" if used > 1 else "")
            fit, _ = _timed(
                f"featurizer fit, {on}",
                name,
                len(texts),
                lambda featurizer=featurizer: featurizer.fit(texts),
            )
            transform, features = _timed(
                f"featurizer transform, {on}",
                name,
                len(texts),
                lambda featurizer=featurizer: featurizer.transform(texts),
            )
        arrays = (features.indptr, features.indices, features.data)
        if first is None:
            first = arrays
        elif not all(np.array_equal(a, b) for a, b in zip(first, arrays, strict=True)):
            raise SystemExit(f"{name}: the rows on {count} threads differ from those on {threads[0]}")
        rows += [fit, transform]
    return rows


def _file_rows(path: str, featurize_rows: int | None, threads: list[int]) -> list[dict[str, Any]]:
    """Time one file: a parse without cache, a cached load, and for text data the featuriser."""
    name = os.path.basename(path)
    cache_dir = tempfile.mkdtemp(prefix="megaclass-bench-cache-")
    os.environ["MEGACLASS_CACHE"] = cache_dir
    first, data = _timed("read (parse)", name, 0, lambda: load_xmc(path, cache=False))
    first["rows"] = len(data)
    first["rows_per_s"] = len(data) / first["wall_s"]
    load_xmc(path)  # writes the cache
    cached, _ = _timed("read (cached)", name, len(data), lambda: load_xmc(path))
    rows = [first, cached]
    if data.texts is not None:
        texts = data.texts[:featurize_rows] if featurize_rows else data.texts
        rows += _featurizer_rows(name, texts, threads)
    return rows


def _synth_rows(folder: str, num_docs: int, num_labels: int) -> tuple[list[dict[str, Any]], list[str]]:
    rows, paths = [], []
    for fmt, file_name in (("bow", "synth_bow.txt"), ("text", "synth.txt")):
        path = os.path.join(folder, file_name)
        step = f"synthesize {fmt} (C={num_labels:,})"
        row, _ = _timed(
            step,
            file_name,
            num_docs,
            lambda path=path, fmt=fmt: synthesize(path, num_docs=num_docs, num_labels=num_labels, format=fmt),
        )
        rows.append(row)
        paths.append(path)
    write_label_names(os.path.join(folder, "labels.txt"), num_labels)
    return rows, paths


def _print_and_save(rows: list[dict[str, Any]], results: str) -> None:
    print("| step | file | rows | wall_s | cpu_s | rows_per_s |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['step']} | {row['file']} | {row['rows']:,} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} "
            f"| {row['rows_per_s']:,.0f} |"
        )
    stamp = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node()}
    new_file = not os.path.exists(results)
    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    with open(results, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*stamp, *rows[0]])
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**stamp, **row})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="*", default=[], help="XMC files (BoW or text) to read and featurise")
    parser.add_argument("--quick", action="store_true", help="small synthetic data only")
    parser.add_argument("--synth-docs", type=int, default=200_000, help="documents for the generator timing")
    parser.add_argument(
        "--synth-labels", type=int, default=10_000_000, help="labels for the generator timing"
    )
    parser.add_argument("--featurize-rows", type=int, default=None, help="featurise only the first N texts")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, torch.get_num_threads()}),
        help="featuriser thread counts to time (default: 1 and torch's)",
    )
    parser.add_argument("--results", default="benchmarks/data_results.csv", help="CSV file to append rows to")
    args = parser.parse_args()
    docs, labels = (20_000, 100_000) if args.quick else (args.synth_docs, args.synth_labels)
    with tempfile.TemporaryDirectory(prefix="megaclass-bench-") as folder:
        rows, paths = _synth_rows(folder, docs, labels)
        for path in paths + list(args.data):
            rows += _file_rows(path, args.featurize_rows, args.threads)
    _print_and_save(rows, args.results)


if __name__ == "__main__":
    main()
