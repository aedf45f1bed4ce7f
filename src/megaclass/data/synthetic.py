"""Synthetic extreme classification data for scale benchmarks: any number of labels, written in chunks.

The generative model, deterministic by ``seed`` and using memory independent of the number of labels:

- Label popularity follows a power law (Zipf): a label of frequency rank ``r`` is drawn with probability about
  ``∝ (r + 1)^-label_exponent``. Ranks map to label ids by a seeded affine permutation, so frequent labels are
  spread over the id range.
- Labels form a planted two-level hierarchy: clusters of ``cluster_size`` consecutive ids, and groups of
  ``group_size`` consecutive clusters. A document draws a primary label, and its other labels mostly from the
  primary label's cluster (co-occurrence), sometimes from the whole label set.
- Words (features) are drawn from a mixture: words of the document's labels (each label owns
  ``words_per_label`` words, picked by hashing), topic words of their clusters (``words_per_cluster`` each)
  and of their groups (``words_per_group`` each), and background words (noise) from a power law over the
  vocabulary. Labels of one cluster share word distributions, labels of one group less so: the task is
  learnable (a good model's P@1 is far above the most frequent label's share), and harder for rare labels.
- BoW values are sublinear TF (``1 + ln tf``), L2-normalised per document; the text format writes the word
  tokens ``w<id>`` in order.

Use one ``seed`` and different ``stream`` values for the train and test splits of one task. Text data takes
its label space from a ``labels.txt`` beside it (:func:`write_label_names`) or the reader's ``num_labels``.

>>> synthesize("train_bow.txt", num_docs=1000, num_labels=10_000, seed=0, stream=0)  # doctest: +SKIP
>>> synthesize("test_bow.txt", num_docs=200, num_labels=10_000, seed=0, stream=1)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from megaclass.data.xmc import CSR, _labels_and_features_stream, _open_text_for_write, _render, _row_tokens

__all__ = ["SynthConfig", "synthesize", "write_label_names"]

_MIX = np.uint64(0x9E3779B97F4A7C15)
_CHUNK_DOCS = 1 << 14


@dataclass(frozen=True)
class SynthConfig:
    """Shape of the synthetic task (see the module docstring for the model)."""

    labels_per_doc: float = 3.0  # mean labels a document; 1 gives multi-class data (exactly one label)
    label_exponent: float = 1.0  # power-law exponent of label popularity by rank
    cluster_size: int = 16  # labels per planted cluster
    same_cluster: float = 0.8  # chance an extra label comes from the primary label's cluster
    words_per_doc: float = 40.0  # mean word tokens a document
    words_per_label: int = 8  # words owned by each label
    words_per_cluster: int = 64  # topic words of each cluster
    word_exponent: float = 1.0  # power-law exponent of background word popularity
    label_word_share: float = 0.35  # share of tokens drawn from the document's labels' own words
    cluster_word_share: float = 0.3  # share from their clusters' topic words
    group_size: int = 8  # clusters per group, the hierarchy's upper level
    words_per_group: int = 256  # topic words of each group
    group_word_share: float = 0.1  # share from their groups' topic words; the rest is background

    def __post_init__(self) -> None:
        if self.labels_per_doc < 1:
            raise ValueError(f"labels_per_doc must be >= 1, got {self.labels_per_doc}")
        sizes = (self.cluster_size, self.group_size, self.words_per_label, self.words_per_cluster)
        if min(*sizes, self.words_per_group) < 1:
            raise ValueError(
                "cluster_size, group_size, words_per_label, words_per_cluster and words_per_group must be "
                f"positive, got {(*sizes, self.words_per_group)}"
            )
        if self.words_per_doc < 1:
            raise ValueError(f"words_per_doc must be >= 1, got {self.words_per_doc}")
        shares = (self.same_cluster, self.label_word_share, self.cluster_word_share, self.group_word_share)
        if not all(0 <= share <= 1 for share in shares) or sum(shares[1:]) > 1:
            raise ValueError(
                f"shares must lie in [0, 1] and label + cluster + group word shares sum to <= 1, got {shares}"
            )
        if self.label_exponent <= 0 or self.word_exponent <= 0:
            raise ValueError("label_exponent and word_exponent must be positive")


def _hash(values: np.ndarray, salt: int) -> np.ndarray:
    """SplitMix64 of ``values`` (uint64), salted; a cheap seeded random function of integers."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(salt & 0xFFFFFFFFFFFFFFFF) * _MIX
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _power_law_ranks(rng: np.random.Generator, n: int, exponent: float, size: int) -> np.ndarray:
    """Ranks in ``[0, n)`` with density ``∝ (rank + 1)^-exponent`` (continuous inverse CDF, O(1) memory)."""
    u = rng.random(size)
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        top = (n + 1.0) ** (1.0 - exponent)
        x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - exponent))
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


