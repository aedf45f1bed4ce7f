"""Data sources: open a file by format into a dataset, and iterate it in seeded, resumable batches.

A dataset knows its number of classes, whether it is multi-label, its label counts and its
:class:`InputSpec`; ``dataset.batch(rows)`` gives a :class:`Batch` whose targets are a ``LongTensor[B]``
(one label per sample) or :class:`~megaclass.targets.RaggedLabels`. A :class:`BatchLoader` orders the rows
of each epoch by a permutation seeded from ``(seed, epoch)`` alone, so a run resumed at ``(epoch, step)``
sees exactly the batches an uninterrupted run would; ``rank`` / ``world_size`` split each step's global batch
into equal slices, one per rank, so ``N`` processes together see the batches one process would.

New formats register an opener in :func:`dataset_formats` and a sniffing rule in :func:`detect_format`.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np
import torch

from megaclass.data.batch import Batch, InputSpec, SparseInputs, batch_targets, count_labels
from megaclass.data.featurizer import FeaturizerConfig, TextFeaturizer
from megaclass.data.images import is_image_list, open_face_dataset
from megaclass.data.lf_json import is_lf_json_line, read_lf_json
from megaclass.data.tokenized import open_token_dataset
from megaclass.data.xmc import label_features, load_xmc
from megaclass.errors import DataFormatError

__all__ = [
    "BatchLoader",
    "SparseDataset",
    "dataset_formats",
    "detect_format",
    "open_dataset",
    "other_kind",
]


@dataclass(eq=False, repr=False)
class SparseDataset:
    """Sparse feature rows with their labels, in memory (XMC BoW, or text after a featuriser).

    Args:
        features: :class:`~megaclass.data.xmc.CSR` of feature values, ``F = num_columns``.
        labels: :class:`~megaclass.data.xmc.CSR` of label ids per row (``data`` unused).
        num_classes: ``C``.
        multilabel: whether targets are ragged label sets rather than one class per row.
        path: the file it came from, for messages.
        featurizer: the fitted text featuriser that made ``features``, or None for BoW data.
        label_names: the name of each class, where the text file named its labels (else None).
    """

    features: Any
    labels: Any
    _: KW_ONLY
    num_classes: int
    multilabel: bool
    path: str = ""
    featurizer: Any = None
    label_names: list[str] | None = None
    input_spec: InputSpec = field(init=False)
    _label_counts: np.ndarray | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.input_spec = InputSpec(kind="sparse", num_features=int(self.features.num_columns))
        label_lengths = self.labels.row_lengths()
        if not self.multilabel and len(label_lengths) and not np.all(label_lengths == 1):
            bad = int(np.flatnonzero(label_lengths != 1)[0])
            raise DataFormatError(
                self.path, f"one-label data set has {label_lengths[bad]} labels on a row", line=bad + 1
            )

    def __len__(self) -> int:
        return len(self.labels.indptr) - 1

    def label_counts(self) -> np.ndarray:
        """``(C,)`` int64 number of rows carrying each label; counted once and shared (do not change it)."""
        if self._label_counts is None:
            self._label_counts = count_labels(self.labels, self.num_classes)
        return self._label_counts

    def label_features(self, *, dim: int = 256, seed: int = 0) -> np.ndarray:
        """``(C, E)`` float32 PIFA vectors: each label's normalised sum of its rows' features."""
        return label_features(self.features, self.labels, dim=dim, seed=seed)

    def batch(self, rows: np.ndarray) -> Batch:
        """The :class:`Batch` of rows ``rows`` ``(B,)``, on the CPU."""
        rows = np.asarray(rows, dtype=np.int64)
        features = self.features.take(rows)
        inputs = SparseInputs(
            torch.from_numpy(features.indices.astype(np.int64)),
            torch.from_numpy(features.indptr),
            torch.from_numpy(np.ascontiguousarray(features.data, dtype=np.float32)),
        )
        return Batch(inputs, batch_targets(self.labels, rows, multilabel=self.multilabel))


_BOW_HEADER = re.compile(rb"^\s*\d+\s+\d+\s+\d+\s*$")


_CORRUPT_GZIP = (EOFError, zlib.error, gzip.BadGzipFile)  # what reading through damaged gzip data raises


def _first_line(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            return handle.readline(1 << 20)
    except _CORRUPT_GZIP as error:
        raise DataFormatError(path, f"corrupt gzip data ({error})") from None
    except OSError as error:
        raise DataFormatError(path, f"cannot read: {error}") from None


_KINDS = {"xmc-bow": "BoW rows", "xmc-text": "text", "lf-json": "text", "face-images": "images"}


def other_kind(
    path: str | os.PathLike, expected: InputSpec, *, featurized: bool, data_format: str = "auto"
) -> tuple[str, str] | None:
    """``(what path holds, what data opened as expected holds)`` in words (``BoW rows``, ``text`` for
    ``labels<TAB>text`` and LF JSON alike, or ``images``) where the two differ, else None: the files of one
    run must hold the same. ``featurized``: ``expected``'s sparse rows came from a text featuriser. A named
    ``data_format`` reads every file one way: nothing is sniffed then."""
    if data_format != "auto":
        return None
    if expected.kind == "sparse":
        wanted = "text" if featurized else "BoW rows"
    else:
        wanted = "text" if expected.kind == "tokens" else "images"
    found = _KINDS[detect_format(path)]
    return None if found == wanted else (found, wanted)


def detect_format(path: str | os.PathLike) -> str:
    """The format of the data file ``path``.

    ``xmc-bow`` (header ``N F L``), ``xmc-text`` (``labels<TAB>text``), ``lf-json`` (JSON objects with
    ``target_ind``, see :mod:`megaclass.data.lf_json`) or ``face-images`` (a ``.rec``, an image folder, or a
    list of ``relpath label`` lines).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataFormatError(path, "no such file")
    if os.path.isdir(path) or path.endswith(".rec"):
        return "face-images"  # an InsightFace .rec, a folder holding train.rec, or an image folder
    line = _first_line(path)
    if not line.strip():
        raise DataFormatError(path, "empty file: cannot tell its format", line=1)
    if is_lf_json_line(line):
        return "lf-json"
    if line.startswith(b"\x80"):  # a pickle (protocol 2 and up): InsightFace's verification pairs
        raise DataFormatError(
            path,
            "a pickled face verification set (as lfw.bin), not a data file: score it during training with "
            "--set eval.verification=[PATH], or give it to megaclass extract or verify",
        )
    if is_image_list(path):
        return "face-images"  # 'relpath label' lines
    if _BOW_HEADER.match(line):
        return "xmc-bow"
    if b"\t" in line:
        return "xmc-text"
    raise DataFormatError(
        path,
        f"unknown format: first line {line[:80].decode('utf-8', errors='replace').rstrip()!r} is neither a "
        "BoW header 'num_docs num_features num_labels', 'labels<TAB>text' nor a JSON object with "
        "'target_ind'",
        line=1,
    )


