"""Accuracy on XMC BoW or text data: megaclass against PECOS XR-Linear and a linear one-vs-rest baseline.

    python benchmarks/xmc_accuracy.py \
        --train data/deb-tags/train_bow.txt.gz --test data/deb-tags/test_bow.txt.gz --preset xmc-mlp

All models see the same BoW rows and are scored by the same
:class:`~megaclass.metrics.ranking.RankingMetrics` (propensities from the training labels). megaclass trains
as ``megaclass train`` does: once with no config (the defaults: the recipe the data resolves), and once per
``--config`` file and ``--preset`` name. PECOS XR-Linear runs with its
defaults for BoW input: the TF-IDF rows as given, PIFA label embeddings clustered by hierarchical 16-way
k-means, squared-hinge linear rankers at every level, beam search of width 10. The one-vs-rest baseline is
scikit-learn's linear SVM (squared hinge, as XR-Linear's leaves) or logistic regression. Prints one markdown
table and appends it as CSV rows to ``--csv``. ``--quick`` trains on a slice of the rows for a smoke run.

libpecos 1.2.8 pins numpy < 2 and scipy < 1.14 (and fails with scipy 1.17), so it is no extra of the
package: install it into a separate environment (``python -m venv --system-site-packages pecos``, then
``pecos/bin/pip install libpecos 'numpy<2' 'scipy<1.14'``) and run the script from there; ``--no-pecos``
leaves it out.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from typing import Any

import numpy as np

from megaclass.data.loaders import SparseDataset, detect_format, open_dataset
from megaclass.metrics.ranking import RankingMetrics, propensity
from megaclass.train.config import load_config_and_keys
from megaclass.train.loop import train

_COLUMNS = ["model", "P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "train_seconds"]


def _scipy_rows(dataset: SparseDataset, rows: np.ndarray) -> Any:
    import scipy.sparse

    part = dataset.features.take(rows)
    shape = (len(rows), dataset.features.num_columns)
    return scipy.sparse.csr_matrix((part.data, part.indices, part.indptr), shape=shape)


def _label_matrix(dataset: SparseDataset, rows: np.ndarray) -> Any:
    import scipy.sparse

    part = dataset.labels.take(rows)
    values = np.ones(len(part.indices), dtype=np.int32)
    return scipy.sparse.csr_matrix(
        (values, part.indices, part.indptr), shape=(len(rows), dataset.num_classes)
    )


def _score(topk_ids: np.ndarray, test: SparseDataset, train_data: SparseDataset) -> dict[str, float]:
    propensities = propensity(train_data.label_counts(), len(train_data))
    metrics = RankingMetrics(test.num_classes, ks=(1, 3, 5), propensities=propensities)
    batch = test.batch(np.arange(len(test)))
    metrics.update(topk_ids, batch.targets)
    return metrics.compute()


def linear_baseline(
    train_data: SparseDataset, test: SparseDataset, train_rows: np.ndarray, *, kind: str, jobs: int
) -> dict[str, float]:
    """Fit one-vs-rest linear models on the TF-IDF rows; P@k etc. of their top-5 decision values."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import LinearSVC

    features = _scipy_rows(train_data, train_rows)
    labels = _label_matrix(train_data, train_rows)
    present = np.flatnonzero(
        np.asarray(labels.sum(axis=0)).ravel() > 0
    )  # a label never seen cannot be fitted
    estimator = LinearSVC(C=1.0) if kind == "svm" else LogisticRegression(C=10.0, max_iter=300)
    model = OneVsRestClassifier(estimator, n_jobs=jobs)
    started = time.perf_counter()
    model.fit(features, labels[:, present].toarray())
    seconds = time.perf_counter() - started
    scores = model.decision_function(_scipy_rows(test, np.arange(len(test))))  # (N, C_seen)
    top = np.argsort(-scores, axis=1)[:, :5]
    metrics = _score(present[top], test, train_data)
    return {**metrics, "train_seconds": seconds}


def _top_ids(scores: Any, k: int) -> np.ndarray:
    """``(N, k)`` ids of the ``k`` best stored scores of each row of a CSR matrix, best first, -1 padded."""
    scores = scores.tocsr()
    rows = np.repeat(np.arange(scores.shape[0]), np.diff(scores.indptr))
    order = np.lexsort((-scores.data, rows))  # by row, then by score, best first
    rank = np.arange(order.size) - scores.indptr[rows[order]]
    keep = rank < k
    top = np.full((scores.shape[0], k), -1, dtype=np.int64)
    top[rows[order][keep], rank[keep]] = scores.indices[order][keep]
    return top


