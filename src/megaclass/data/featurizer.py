"""Text featuriser: word and character n-gram TF-IDF, hashed or with a vocabulary fitted on training texts.

Vectorised over a whole chunk of texts with NumPy: the texts become one byte array, n-grams are hashed with a
prefix polynomial hash (one subtraction and one multiplication per n-gram), counted with one sort. Chunks run
on ``torch.get_num_threads()`` threads, at most 8 (NumPy's sorts and array arithmetic release the GIL; a chunk
at work holds its n-gram keys, their sort and counts: many times its text), and their results are combined
in order, so the rows do not depend on the thread count. About 1.8M short file paths featurise in about 110 s
on one core (fit and transform).

Analysis (on UTF-8 bytes, ASCII lowercased when ``lowercase``):

- word n-grams: words are maximal runs of ASCII letters, digits and non-ASCII bytes; n-grams of consecutive
  words of one text.
- character n-grams (like scikit-learn's ``char_wb``): each whitespace-separated token is padded with one
  space on each side and cut into byte n-grams inside it; a padded token shorter than the smallest ``n``
  gives itself once.

Each n-gram is identified by a 64-bit hash of its bytes (see :func:`ngram_hash` for the exact function); in
``hashed`` mode its column is the hash modulo ``n_features``, otherwise the fitted vocabulary (sorted hashes)
gives it a column and unseen n-grams are dropped. Values: term count ``tf`` (``1 + ln tf`` when
``sublinear_tf``), times ``idf = ln((1 + N) / (1 + df)) + 1`` when ``idf``, then rows L2-normalised when
``norm``.

>>> featurizer = TextFeaturizer(FeaturizerConfig(word_ngrams=(1, 1), char_ngrams=None, min_df=2))
>>> rows = featurizer.fit(["a b", "b c"]).transform(["b b d"])  # only "b" is in two training texts
>>> rows.num_columns, rows.indices.tolist(), rows.data.tolist()
(1, [0], [1.0])
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from megaclass.data.xmc import CSR
from megaclass.schema import ConfigError, from_dict, to_dict

__all__ = ["FeaturizerConfig", "TextFeaturizer", "featurizer_threads", "ngram_hash"]

_PRIME = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64
_PRIME_INVERSE = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CHAR_SALT, _WORD_SALT = np.uint64(1), np.uint64(2)
_ID_SHIFT = 16  # n-gram ids keep the top 48 bits of the hash
_TEXT_BITS = 15  # texts a chunk, as a power of two: (id << 15 | text) fits in an int64
_CHUNK_BYTES = 1 << 22
_MERGE_ENTRIES = 1 << 22  # fit merges its per-chunk count tables once they hold this many entries
_MAX_THREADS = 8  # each chunk at work holds many times its text in n-gram keys and their sort

_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[ord("A") : ord("Z") + 1] += 32
_IS_WORD = np.zeros(256, dtype=bool)
_IS_WORD[ord("0") : ord("9") + 1] = True
_IS_WORD[ord("a") : ord("z") + 1] = True
_IS_WORD[ord("A") : ord("Z") + 1] = True
_IS_WORD[0x80:] = True
_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[list(b" \t\n\r\x0b\x0c")] = True


@dataclass(frozen=True)
class FeaturizerConfig:
    """How texts become sparse TF-IDF rows (see the module docstring)."""

    word_ngrams: tuple[int, ...] | None = (1, 2)  # (min_n, max_n) word n-grams; None for none
    char_ngrams: tuple[int, ...] | None = (3, 4)  # (min_n, max_n) char_wb byte n-grams; None for none
    lowercase: bool = True  # ASCII lowercasing before analysis
    n_features: int | None = None  # hashed columns (no vocabulary, no unseen n-grams); None fits a vocabulary
    min_df: int = 2  # vocabulary: keep n-grams seen in at least this many training texts
    max_features: int | None = (
        1_000_000  # vocabulary: keep at most this many, the most frequent in the corpus
    )
    sublinear_tf: bool = True  # 1 + ln(tf) instead of tf
    idf: bool = True  # weight by smoothed inverse document frequency
    norm: bool = True  # L2-normalise each row

    def __post_init__(self) -> None:
        for name in ("word_ngrams", "char_ngrams"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or not 1 <= value[0] <= value[1]):
                raise ConfigError(
                    f"featurizer.{name}: expected (min_n, max_n) with 1 <= min_n <= max_n, got {value}"
                )
        if self.word_ngrams is None and self.char_ngrams is None:
            raise ConfigError("featurizer: word_ngrams and char_ngrams are both None; nothing to extract")
        if self.n_features is not None and not 1 <= self.n_features < 1 << 40:
            raise ConfigError(
                f"featurizer.n_features: expected a positive count below 2^40, got {self.n_features}"
            )
        if self.min_df < 1:
            raise ConfigError(f"featurizer.min_df: expected >= 1, got {self.min_df}")
        if self.max_features is not None and self.max_features < 1:
            raise ConfigError(f"featurizer.max_features: expected >= 1 or None, got {self.max_features}")


def _fmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (a bijection of uint64)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def ngram_hash(kind: str, parts: Sequence[bytes]) -> int:
    """The 64-bit id of one n-gram, in plain Python (the specification the vectorised code follows).

    ``content(b) = sum_i b[i] * P^i mod 2^64`` (``P = 0x100000001B3``); ``leaf(b, salt) = fmix(content(b) +
    len(b) * G + salt)`` (``G`` the golden ratio constant, ``fmix`` SplitMix64's finaliser); a character
    n-gram is ``leaf(bytes, 1)``; a word n-gram folds its words' ``leaf(word, 2)``: ``g = leaf(w1)``, then ``g
    = fmix(g * P + leaf(w_k))``. The id is the top 48 bits of that (room for a 15-bit text index beside it).

    Args:
        kind: ``"char"`` (``parts`` holds the one n-gram) or ``"word"`` (``parts`` holds the words).
        parts: the bytes.
    """
    mask = (1 << 64) - 1

    def fmix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def leaf(data: bytes, salt: int) -> int:
        content = sum(byte * pow(int(_PRIME), i, 1 << 64) for i, byte in enumerate(data)) & mask
        return fmix((content + len(data) * int(_GOLDEN) + salt) & mask)

    if kind == "char":
        return leaf(parts[0], int(_CHAR_SALT)) >> _ID_SHIFT
    value = leaf(parts[0], int(_WORD_SALT))
    for word in parts[1:]:
        value = fmix((value * int(_PRIME) + leaf(word, int(_WORD_SALT))) & mask)
    return value >> _ID_SHIFT


class _Chunk:
    """The bytes of a chunk of texts, their prefix hashes and the text each byte belongs to."""

    def __init__(self, texts: Sequence[str], lowercase: bool) -> None:
        joined = "\n".join(texts)
        if joined.count("\n") != len(texts) - 1:  # a newline inside a text is whitespace: keep texts apart
            joined = "\n".join(text.replace("\n", " ") for text in texts)
        data = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
        self.bytes = _LOWER[data] if lowercase else data
        self.text_starts = np.concatenate([[0], np.flatnonzero(self.bytes == ord("\n")) + 1]).astype(np.int64)
        self.num_texts = len(texts)

    def text_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.text_starts, positions, side="right") - 1


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of the runs of True in ``mask``."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2].astype(np.int64), edges[1::2].astype(np.int64)


_POWER_CACHE: list[np.ndarray] = []
_POWER_LOCK = threading.Lock()


def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``P^p`` and ``P^-p`` (mod 2^64) for ``p < size``, computed once and grown on demand (by one thread at
    a time)."""
    with _POWER_LOCK:
        if not _POWER_CACHE or _POWER_CACHE[0].size < size:
            grown = max(size, 2 * _POWER_CACHE[0].size if _POWER_CACHE else 1 << 16)
            with np.errstate(over="ignore"):
                powers = np.cumprod(np.full(grown, _PRIME, dtype=np.uint64))
                inverse = np.cumprod(np.full(grown, _PRIME_INVERSE, dtype=np.uint64))
            one = np.ones(1, dtype=np.uint64)
            _POWER_CACHE[:] = [np.concatenate([one, powers[:-1]]), np.concatenate([one, inverse[:-1]])]
        powers, inverse = _POWER_CACHE
    return powers[:size], inverse[:size]


def _substring_hashes(
    data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, salt: np.uint64
) -> np.ndarray:
    """``leaf`` hashes of ``data[starts : starts + lengths]``, from prefix sums of ``data[p] * P^p``."""
    powers, inverse = _powers(data.size + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(data.size + 1, dtype=np.uint64)
        np.cumsum(data.astype(np.uint64) * powers[:-1], out=prefix[1:])
        content = (prefix[starts + lengths] - prefix[starts]) * inverse[starts]
        return _fmix(content + lengths.astype(np.uint64) * _GOLDEN + salt)


def _char_ngrams(chunk: _Chunk, ngram_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, text ids)`` of the char_wb n-grams of a chunk."""
    token_start, token_end = _runs(~_IS_SPACE[chunk.bytes])
    padded_length = token_end - token_start + 2  # (T,) " token "
    padded_start = np.zeros(token_start.size + 1, dtype=np.int64)
    np.cumsum(padded_length, out=padded_start[1:])
    padded = np.full(int(padded_start[-1]), ord(" "), dtype=np.uint8)
    token_bytes = np.flatnonzero(~_IS_SPACE[chunk.bytes])
    owner = np.repeat(np.arange(token_start.size), token_end - token_start)
    padded[token_bytes + (padded_start[:-1] - token_start + 1)[owner]] = chunk.bytes[token_bytes]
    token_text = chunk.text_of(token_start)
    starts, lengths, texts = [], [], []
    for n in range(ngram_range[0], ngram_range[1] + 1):
        # A padded token shorter than the smallest n gives itself once (scikit-learn's char_wb).
        count = np.where(padded_length >= n, padded_length - n + 1, int(n == ngram_range[0]))
        first = np.repeat(padded_start[:-1], count)
        rank = np.arange(first.size, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        starts.append(first + rank)
        lengths.append(np.repeat(np.minimum(padded_length, n), count))
        texts.append(np.repeat(token_text, count))
    keys = _substring_hashes(padded, np.concatenate(starts), np.concatenate(lengths), _CHAR_SALT)
    return (keys >> np.uint64(_ID_SHIFT)).astype(np.int64), np.concatenate(texts)


def _word_ngrams(chunk: _Chunk, ngram_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, text ids)`` of the word n-grams of a chunk."""
    word_start, word_end = _runs(_IS_WORD[chunk.bytes])
    leaves = _substring_hashes(chunk.bytes, word_start, word_end - word_start, _WORD_SALT)  # (W,)
    word_text = chunk.text_of(word_start)
    keys, texts = [], []
    folded = leaves
    for n in range(1, ngram_range[1] + 1):
        if n > 1:
            with np.errstate(over="ignore"):
                folded = _fmix(folded[:-1] * _PRIME + leaves[n - 1 :])  # (W - n + 1,)
        if n >= ngram_range[0]:
            same_text = word_text[: folded.size] == word_text[n - 1 :]
            keys.append((folded[same_text] >> np.uint64(_ID_SHIFT)).astype(np.int64))
            texts.append(word_text[: folded.size][same_text])
        if folded.size <= 1:
            break
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(texts)


class TextFeaturizer:
    """Word and character n-gram TF-IDF rows of texts: ``fit(train_texts)``, then ``transform(texts) -> CSR``.

    Args:
        config: the analysis and weighting (see :class:`FeaturizerConfig`).

    >>> featurizer = TextFeaturizer(FeaturizerConfig(n_features=1 << 18, idf=False))
    >>> featurizer.fit(["usr/share/doc"]).transform(["usr/bin/ls"]).num_columns
    262144
    """

    def __init__(self, config: FeaturizerConfig | None = None) -> None:
        self.config = config or FeaturizerConfig()
        self.vocabulary: np.ndarray | None = None  # (F,) sorted int64 n-gram ids (vocabulary mode)
        self.idf_weights: np.ndarray | None = None  # (F,) float32
        self.num_documents = 0

    @property
    def num_features(self) -> int:
        """The number of output columns ``F`` (known after :meth:`fit` in vocabulary mode)."""
        if self.config.n_features is not None:
            return self.config.n_features
        self._require_fit()
        return int(self.vocabulary.size)

    @property
    def fitted(self) -> bool:
        return self.num_documents > 0

    def _require_fit(self) -> None:
        if not self.fitted:
            raise RuntimeError("TextFeaturizer: call fit(train_texts) before transform")

    def _keys(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(n-gram ids, text ids)`` of every n-gram occurrence of a chunk of texts."""
        chunk = _Chunk(texts, self.config.lowercase)
        keys, owners = [], []
        if self.config.word_ngrams is not None:
            word_keys, word_texts = _word_ngrams(chunk, self.config.word_ngrams)
            keys.append(word_keys)
            owners.append(word_texts)
        if self.config.char_ngrams is not None:
            char_keys, char_texts = _char_ngrams(chunk, self.config.char_ngrams)
            keys.append(char_keys)
            owners.append(char_texts)
        return np.concatenate(keys), np.concatenate(owners)

    def fit(self, texts: Sequence[str]) -> TextFeaturizer:
        """Learn the vocabulary (unless hashed) and document frequencies from training texts; returns self."""
        if len(texts) == 0:
            raise ValueError("TextFeaturizer.fit: no texts")
        hashed = self.config.n_features is not None
        keys, df, tf = self.document_frequencies(texts)
        self.num_documents = len(texts)
        if hashed:
            full_df = np.zeros(self.config.n_features, dtype=np.int64)
            full_df[keys] = df
            self.vocabulary, df = None, full_df
        else:
            keep = np.flatnonzero(df >= self.config.min_df)
            if self.config.max_features is not None and keep.size > self.config.max_features:
                order = np.lexsort((keys[keep], -tf[keep]))  # most frequent first, ties by smaller id
                keep = np.sort(keep[order[: self.config.max_features]])
            self.vocabulary, df = keys[keep], df[keep]
        self.idf_weights = (np.log((1.0 + self.num_documents) / (1.0 + df)) + 1.0).astype(np.float32)
        return self

    def document_frequencies(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(keys, df, tf)`` of ``texts``, what :meth:`fit` learns from: the sorted distinct n-gram ids
        (hashed columns when hashed), the texts holding each and its occurrences. Needs no fit.

        >>> keys, df, tf = TextFeaturizer(FeaturizerConfig(char_ngrams=None)).document_frequencies(["a b a"])
        >>> sorted(zip(df.tolist(), tf.tolist()))  # "a", "b", "a b", "b a"
        [(1, 1), (1, 1), (1, 1), (1, 2)]
        """
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for counts in _in_order(lambda chunk: self._chunk_counts(texts[chunk[0] : chunk[1]]), _chunks(texts)):
            pieces.append(counts)
            if len(pieces) > 1 and sum(piece[0].size for piece in pieces[1:]) > max(
                pieces[0][0].size, _MERGE_ENTRIES
            ):
                pieces = [_merge_counts(pieces)]  # keeps memory near the number of distinct n-grams
        if not pieces:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return _merge_counts(pieces)

    def _chunk_counts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(sorted unique n-gram ids or hashed columns, df, tf)`` of a chunk of training texts."""
        keys, owners = self._keys(texts)
        if self.config.n_features is not None:
            keys = keys % self.config.n_features
        pairs, tf = np.unique(keys << _TEXT_BITS | owners, return_counts=True)  # sorted by n-gram, then text
        pair_keys = pairs >> _TEXT_BITS
        starts = (
            np.flatnonzero(np.concatenate([[True], pair_keys[1:] != pair_keys[:-1]])) if pairs.size else pairs
        )
        df = np.diff(np.append(starts, pairs.size))
        return pair_keys[starts], df, np.add.reduceat(tf, starts) if starts.size else tf

    def transform(self, texts: Sequence[str]) -> CSR:
        """``(N, F)`` TF-IDF rows of ``texts`` (float32 values, sorted column ids)."""
        self._require_fit()
        parts = list(
            _in_order(lambda chunk: self._transform_chunk(texts[chunk[0] : chunk[1]]), _chunks(texts))
        )
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        if parts:
            np.cumsum(np.concatenate([part.row_lengths() for part in parts]), out=indptr[1:])
        indices = np.concatenate([part.indices for part in parts]) if parts else np.zeros(0, np.int32)
        data = np.concatenate([part.data for part in parts]) if parts else np.zeros(0, np.float32)
        return CSR(indptr, indices, data, self.num_features)

    def fit_transform(self, texts: Sequence[str]) -> CSR:
        return self.fit(texts).transform(texts)

    def _counts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, columns, tf)`` of the known n-grams of a chunk of texts, sorted by row then column."""
        keys, owners = self._keys(texts)
        if self.config.n_features is not None:
            width = self.config.n_features
            pairs, tf = np.unique(owners * width + keys % width, return_counts=True)
            return pairs // width, pairs % width, tf
        # Count (n-gram, text) pairs with one sort; the sorted ids then find their columns in one pass.
        pairs, tf = np.unique(keys << _TEXT_BITS | owners, return_counts=True)
        pair_keys, rows = pairs >> _TEXT_BITS, pairs & ((1 << _TEXT_BITS) - 1)
        columns = np.minimum(np.searchsorted(self.vocabulary, pair_keys), max(self.vocabulary.size - 1, 0))
        known = (
            self.vocabulary[columns] == pair_keys
            if self.vocabulary.size
            else np.zeros(pairs.size, dtype=bool)
        )
        rows, columns, tf = rows[known], columns[known], tf[known]
        # Columns follow the ids' order, so pairs are sorted by column: a stable (radix) sort by row finishes.
        order = np.argsort(rows.astype(np.int16), kind="stable")
        return rows[order], columns[order], tf[order]

    def _transform_chunk(self, texts: Sequence[str]) -> CSR:
        rows, columns, tf = self._counts(texts)
        values = 1.0 + np.log(tf) if self.config.sublinear_tf else tf.astype(np.float64)
        if self.config.idf:
            values = values * self.idf_weights[columns]
        if self.config.norm:
            norms = np.sqrt(np.bincount(rows, weights=values * values, minlength=len(texts)))
            values = values / norms[rows]
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=len(texts)), out=indptr[1:])
        return CSR(indptr, columns.astype(np.int32), values.astype(np.float32), self.num_features)

    def state_dict(self) -> dict[str, Any]:
        """Plain state for checkpoints: ``config`` (JSON-able), ``vocabulary`` (int64 n-gram ids), ``idf``
        (float32) and ``num_documents``."""
        self._require_fit()
        vocabulary = np.zeros(0, np.int64) if self.vocabulary is None else self.vocabulary
        return {
            "config": to_dict(self.config),
            "vocabulary": vocabulary,
            "idf": self.idf_weights,
            "num_documents": self.num_documents,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TextFeaturizer:
        """Rebuild a fitted featuriser from :meth:`state_dict` (arrays may be tensors)."""
        config = from_dict(FeaturizerConfig, state["config"], where="featurizer")
        featurizer = cls(config)
        vocabulary = np.asarray(_numpy(state["vocabulary"]), dtype=np.int64)
        featurizer.vocabulary = None if config.n_features is not None else vocabulary
        featurizer.idf_weights = np.asarray(_numpy(state["idf"]), dtype=np.float32)
        featurizer.num_documents = int(state["num_documents"])
        return featurizer


def _chunks(texts: Sequence[str]) -> list[tuple[int, int]]:
    """Split texts into ``[first, last)`` ranges of at most 2^15 texts and about 4 MiB of characters."""
    lengths = np.fromiter((len(text) + 1 for text in texts), dtype=np.int64, count=len(texts))
    bounds, first = [], 0
    ends = np.cumsum(lengths)
    while first < len(texts):
        base = ends[first - 1] if first else 0
        last = int(np.searchsorted(ends, base + _CHUNK_BYTES, side="right"))
        last = min(max(last, first + 1), first + (1 << _TEXT_BITS), len(texts))
        bounds.append((first, last))
        first = last
    return bounds


def featurizer_threads() -> int:
    """Threads :class:`TextFeaturizer` runs its chunks on: ``torch.get_num_threads()``, at most
    :data:`_MAX_THREADS`."""
    return max(1, min(torch.get_num_threads(), _MAX_THREADS))


_Result = TypeVar("_Result")


def _in_order(
    function: Callable[[tuple[int, int]], _Result], chunks: list[tuple[int, int]]
) -> Iterator[_Result]:
    """``function(chunk)`` for each chunk, on :func:`featurizer_threads` threads, yielded in the chunks'
    order; at most two chunks a thread are in flight, so memory stays a few chunks' worth a thread."""
    threads = min(featurizer_threads(), len(chunks))
    if threads == 1:
        yield from map(function, chunks)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featurizer") as pool:
        pending: deque = deque()
        for chunk in chunks:
            if len(pending) == 2 * threads:
                yield pending.popleft().result()
            pending.append(pool.submit(function, chunk))
        while pending:
            yield pending.popleft().result()


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _merge_counts(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Sum per-chunk ``(sorted unique keys, df, tf)`` tables into one."""
    keys = np.concatenate([piece[0] for piece in pieces])
    df = np.concatenate([piece[1] for piece in pieces])
    tf = np.concatenate([piece[2] for piece in pieces])
    order = np.argsort(keys, kind="stable")
    keys, df, tf = keys[order], df[order], tf[order]
    starts = (
        np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        if keys.size
        else np.zeros(0, np.int64)
    )
    if not starts.size:
        return keys, df, tf
    return keys[starts], np.add.reduceat(df, starts), np.add.reduceat(tf, starts)