def _open_xmc(
    path: str,
    *,
    num_classes: int | None,
    featurizer: Any,
    featurizer_config: Any,
    label_names: list[str] | None,
    read: Callable = load_xmc,
) -> SparseDataset:
    """Open an XMC BoW file as is, or XMC text (``read`` by the format's reader) through a (fitted, or fitted
    here) featuriser."""
    data = read(path, num_labels=num_classes, label_names=label_names)
    if data.features is not None:
        features = data.features
        featurizer = None
    else:
        if featurizer is None:
            featurizer = TextFeaturizer(featurizer_config or FeaturizerConfig())
            featurizer.fit(data.texts)
            if featurizer.vocabulary is not None and not len(featurizer.vocabulary):
                raise DataFormatError(
                    path,
                    f"no word or character n-gram is in {featurizer.config.min_df} of its {len(data.texts)} "
                    "texts or more: nothing to learn from (lower data.featurizer.min_df, or give more texts)",
                )
        features = featurizer.transform(data.texts)
    return SparseDataset(
        features,
        data.labels,
        num_classes=int(data.num_labels),
        multilabel=bool(data.multilabel),
        path=path,
        featurizer=featurizer,
        label_names=data.label_names,
    )


def dataset_formats() -> dict[str, Callable[..., SparseDataset]]:
    """Registered formats and their openers ``(path, *, num_classes, featurizer, featurizer_config,
    label_names)``."""
    return {
        "xmc-bow": _open_xmc,
        "xmc-text": _open_xmc,
        "lf-json": functools.partial(_open_xmc, read=read_lf_json),
        "face-images": _open_face_images,
    }


def _open_face_images(
    path: str, *, num_classes: int | None, featurizer: Any, featurizer_config: Any, label_names: Any
) -> Any:
    """Open a face ``.rec``, image folder or ``relpath label`` list (see :mod:`megaclass.data.images`); their
    labels are identity ids (``label_names`` must be None)."""
    if label_names is not None:
        raise DataFormatError(path, "its labels are identity ids, the run's are names (its training file's)")
    return open_face_dataset(path, num_classes=num_classes)