class _Task:
    """The planted structure: label permutation, clusters and word ownership, all from hashing (no tables)."""

    def __init__(self, num_labels: int, num_features: int, config: SynthConfig, seed: int) -> None:
        self.num_labels, self.num_features, self.config, self.seed = num_labels, num_features, config, seed
        rng = np.random.default_rng([seed, 0xC1A55])
        self.stride = int(rng.integers(1, num_labels)) if num_labels > 1 else 1
        while np.gcd(self.stride, num_labels) != 1:
            self.stride += 1
        self.offset = int(rng.integers(0, num_labels))

    def label_of_rank(self, rank: np.ndarray) -> np.ndarray:
        return (rank * self.stride + self.offset) % self.num_labels

    def owned_words(self, owner: np.ndarray, pick: np.ndarray, salt: int) -> np.ndarray:
        """Word id number ``pick`` of ``owner`` (a label or a cluster), by hashing."""
        key = owner.astype(np.uint64) * np.uint64(1 << 20) + pick.astype(np.uint64)
        return (_hash(key, self.seed * 7 + salt) % np.uint64(self.num_features)).astype(np.int64)


def _draw_labels(task: _Task, rng: np.random.Generator, num_docs: int) -> CSR:
    """Each document's labels: a primary one by popularity, extras mostly from its cluster; deduplicated."""
    config = task.config
    extra = (
        rng.poisson(config.labels_per_doc - 1.0, num_docs)
        if config.labels_per_doc > 1
        else np.zeros(num_docs)
    )
    counts = 1 + extra.astype(np.int64)
    primary = task.label_of_rank(_power_law_ranks(rng, task.num_labels, config.label_exponent, num_docs))
    doc = np.repeat(np.arange(num_docs, dtype=np.int64), counts)
    labels = np.repeat(primary, counts)
    _, rank = _row_tokens(counts)
    is_extra = rank > 0
    size = int(is_extra.sum())
    cluster_start = labels[is_extra] // config.cluster_size * config.cluster_size
    in_cluster = np.minimum(cluster_start + rng.integers(0, config.cluster_size, size), task.num_labels - 1)
    anywhere = task.label_of_rank(_power_law_ranks(rng, task.num_labels, config.label_exponent, size))
    labels[is_extra] = np.where(rng.random(size) < config.same_cluster, in_cluster, anywhere)
    keys = np.unique(doc * task.num_labels + labels)  # sorted by document, then label
    doc, labels = keys // task.num_labels, keys % task.num_labels
    indptr = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(doc, minlength=num_docs), out=indptr[1:])
    return CSR(indptr, labels.astype(np.int32), None, task.num_labels)


def _draw_words(task: _Task, rng: np.random.Generator, labels: CSR) -> tuple[np.ndarray, np.ndarray]:
    """Word tokens of each document, in order: ``(indptr (N + 1,), word ids (T,))``."""
    config = task.config
    num_docs = len(labels)
    counts = np.maximum(rng.poisson(config.words_per_doc, num_docs), 1).astype(np.int64)
    total = int(counts.sum())
    doc = np.repeat(np.arange(num_docs, dtype=np.int64), counts)
    # The label each token is about: a uniform pick among its document's labels.
    label_count = labels.row_lengths()
    pick = labels.indptr[doc] + (rng.random(total) * label_count[doc]).astype(np.int64)
    about = labels.indices[pick].astype(np.int64)
    source = rng.random(total)
    words = _power_law_ranks(rng, task.num_features, config.word_exponent, total)
    own = source < config.label_word_share
    words[own] = task.owned_words(about[own], rng.integers(0, config.words_per_label, int(own.sum())), 1)
    topic = ~own & (source < config.label_word_share + config.cluster_word_share)
    cluster = about[topic] // config.cluster_size
    words[topic] = task.owned_words(cluster, rng.integers(0, config.words_per_cluster, int(topic.sum())), 2)
    shares = config.label_word_share + config.cluster_word_share
    broad = ~own & ~topic & (source < shares + config.group_word_share)
    group = about[broad] // (config.cluster_size * config.group_size)
    words[broad] = task.owned_words(group, rng.integers(0, config.words_per_group, int(broad.sum())), 3)
    indptr = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, words


