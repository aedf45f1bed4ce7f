"""The validation split and the checks made on it: which training rows are held out, the data sets of the rows
kept and held out, and whether a trained model only predicts the label prior.

``megaclass train ... --set train.valid_fraction=0.05`` holds out 5% of the training rows (at most
``train.valid_max_rows``), drawn from ``train.seed`` alone; the epoch kept, early stopping and every automatic
choice are made on them, never on the test file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megaclass.data.images import FaceImageDataset
from megaclass.data.loaders import SparseDataset
from megaclass.data.tokenized import TokenDataset, TokenIds
from megaclass.data.xmc import CSR

__all__ = ["EndedAtLabelPrior", "held_out_count", "held_out_rows", "label_prior_share", "take_rows"]

_SPLIT_STREAM = 0x5EED  # keeps the split's draws apart from the shuffling and initialisation streams


class EndedAtLabelPrior(ValueError):
    """Training ended with a model ranking the most frequent training label first for (almost) every row."""


def held_out_count(num_rows: int, *, fraction: float, max_rows: int) -> int:
    """How many of ``num_rows`` rows :func:`held_out_rows` holds out."""
    return max(0, min(round(fraction * num_rows), max_rows, num_rows - 1))


def held_out_rows(num_rows: int, *, fraction: float, max_rows: int, seed: int) -> np.ndarray:
    """The sorted ids of the rows held out for validation: ``round(fraction * num_rows)`` of them (at most
    ``max_rows``, and never all), a pure function of its arguments.

    >>> held_out_rows(100, fraction=0.05, max_rows=10_000, seed=0).shape
    (5,)
    """
    count = held_out_count(num_rows, fraction=fraction, max_rows=max_rows)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    return np.sort(rng.choice(num_rows, size=count, replace=False)).astype(np.int64)


def take_rows(dataset: Any, rows: np.ndarray) -> Any:
    """The data set of rows ``rows`` of ``dataset`` (BoW or featurised text, token ids, or face images), of
    the same class: its label counts, label features and batches are those of these rows alone."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(dataset, SparseDataset):
        return SparseDataset(
            dataset.features.take(rows),
            dataset.labels.take(rows),
            num_classes=dataset.num_classes,
            multilabel=dataset.multilabel,
            path=dataset.path,
            featurizer=dataset.featurizer,
            label_names=dataset.label_names,
        )
    if isinstance(dataset, TokenDataset):
        tokens = dataset.tokens
        taken = CSR(tokens.indptr, tokens.ids, None, 0).take(rows)
        texts = None if dataset.texts is None else [dataset.texts[row] for row in rows]
        return TokenDataset(
            TokenIds(taken.indices, taken.indptr, tokens.pad_id),
            dataset.labels.take(rows),
            num_classes=dataset.num_classes,
            multilabel=dataset.multilabel,
            vocab_size=dataset.input_spec.num_features,
            path=dataset.path,
            texts=texts,
            bucket=dataset.bucket,
            label_names=dataset.label_names,
        )
    if isinstance(dataset, FaceImageDataset):
        return FaceImageDataset(
            _SourceRows(dataset.source, rows),
            num_classes=dataset.num_classes,
            image_size=dataset.image_size,
            flip=dataset.flip,
            seed=dataset.seed,
        )
    raise TypeError(f"take_rows: no split for a {type(dataset).__name__}")


class _SourceRows:
    """Rows ``rows`` of an image source (a ``.rec`` or a list of image files), read in place."""

    def __init__(self, source: Any, rows: np.ndarray) -> None:
        self.source = source
        self.rows = rows
        self.path = source.path
        self.labels = source.labels[rows]
        self.num_classes = source.num_classes

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def read(self, position: int) -> bytes:
        return self.source.read(int(self.rows[position]))

    def name(self, position: int) -> str:
        return self.source.name(int(self.rows[position]))


def label_prior_share(top_ids: np.ndarray, label_counts: np.ndarray, num_train_rows: int) -> float:
    """The share of rows whose top-1 label ``top_ids (N,)`` is the most frequent training label, or 0 when
    that label is on half the training rows or more (then predicting it is no sign of a failed run)."""
    prior = int(np.argmax(label_counts))
    if top_ids.size == 0 or label_counts[prior] >= 0.5 * num_train_rows:
        return 0.0
    return float(np.mean(top_ids == prior))