def open_dataset(
    path: str | os.PathLike,
    *,
    data_format: str = "auto",
    num_classes: int | None = None,
    featurizer: Any = None,
    featurizer_config: Any = None,
    tokenizer: Any = None,
    max_length: int = 128,
    label_names: list[str] | None = None,
) -> SparseDataset:
    """Open the data file ``path`` as a dataset.

    Args:
        path: the file (``.gz`` accepted).
        data_format: ``auto`` (sniffed by :func:`detect_format`) or a name from :func:`dataset_formats`.
        num_classes: ``C`` when known (the training set's, when opening a test set).
        featurizer: a fitted text featuriser (test sets of text data); None fits one from
            ``featurizer_config``.
        featurizer_config: the featuriser's config when one is fitted here; None for its defaults.
        tokenizer: a Hugging Face fast tokenizer: read text data as token ids (cached, see
            :mod:`megaclass.data.tokenized`) for a transformer encoder instead of featurising it.
        max_length: tokens per document when ``tokenizer`` is given.
        label_names: the run's label names, where its training file named its labels (a test file's names
            are read by them).

    >>> train = open_dataset("data/deb-tags/train_bow.txt.gz")  # doctest: +SKIP
    >>> train.num_classes, train.multilabel
    (595, True)
    """
    path = os.fspath(path)
    formats = dataset_formats()
    if data_format == "auto":
        data_format = detect_format(path)
    if data_format not in formats:
        raise ValueError(f"data format {data_format!r} of {path}: expected auto or one of {sorted(formats)}")
    try:
        if tokenizer is not None:
            read = read_lf_json if data_format == "lf-json" else load_xmc
            return open_token_dataset(
                path,
                tokenizer,
                max_length=max_length,
                num_classes=num_classes,
                read=read,
                label_names=label_names,
            )
        return formats[data_format](
            path,
            num_classes=num_classes,
            featurizer=featurizer,
            featurizer_config=featurizer_config,
            label_names=label_names,
        )
    except _CORRUPT_GZIP as error:
        raise DataFormatError(path, f"corrupt gzip data ({error})") from None


def _identity(batch: Batch) -> Batch:
    return batch


class _RowBatches(torch.utils.data.Dataset):
    """Batches of an epoch as a map-style dataset, for worker processes."""

    def __init__(self, dataset: SparseDataset, row_batches: list[np.ndarray]) -> None:
        self.dataset = dataset
        self.row_batches = row_batches

    def __len__(self) -> int:
        return len(self.row_batches)

    def __getitem__(self, index: int) -> Batch:
        return self.dataset.batch(self.row_batches[index])


@dataclass(eq=False, repr=False)
class BatchLoader:
    """Seeded, resumable, shardable batches of a dataset.

    Args:
        dataset: anything with ``__len__`` and ``batch(rows) -> Batch``.
        batch_size: rows per batch on this rank; a step's global batch is ``world_size * batch_size`` rows.
        shuffle: order rows by a permutation seeded from ``(seed, epoch)``; else file order.
        seed: the shuffling seed.
        drop_last: drop the last, smaller global batch of each epoch.
        rank: this process's slice of each global batch; ``world_size`` slices. Step ``s``'s batches of all
            ranks, in rank order, are the batch of ``world_size * batch_size`` rows that one process with
            that batch size gets, so ``N`` ranks take the steps of one process and a run resumes on another
            number of ranks with the same global batch. Every rank gets as many rows: when ``world_size``
            does not divide the number of rows, the last global batch of each epoch is topped up with (at
            most ``world_size - 1``) of the epoch's first rows, as ``DistributedSampler`` does; that batch
            alone then differs from one process's.
        num_workers: worker processes that build batches (0: in this process).
    """

    dataset: Any
    _: KW_ONLY
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size: expected > 0, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={self.world_size}, got {self.rank}")
        if len(self.dataset) == 0:
            raise ValueError(f"data set {getattr(self.dataset, 'path', '')!r} has no rows")

    def _shard_size(self) -> int:
        return -(-len(self.dataset) // self.world_size)

    def steps_per_epoch(self) -> int:
        """Batches per epoch on each rank: the global batches of the epoch, for any world size."""
        rows, global_batch = len(self.dataset), self.batch_size * self.world_size
        steps = rows // global_batch if self.drop_last else -(-rows // global_batch)
        return max(steps, 1)

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """The row ids of each batch of ``epoch`` on this rank, a pure function of ``(seed, epoch)``."""
        count = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(count)
        else:
            order = np.arange(count)
        order = np.resize(order, self._shard_size() * self.world_size)  # padded to a multiple of the ranks
        global_batch = self.batch_size * self.world_size
        if self.shuffle and hasattr(self.dataset, "arrange"):  # token data: batches of similar lengths
            order = self.dataset.arrange(order, global_batch, seed=(self.seed, epoch))
        # step s's global batch is order[s * N * B : (s + 1) * N * B] for any world size N; rank r takes the
        # r-th of its N equal parts, so the ranks' batches in rank order are one process's batch of N * B rows
        steps = range(self.steps_per_epoch())
        batches = [order[step * global_batch : (step + 1) * global_batch] for step in steps]
        return [rows.reshape(self.world_size, -1)[self.rank] for rows in batches]  # (B,) each

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from step ``start_step`` on (a resumed run skips the steps done)."""
        row_batches = self.epoch_rows(epoch)[start_step:]
        if self.num_workers == 0:
            for rows in row_batches:
                yield self.dataset.batch(rows)
            return
        loader = torch.utils.data.DataLoader(
            _RowBatches(self.dataset, row_batches),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_identity,
        )
        yield from loader