def _bag_of_words(indptr: np.ndarray, words: np.ndarray, num_features: int) -> CSR:
    """Sublinear TF (``1 + ln tf``) rows, L2-normalised, feature ids sorted."""
    num_docs = indptr.size - 1
    doc = np.repeat(np.arange(num_docs, dtype=np.int64), np.diff(indptr))
    keys, tf = np.unique(doc * num_features + words, return_counts=True)
    doc, feature = keys // num_features, keys % num_features
    values = 1.0 + np.log(tf)
    norms = np.sqrt(np.bincount(doc, weights=values**2, minlength=num_docs))
    values = (values / norms[doc]).astype(np.float32)
    out_ptr = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(doc, minlength=num_docs), out=out_ptr[1:])
    return CSR(out_ptr, feature.astype(np.int32), values, num_features)


def _text_lines(labels: CSR, indptr: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Render ``l1,l2<TAB>w12 w7 ...`` lines as bytes."""
    num_docs = len(labels)
    label_count, word_count = labels.row_lengths(), np.diff(indptr)
    row_start, _ = _row_tokens(label_count + word_count)
    total = int(row_start[-1])
    values = np.empty(total, dtype=np.int64)
    sep = np.full(total, ord(" "), dtype=np.uint8)
    prefix = np.zeros(total, dtype=np.uint8)
    _, label_rank = _row_tokens(label_count)
    label_at = np.repeat(row_start[:-1], label_count) + label_rank
    values[label_at] = labels.indices
    sep[label_at] = ord(",")
    sep[row_start[:-1] + label_count - 1] = ord("\t")  # every document has at least one label
    _, word_rank = _row_tokens(word_count)
    word_at = np.repeat(row_start[:-1] + label_count, word_count) + word_rank
    values[word_at], prefix[word_at] = words, ord("w")
    sep[row_start[1:] - 1] = ord("\n")
    assert num_docs == 0 or label_count.min() >= 1
    return _render(values, sep, prefix=prefix)


def synthesize(
    path: str | os.PathLike,
    *,
    num_docs: int,
    num_labels: int,
    num_features: int = 100_000,
    format: Literal["bow", "text"] = "bow",
    seed: int = 0,
    stream: int = 0,
    config: SynthConfig | None = None,
) -> None:
    """Write a synthetic data set, chunk by chunk (memory independent of ``num_labels``).

    Args:
        path: the output file; gzipped when it ends with ``.gz``.
        num_docs: documents to write.
        num_labels: the label space size ``C`` (10^3 to 10^7 and beyond).
        num_features: the vocabulary size (BoW feature dimension; text words are ``w0`` .. ``w<F-1>``).
        format: ``"bow"`` (Extreme Classification Repository) or ``"text"`` (``labels<TAB>text``).
        seed: fixes the planted task (label popularity, clusters, word ownership).
        stream: fixes the documents drawn from the task; use different streams for train and test.
        config: the shape of the task.
    """
    config = config or SynthConfig()
    for name, value in (("num_docs", num_docs), ("num_labels", num_labels), ("num_features", num_features)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"synthesize: {name} must be a positive integer, got {value!r}")
    if format not in ("bow", "text"):
        raise ValueError(f"synthesize: format must be 'bow' or 'text', got {format!r}")
    task = _Task(int(num_labels), int(num_features), config, seed)
    with _open_text_for_write(path) as out:
        if format == "bow":
            out.write(f"{num_docs} {num_features} {num_labels}\n".encode())
        for chunk, first in enumerate(range(0, num_docs, _CHUNK_DOCS)):
            rng = np.random.default_rng([seed, stream, chunk])
            size = min(_CHUNK_DOCS, num_docs - first)
            labels = _draw_labels(task, rng, size)
            indptr, words = _draw_words(task, rng, labels)
            if format == "bow":
                body = _labels_and_features_stream(
                    labels, _bag_of_words(indptr, words, num_features), str(path)
                )
            else:
                body = _text_lines(labels, indptr, words)
            out.write(memoryview(body))


def write_label_names(path: str | os.PathLike, num_labels: int) -> None:
    """Write ``L0`` .. ``L<C-1>``, one a line: the ``labels.txt`` that gives text data its label space."""
    ids = np.arange(num_labels, dtype=np.int64)
    lines = _render(
        ids, np.full(num_labels, ord("\n"), dtype=np.uint8), prefix=np.full(num_labels, ord("L"), np.uint8)
    )
    with _open_text_for_write(path) as out:
        out.write(memoryview(lines))