def pecos_baseline(
    train_data: SparseDataset, test: SparseDataset, train_rows: np.ndarray, *, threads: int
) -> dict[str, float]:
    """PECOS XR-Linear with its BoW defaults (PIFA, hierarchical k-means, beam 10); P@k etc. of its top 5."""
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel

    features = _scipy_rows(train_data, train_rows).astype(np.float32)
    labels = _label_matrix(train_data, train_rows).astype(np.float32)
    started = time.perf_counter()
    label_embeddings = LabelEmbeddingFactory.create(labels, features, method="pifa")
    clusters = Indexer.gen(label_embeddings, indexer_type="hierarchicalkmeans", threads=threads)
    model = XLinearModel.train(features, labels, C=clusters, threads=threads)
    seconds = time.perf_counter() - started
    test_features = _scipy_rows(test, np.arange(len(test))).astype(np.float32)
    scores = model.predict(test_features, beam_size=10, only_topk=5, threads=threads)  # (N, C), 5 a row
    return {**_score(_top_ids(scores, 5), test, train_data), "train_seconds": seconds}


def megaclass_model(
    args: argparse.Namespace, train_path: str, *, config_path: str | None, preset: str | None, name: str
) -> dict[str, float]:
    """Train as ``megaclass train [--config FILE | --preset NAME] --set ...`` does (the recipe the data
    resolves fills the keys none of them set: without either, the defaults); its final metrics."""
    overrides = ["train.progress=false", *args.set]
    if args.quick:
        overrides.append("train.epochs=1")
    config, keys = load_config_and_keys(config_path, overrides, preset=preset)
    with tempfile.TemporaryDirectory() as out_dir:
        run_dir = os.path.join(args.out, name.replace(" ", "-")) if args.out else out_dir
        return train(config, train_path=train_path, test_path=args.test, out_dir=run_dir, explicit_keys=keys)


def _quick_slice(path: str, rows: int, folder: str) -> str:
    """The first ``rows`` documents of a BoW file (its header fixed) or a text file, as a new file."""
    import gzip

    bow = detect_format(path) == "xmc-bow"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as source:
        header = source.readline().split() if bow else []
        lines = [line for _, line in zip(range(rows), source, strict=False)]
    target = os.path.join(folder, "train_slice.txt")
    with open(target, "w") as file:
        if bow:
            file.write(f"{len(lines)} {header[1]} {header[2]}\n")
        file.writelines(lines)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--train", required=True, help="training file (BoW, or text: featurised as megaclass does)"
    )
    parser.add_argument("--test", required=True, help="test file, the training file's format")
    parser.add_argument(
        "--config", nargs="*", default=["configs/demo.yaml"], help="megaclass run configs, one row each"
    )
    parser.add_argument(
        "--preset", nargs="*", default=[], help="megaclass presets (xmc-mlp, ...), one row each"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--baseline",
        choices=["svm", "logreg", "none"],
        default="svm",
        help="one-vs-rest linear model (none: leave it out, as on data with thousands of classes)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes (threads for PECOS) fitting baselines")
    parser.add_argument("--no-pecos", action="store_true", help="leave PECOS XR-Linear out")
    parser.add_argument(
        "--no-defaults", action="store_true", help="leave out megaclass with no config (the data's recipe)"
    )
    parser.add_argument("--out", help="keep megaclass's run folders here (one subfolder a config or preset)")
    parser.add_argument("--csv", default="benchmarks/xmc_accuracy.csv", help="append results here")
    parser.add_argument("--quick", action="store_true", help="2,000 training rows, one epoch: a smoke run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        train_path = _quick_slice(args.train, 2000, folder) if args.quick else args.train
        train_data = open_dataset(train_path)
        test = open_dataset(args.test, num_classes=train_data.num_classes, featurizer=train_data.featurizer)
        rows = np.arange(len(train_data))
        results = []
        if args.baseline != "none":
            metrics = linear_baseline(train_data, test, rows, kind=args.baseline, jobs=args.jobs)
            results.append({"model": f"one-vs-rest {args.baseline} (scikit-learn)", **metrics})
        if not args.no_pecos:
            metrics = pecos_baseline(train_data, test, rows, threads=args.jobs)
            results.append({"model": "XR-Linear (PECOS)", **metrics})
        runs = [] if args.no_defaults else [(None, None, "defaults")]
        runs += [(path, None, os.path.basename(path)) for path in args.config]
        runs += [(None, preset, f"preset {preset}") for preset in args.preset]
        for config_path, preset, name in runs:
            metrics = megaclass_model(args, train_path, config_path=config_path, preset=preset, name=name)
            results.append({"model": f"megaclass {name}", **metrics})

    print("| " + " | ".join(_COLUMNS) + " |")
    print("|" + "---|" * len(_COLUMNS))
    for row in results:
        cells = [row["model"]] + [
            f"{row[c]:.4f}" if c != "train_seconds" else f"{row[c]:.1f}" for c in _COLUMNS[1:]
        ]
        print("| " + " | ".join(cells) + " |")
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as file:
            writer = csv.writer(file)
            if new:
                writer.writerow(["time", "train", "test", "quick", *_COLUMNS])
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            for row in results:
                writer.writerow([stamp, args.train, args.test, args.quick, *(row[c] for c in _COLUMNS)])


if __name__ == "__main__":
    main()
