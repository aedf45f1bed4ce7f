"""Extreme classification data: the Extreme Classification Repository BoW format and the text format.

BoW: a header ``num_docs num_features num_labels``, then one document a line, ``l1,l2,... f:v f:v ...``
(0-based ids; a line may have no labels or no features). Text: ``l1,l2,...<TAB>text`` one document a line.
Files may be gzipped (``.gz``). Readers parse the whole decompressed file with vectorised NumPy (no Python
loop over tokens), report bad input as :class:`~megaclass.errors.DataFormatError` with the 1-based line (ids
too large for int32, non-finite values, header counts out of range: all before any large allocation), drop
a label repeated on one line (it would count twice in label counts and metric denominators) with one
warning per file naming the first such line, and
cache the parsed arrays beside the source (``<file>.megaclass.npz``, keyed by the source's size and mtime),
or under ``$MEGACLASS_CACHE`` (default ``~/.cache/megaclass``) when the source's directory is not writable.

>>> data = load_xmc("data/deb-tags/train_bow.txt.gz")  # doctest: +SKIP
>>> len(data.labels), data.num_features, data.num_labels  # doctest: +SKIP
(23828, 7472, 595)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaclass.data.cache import cache_dir, read_cache, write_cache
from megaclass.errors import DataFormatError, LabelOutOfRange

__all__ = [
    "CSR",
    "MAX_ID",
    "TEXT_LABEL_IDS",
    "XMCData",
    "label_features",
    "label_field_holds_names",
    "load_xmc",
    "parse_bow_header",
    "read_bow",
    "read_label_file",
    "read_label_names",
    "read_rows",
    "read_text",
    "write_bow",
    "write_text",
]

_CACHE_VERSION = 3  # 3: feature values past float32's range are refused (caches of 2 may hold inf)
_RUN_ROWS = 64  # CSR.take copies slices where its rows come in runs of consecutive rows this long on average
_NEWLINE, _SPACE, _TAB, _COMMA, _COLON, _CR = (ord(c) for c in "\n \t,:\r")
# Byte classes of the BoW tokenizer: 0 = part of a token, then the separators.
_TOKEN, _WHITE, _LINE, _COMMA_CLASS, _COLON_CLASS = 0, 1, 2, 3, 4
_BYTE_CLASS = np.zeros(256, dtype=np.uint8)
_BYTE_CLASS[[_SPACE, _TAB, _CR]] = _WHITE
_BYTE_CLASS[_NEWLINE] = _LINE
_BYTE_CLASS[_COMMA] = _COMMA_CLASS
_BYTE_CLASS[_COLON] = _COLON_CLASS
_IS_DIGIT = np.zeros(256, dtype=bool)
_IS_DIGIT[ord("0") : ord("9") + 1] = True
_IS_FLOAT_CHAR = _IS_DIGIT.copy()
_IS_FLOAT_CHAR[[ord(c) for c in ".eE+-"]] = True


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields explicitly
class CSR:
    """Rows of a sparse matrix in CSR form (NumPy); a label matrix has ``data=None``.

    Args:
        indptr: ``(N + 1,)`` int64 row offsets.
        indices: ``(nnz,)`` int32 column (feature or label) ids.
        data: ``(nnz,)`` float32 values, or None for a 0/1 label matrix.
        num_columns: the number of columns (features or labels).

    >>> m = CSR(np.array([0, 2, 2, 3]), np.array([4, 1, 0], dtype=np.int32), None, num_columns=5)
    >>> len(m), m.row_lengths().tolist(), m.take(np.array([2, 0])).indices.tolist()
    (3, [2, 0, 1], [0, 4, 1])
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray | None
    num_columns: int

    def __len__(self) -> int:
        return int(self.indptr.shape[0]) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def row_lengths(self) -> np.ndarray:
        """``(N,)`` int64 number of stored entries of each row."""
        return np.diff(self.indptr)

    def row_ids(self) -> np.ndarray:
        """``(nnz,)`` int64 the row each stored entry belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.row_lengths())

    def column_counts(self) -> np.ndarray:
        """``(num_columns,)`` int64 number of rows holding each column (label frequencies)."""
        return np.bincount(self.indices, minlength=self.num_columns).astype(np.int64)

    def take(self, rows: np.ndarray) -> CSR:
        """The rows ``rows`` (any order, repeats allowed), gathered without a Python loop over rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        indptr = np.zeros(rows.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # where a run of consecutive rows ends
        if breaks.size < rows.size // _RUN_ROWS:  # long runs (a split's kept rows): copy a slice each
            begin = self.indptr[rows[np.concatenate([[0], breaks])]]
            end = self.indptr[rows[np.concatenate([breaks - 1, [rows.size - 1]])] + 1]
            slices = [slice(a, b) for a, b in zip(begin.tolist(), end.tolist(), strict=True)]
            indices = np.concatenate([self.indices[part] for part in slices])
            data = None if self.data is None else np.concatenate([self.data[part] for part in slices])
            return CSR(indptr, indices, data, self.num_columns)
        # Source position of every gathered entry: its row's start plus its rank inside the row.
        gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
        data = None if self.data is None else self.data[gather]
        return CSR(indptr, self.indices[gather], data, self.num_columns)

    def to_lists(self) -> list[list[int]]:
        """The column ids of each row as Python lists (for small matrices and tests)."""
        bounds = self.indptr.tolist()
        flat = self.indices.tolist()
        return [flat[bounds[i] : bounds[i + 1]] for i in range(len(self))]


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields explicitly
class XMCData:
    """A parsed data file: labels, and TF-IDF features (BoW format) or raw texts (text format).

    Args:
        path: the file it was read from.
        labels: ``(N, num_labels)`` label matrix, ``data=None``.
        features: ``(N, num_features)`` feature values (BoW format), else None.
        texts: one string a document (text format), else None.
        label_names: the name of each label id, where the file's lines name their labels (text format).
    """

    path: str
    labels: CSR
    features: CSR | None
    texts: list[str] | None
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_labels(self) -> int:
        return self.labels.num_columns

    @property
    def num_features(self) -> int:
        """The feature dimension of BoW data; 0 for text data."""
        return 0 if self.features is None else self.features.num_columns

    @property
    def multilabel(self) -> bool:
        """False iff every document has exactly one label (multi-class data)."""
        return not bool(np.all(self.labels.row_lengths() == 1))

    @property
    def format(self) -> str:
        return "text" if self.texts is not None else "bow"


# ---------------------------------------------------------------------------------------------- file access


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataFormatError(path, f"corrupt gzip data ({error})") from None
    return raw


def _open_text_for_write(path: str | os.PathLike):
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, "wb", compresslevel=6)
    return open(path, "wb")


def _first_line(path: str) -> bytes:
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as handle:
            return handle.readline(1 << 20)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataFormatError(path, f"corrupt gzip data ({error})") from None


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


# ---------------------------------------------------------------------------------------------- cache


def _cache_candidates(path: str) -> list[Path]:
    source = Path(path).resolve()
    digest = hashlib.sha1(str(source).encode()).hexdigest()[:16]
    return [
        source.with_name(source.name + ".megaclass.npz"),
        cache_dir() / f"{digest}-{source.name}.megaclass.npz",
    ]


def _source_key(path: str, kind: str) -> np.ndarray:
    stat = os.stat(path)
    return np.array([_CACHE_VERSION, stat.st_size, stat.st_mtime_ns, kind == "text"], dtype=np.int64)


def _cached_arrays(
    path: str, kind: str, parse: Callable[[str, bytes], dict[str, np.ndarray]], cache: bool
) -> dict[str, np.ndarray]:
    """``parse(path, bytes)``, or its arrays from the cache when it is current (then written back)."""
    if not cache:
        return parse(path, _read_bytes(path))
    key = _source_key(path, kind)
    arrays = read_cache(_cache_candidates(path), "key", key)
    if arrays is None:
        arrays = parse(path, _read_bytes(path))
        write_cache(_cache_candidates(path), {"key": key, **arrays})
    return arrays


# ------------------------------------------------------------------------------------------- parsing helpers


def _line_starts(buf: np.ndarray) -> np.ndarray:
    """``(lines + 1,)`` start offsets of each line, plus the end; a final newline opens no extra line."""
    if buf.size == 0:
        return np.zeros(1, dtype=np.int64)
    newlines = np.flatnonzero(buf == _NEWLINE)
    ends = newlines if buf[-1] == _NEWLINE else np.append(newlines, buf.size)
    return np.concatenate([[0], ends + 1]).astype(np.int64)


def _line_of(positions: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """0-based line index of each byte offset."""
    return np.searchsorted(starts, positions, side="right") - 1


def _parse_numbers(text: np.ndarray, token_start: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Parse the space-separated numbers of ``text`` (a byte array) starting at ``token_start``.

    Returns the values and None, or the index of the first token that is not a number.
    """
    if token_start.size == 0:  # NumPy refuses a text of separators only
        return np.zeros(0, dtype=np.float64), None
    values = _fromstring(text)
    if values is not None and values.size == token_start.size:
        return values, None
    # Find the bad token: parse blocks of tokens until one fails, then the tokens of that block one by one.
    block = 4096
    bounds = np.append(token_start, text.size)
    for first in range(0, token_start.size, block):
        last = min(first + block, token_start.size)
        part = _fromstring(text[bounds[first] : bounds[last]])
        if part is None or part.size != last - first:
            for token in range(first, last):
                one = _fromstring(text[bounds[token] : bounds[token + 1]])
                if one is None or one.size != 1:
                    return values, token
    raise AssertionError("a block failed to parse but none of its tokens did")


def _fromstring(text: np.ndarray) -> np.ndarray | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.fromstring(text.tobytes(), dtype=np.float64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None


def _tokens(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of the maximal runs of token bytes."""
    is_token = np.concatenate([[False], classes == _TOKEN, [False]])
    edges = np.flatnonzero(is_token[1:] != is_token[:-1])
    return edges[0::2].astype(np.int64), edges[1::2].astype(np.int64)


def _fail_at(path: str, offset: int, line_base: int, starts: np.ndarray, problem: str) -> DataFormatError:
    line = int(_line_of(np.array([offset]), starts)[0])
    return DataFormatError(path, problem, line=line + line_base)


def _token_text(buf: np.ndarray, start: int, end: int) -> str:
    return buf[start:end].tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------- BoW reader


_MAX_DOCS = 1 << 40  # far more documents than any file holds; a larger count is a corrupt header
MAX_ID = (1 << 31) - 1  # feature and label ids are stored as int32
# what a text line's label field holds, as errors word it
TEXT_LABEL_IDS = (
    "label ids 'l1,l2,...' before the tab, as on the file's first labelled line (a file whose first labels "
    "are names holds names: 'python,devel<TAB>text')"
)


def parse_bow_header(path: str, raw: bytes) -> tuple[tuple[int, int, int], int]:
    """A BoW file's header (``raw``: its first bytes): its three counts, each checked to be an integer in its
    range before anything is allocated, and the offset of the line after it."""
    end = raw.find(b"\n")
    end = len(raw) if end < 0 else end
    fields = raw[:end].split()
    seen = raw[:end][:80].decode("utf-8", errors="replace").strip()
    if len(fields) != 3:
        raise DataFormatError(
            path, f"expected a header 'num_docs num_features num_labels', got {seen!r}", line=1
        )
    counts = []
    ranges = (("num_docs", 0, _MAX_DOCS), ("num_features", 1, MAX_ID), ("num_labels", 1, MAX_ID))
    for (name, low, high), field in zip(ranges, fields, strict=True):
        text = field.decode("utf-8", errors="replace")[:40]
        if not field.isdigit():
            problem = f"header {name} {text!r} is not a non-negative integer (header {seen!r})"
            raise DataFormatError(path, problem, line=1)
        if not low <= int(field) <= high:
            problem = f"header {name} {text} out of range: expected an integer in [{low}, {high}]"
            raise DataFormatError(path, problem, line=1)
        counts.append(int(field))
    num_docs, num_features, num_labels = counts
    return (num_docs, num_features, num_labels), min(end + 1, len(raw))


def _bow_roles(path: str, buf: np.ndarray, classes: np.ndarray, starts: np.ndarray, line_base: int):
    """Tokenise a BoW body; returns token starts/ends and their role masks (label, feature id, value)."""
    token_start, token_end = _tokens(classes)
    padded = np.concatenate([np.array([_LINE], np.uint8), classes, np.array([_LINE], np.uint8)])  # uint8
    before = padded[token_start]  # class of the byte before each token (line start counts as a newline)
    after = padded[token_end + 1]
    is_label = ((before == _LINE) | (before == _COMMA_CLASS)) & (after != _COLON_CLASS)
    is_id = ((before == _LINE) | (before == _WHITE)) & (after == _COLON_CLASS)
    is_value = (before == _COLON_CLASS) & ((after == _WHITE) | (after == _LINE))
    bad = ~(is_label | is_id | is_value)
    # A comma or colon must sit between two tokens: "1,,2", "3: 0.5", "3:" are malformed.
    punct = np.flatnonzero((classes == _COMMA_CLASS) | (classes == _COLON_CLASS))
    loose = punct[(padded[punct] != _TOKEN) | (padded[punct + 2] != _TOKEN)]
    if bad.any() or loose.size:
        first_token = token_start[np.argmax(bad)] if bad.any() else buf.size
        offset = int(min(first_token, loose[0] if loose.size else buf.size))
        line = int(_line_of(np.array([offset]), starts)[0])
        line_end = starts[line + 1] if line + 1 < starts.size else buf.size
        seen = _token_text(buf, int(starts[line]), int(line_end)).strip()[:80]
        problem = (
            f"malformed line {seen!r}: expected 'l1,l2,... f:v f:v ...' (labels first, then id:value pairs)"
        )
        raise DataFormatError(path, problem, line=line + line_base)
    return token_start, token_end, is_label, is_id, is_value


def _check_token_chars(
    path: str, buf: np.ndarray, tokens: tuple[np.ndarray, np.ndarray], is_value, starts, line_base: int
) -> None:
    """Ids must be digits only, values decimal numbers; name the first offending token."""
    token_start, token_end = tokens
    odd = np.flatnonzero((_BYTE_CLASS[buf] == _TOKEN) & ~_IS_DIGIT[buf])
    if odd.size == 0:
        return
    owner = np.searchsorted(token_start, odd, side="right") - 1
    wrong = ~is_value[owner] | ~_IS_FLOAT_CHAR[buf[odd]]
    if wrong.any():
        token = owner[np.argmax(wrong)]
        start, end = int(token_start[token]), int(token_end[token])
        kind = "a value" if is_value[token] else "an id (a non-negative integer)"
        problem = f"expected {kind}, got {_token_text(buf, start, end)!r}"
        raise _fail_at(path, start, line_base, starts, problem)


def _parse_bow(path: str, raw: bytes) -> dict[str, np.ndarray]:
    """Parse a whole BoW file into CSR arrays, validating its structure (not the id ranges)."""
    if not raw.strip():
        raise DataFormatError(path, "empty file: expected a header 'num_docs num_features num_labels'")
    (num_docs, num_features, num_labels), body_start = parse_bow_header(path, raw)
    buf = np.frombuffer(raw, dtype=np.uint8)[body_start:]
    starts = _line_starts(buf)
    num_lines = starts.size - 1
    if num_lines != num_docs:
        line = num_docs + 2 if num_lines > num_docs else num_lines + 1
        problem = f"header says {num_docs} documents, the file has {num_lines} lines after it"
        raise DataFormatError(path, problem, line=line)
    arrays = _parse_bow_body(path, buf, starts, 2)
    arrays["header"] = np.array([num_docs, num_features, num_labels], dtype=np.int64)
    return arrays


def _parse_bow_body(path: str, buf: np.ndarray, starts: np.ndarray, line_base: int) -> dict[str, np.ndarray]:
    """CSR arrays of BoW lines ``buf`` (line ``i`` is line ``i + line_base`` of the file, for messages)."""
    num_lines = starts.size - 1
    classes = _BYTE_CLASS[buf]
    token_start, token_end, is_label, is_id, is_value = _bow_roles(path, buf, classes, starts, line_base)
    _check_token_chars(path, buf, (token_start, token_end), is_value, starts, line_base)
    text = np.where(classes == _TOKEN, buf, np.uint8(_SPACE))
    numbers, failed = _parse_numbers(text, token_start)
    if failed is not None:
        bad, end = int(token_start[failed]), int(token_end[failed])
        problem = f"cannot parse number {_token_text(buf, bad, end)!r}"
        raise _fail_at(path, bad, line_base, starts, problem)
    _check_id_size(path, buf, numbers, (token_start, token_end), is_label, is_id, starts, line_base)
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf here, refused below
        values = numbers[is_value].astype(np.float32)
    infinite = ~np.isfinite(values)  # "1e400" parses as inf, "1e40" overflows float32
    if infinite.any():
        token = int(np.flatnonzero(is_value)[np.argmax(infinite)])
        bad, end = int(token_start[token]), int(token_end[token])
        problem = (
            f"feature value {_token_text(buf, bad, end)!r} is not finite as float32: expected a number of "
            f"magnitude at most {float(np.finfo(np.float32).max):.4g}"
        )
        raise _fail_at(path, bad, line_base, starts, problem)
    token_line = _line_of(token_start, starts)
    label_rows = np.bincount(token_line[is_label], minlength=num_lines)
    feature_rows = np.bincount(token_line[is_id], minlength=num_lines)
    return {
        "label_indptr": np.concatenate([[0], np.cumsum(label_rows)]).astype(np.int64),
        "label_indices": numbers[is_label].astype(np.int64),
        "feature_indptr": np.concatenate([[0], np.cumsum(feature_rows)]).astype(np.int64),
        "feature_indices": numbers[is_id].astype(np.int64),
        "feature_values": values,
    }


def _check_id_size(path, buf, numbers, tokens, is_label, is_id, starts, line_base: int) -> None:
    """Ids must fit the int32 id arrays; a larger one (even past 2^63) is an error, never a wrapped id."""
    token_start, token_end = tokens
    too_large = (is_label | is_id) & (numbers > MAX_ID)
    if too_large.any():
        token = int(np.argmax(too_large))
        start, end = int(token_start[token]), int(token_end[token])
        kind = "label" if is_label[token] else "feature"
        problem = f"{kind} id {_token_text(buf, start, end)} too large: expected at most {MAX_ID}"
        raise _fail_at(path, start, line_base, starts, problem)


def _dedupe_rows(path: str, indptr: np.ndarray, indices: np.ndarray, line_base: int):
    """Drop repeats of an id within a row (the first stays), warning once for the file with the first line.

    Returns ``(indptr, indices)``, the inputs themselves when nothing repeats.
    """
    if indices.size < 2:
        return indptr, indices
    rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
    order = np.lexsort((np.arange(indices.size), indices, rows))  # by row, id, then position
    repeat = (rows[order][1:] == rows[order][:-1]) & (indices[order][1:] == indices[order][:-1])
    if not repeat.any():
        return indptr, indices
    keep = np.ones(indices.size, dtype=bool)
    keep[order[1:][repeat]] = False
    first = int(np.flatnonzero(~keep)[0])
    count = int(np.unique(rows[~keep]).size)
    warnings.warn(
        f"{path}:{int(rows[first]) + line_base}: label {int(indices[first])} repeated on the line; "
        f"repeated labels are dropped ({count} line(s) of this file have repeats)",
        stacklevel=3,
    )
    lengths = np.bincount(rows[keep], minlength=indptr.size - 1)
    new_indptr = np.zeros(indptr.size, dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    return new_indptr, indices[keep]


def _check_range(
    path: str, what: str, ids: np.ndarray, indptr: np.ndarray, bound: int, line_base: int
) -> None:
    if ids.size == 0:
        return
    over = ids >= bound
    if not over.any():
        return
    position = int(np.argmax(over))
    line = int(np.searchsorted(indptr, position, side="right")) - 1 + line_base
    if what == "label":
        raise LabelOutOfRange(path, int(ids[position]), bound, line=line)
    raise DataFormatError(path, f"{what} id {int(ids[position])} out of range [0, {bound})", line=line)


def read_bow(path: str | os.PathLike, *, num_labels: int | None = None, cache: bool = True) -> XMCData:
    """Read an Extreme Classification Repository BoW file (plain or ``.gz``).

    Args:
        path: the file: a header ``num_docs num_features num_labels``, then ``l1,l2,... f:v f:v ...`` lines.
        num_labels: the label space size, overriding the header's (for example to share one across splits).
        cache: read and write the parsed arrays cache (see the module docstring).

    Returns:
        :class:`XMCData` with ``labels`` and ``features``; ``texts`` is None.

    Raises:
        DataFormatError: naming the file, the 1-based line and the problem.
    """
    path = os.fspath(path)
    arrays = _cached_arrays(path, "bow", _parse_bow, cache)
    _, header_features, header_labels = (int(value) for value in arrays["header"])
    label_space = header_labels if num_labels is None else _checked_num_labels(num_labels)
    labels = _label_rows(path, arrays, label_space, 2)
    return XMCData(path, labels, _feature_rows(path, arrays, header_features, 2), None)


def _label_rows(where: str, arrays: dict[str, np.ndarray], num_labels: int, line_base: int) -> CSR:
    """The parsed label rows, ids checked against ``num_labels``, a label repeated on a line dropped."""
    _check_range(where, "label", arrays["label_indices"], arrays["label_indptr"], num_labels, line_base)
    indptr, indices = _dedupe_rows(where, arrays["label_indptr"], arrays["label_indices"], line_base)
    return CSR(indptr, indices.astype(np.int32), None, num_labels)


def _feature_rows(where: str, arrays: dict[str, np.ndarray], num_features: int, line_base: int) -> CSR:
    """The parsed BoW feature rows, ids checked against ``num_features``."""
    indptr, indices = arrays["feature_indptr"], arrays["feature_indices"]
    _check_range(where, "feature", indices, indptr, num_features, line_base)
    return CSR(indptr, indices.astype(np.int32), arrays["feature_values"], num_features)


def _checked_num_labels(num_labels: int) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    return int(num_labels)


# ---------------------------------------------------------------------------------------------- text reader


def _text_label_part(
    path: str, buf: np.ndarray, starts: np.ndarray, tabs: np.ndarray
) -> dict[str, np.ndarray]:
    """Parse the ``l1,l2,...`` part before each line's first tab."""
    num_lines = starts.size - 1
    in_label = np.zeros(buf.size + 1, dtype=np.int8)
    in_label[starts[:-1]] += 1
    in_label[tabs] -= 1
    in_label = np.cumsum(in_label[:-1], dtype=np.int8).astype(bool)
    keep = in_label.copy()
    keep[tabs] = True  # one separator per line
    part = buf[keep]  # labels of every line, each line's ended by its tab
    labelled = np.flatnonzero(tabs > starts[:-1])
    if labelled.size and label_field_holds_names(buf[starts[labelled[0]] : tabs[labelled[0]]].tobytes()):
        return {"label_field": part}  # names: mapped to ids by read_text, with its vocabulary
    offsets = np.flatnonzero(keep)  # source offset of each kept byte, for error lines
    is_digit = _IS_DIGIT[part]
    is_comma = part == _COMMA
    odd = np.flatnonzero(~is_digit & ~is_comma & (part != _TAB))
    if odd.size:
        offset = int(offsets[odd[0]])
        line = int(_line_of(np.array([offset]), starts)[0])
        seen = _token_text(buf, int(starts[line]), int(tabs[line]))[:80]
        raise DataFormatError(path, f"expected {TEXT_LABEL_IDS}, got {seen!r}", line=line + 1)
    padded = np.concatenate([np.array([_TAB], np.uint8), part, np.array([_TAB], np.uint8)])  # uint8
    commas = np.flatnonzero(is_comma)
    loose = commas[~_IS_DIGIT[padded[commas]] | ~_IS_DIGIT[padded[commas + 2]]]
    if loose.size:
        raise _fail_at(
            path, int(offsets[loose[0]]), 1, starts, "stray comma in the labels: expected 'l1,l2,...'"
        )
    classes = np.where(is_digit, np.uint8(_TOKEN), np.uint8(_WHITE))
    token_start, _ = _tokens(classes)
    values, failed = _parse_numbers(np.where(is_digit, part, np.uint8(_SPACE)), token_start)
    assert failed is None, "digit-only tokens always parse"
    token_source = offsets[token_start]  # offsets in the file, for the line of a too large id
    too_large = values > MAX_ID
    if too_large.any():
        token = int(np.argmax(too_large))
        digits = part[token_start[token] :][: np.argmax(~is_digit[token_start[token] :])].tobytes().decode()
        problem = f"label id {digits} too large: expected at most {MAX_ID}"
        raise _fail_at(path, int(token_source[token]), 1, starts, problem)
    line_of_token = np.searchsorted(np.flatnonzero(part == _TAB), token_start, side="left")
    counts = np.bincount(line_of_token, minlength=num_lines)
    return {
        "label_indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "label_indices": values.astype(np.int64),
    }


def label_field_holds_names(field: bytes) -> bool:
    """Whether a text line's label field ``field`` (the bytes before its tab) names labels rather than
    listing ids: anything but digits, commas and spaces. A file's first labelled line decides for it."""
    return bool(field.strip()) and bool(field.translate(None, b"0123456789, \r").strip())


def _named_labels(
    where: str, field: np.ndarray, line_base: int, vocabulary: list[str] | None, source: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """``(label arrays, names)`` of label fields that name labels (``field``: each line's ended by a tab).

    Names are split at commas and stripped of spaces; ``vocabulary`` gives each name's id (a name outside it
    is an error naming ``source``, where it comes from), None takes the sorted names of these lines."""
    try:
        text = field.tobytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = int(np.count_nonzero(field[: error.start] == _TAB)) + line_base
        raise DataFormatError(
            where, f"invalid UTF-8 in the label names ({error.reason})", line=line
        ) from None
    fields = text.split("\t")[:-1]
    distinct: dict[str, int] = {}  # a label field's code: each distinct field is split and mapped once
    codes = np.fromiter(
        (distinct.setdefault(f, len(distinct)) for f in fields), dtype=np.int64, count=len(fields)
    )
    rows = [[name.strip() for name in field.split(",")] if field.strip() else [] for field in distinct]

    def first_line(bad: list[bool]) -> int:  # the first line, in the file's order, whose field is bad
        return int(np.flatnonzero(np.asarray(bad, dtype=bool)[codes])[0])

    empty = ["" in row for row in rows]
    if any(empty):
        line = first_line(empty)
        row = rows[codes[line]]
        problem = f"an empty label name in {','.join(row)!r}: expected 'name,name,...'"
        raise DataFormatError(where, problem, line=line + line_base)
    vocabulary = sorted({name for row in rows for name in row}) if vocabulary is None else vocabulary
    ids = {name: index for index, name in enumerate(vocabulary)}
    row_ids = [[ids.get(name, -1) for name in row] for row in rows]
    unknown = [-1 in row for row in row_ids]
    if any(unknown):
        line = first_line(unknown)
        code = int(codes[line])
        name = rows[code][row_ids[code].index(-1)]
        problem = f"label {name!r} is not one of the {len(vocabulary)} label names of {source}"
        raise DataFormatError(where, problem, line=line + line_base)
    lengths = np.fromiter((len(row) for row in row_ids), dtype=np.int64, count=len(row_ids))
    flat = np.fromiter((i for row in row_ids for i in row), dtype=np.int64, count=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # each distinct field's ids in flat
    counts = lengths[codes]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    within = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], counts)
    indices = flat[np.repeat(starts[codes], counts) + within]
    return {"label_indptr": indptr, "label_indices": indices}, vocabulary


def _text_part(path: str, buf: np.ndarray, starts: np.ndarray, tabs: np.ndarray) -> np.ndarray:
    """The texts after each tab joined by newlines (UTF-8 bytes), without a trailing carriage return."""
    num_lines = starts.size - 1
    ends = starts[1:] - 1  # offset of each line's newline (or one past the end for an unterminated last line)
    ends = np.minimum(ends, buf.size)
    has_cr = (ends > tabs + 1) & (buf[np.minimum(np.maximum(ends - 1, 0), buf.size - 1)] == _CR)
    delta = np.zeros(buf.size + 1, dtype=np.int8)
    delta[tabs + 1] += 1
    delta[ends - has_cr] -= 1
    keep = np.cumsum(delta[:-1], dtype=np.int8).astype(bool)
    keep[ends[ends < buf.size]] = True  # keep each line's newline as the separator
    joined = buf[keep]
    if num_lines and (buf.size == 0 or buf[-1] != _NEWLINE):
        joined = np.append(joined, np.uint8(_NEWLINE))
    return joined


def _split_texts(path: str, joined: np.ndarray, line_base: int) -> list[str]:
    try:
        text = joined.tobytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = int(np.count_nonzero(joined[: error.start] == _NEWLINE)) + line_base
        raise DataFormatError(path, f"invalid UTF-8 in the text ({error.reason})", line=line) from None
    texts = text.split("\n")
    texts.pop()  # the piece after the last newline is empty
    return texts


def _parse_text(path: str, raw: bytes) -> dict[str, np.ndarray]:
    if not raw.strip():
        raise DataFormatError(path, "empty file: expected 'l1,l2,...<TAB>text' lines")
    buf = np.frombuffer(raw, dtype=np.uint8)
    starts = _line_starts(buf)
    all_tabs = np.flatnonzero(buf == _TAB)
    first = np.searchsorted(all_tabs, starts[:-1])
    line_ends = starts[1:] - 1
    valid = first < all_tabs.size
    tabs = np.full(first.size, -1, dtype=np.int64)
    tabs[valid] = all_tabs[first[valid]]  # each line's first tab, when the file has one after its start
    missing = ~valid | (tabs >= line_ends)
    if missing.any():
        line = int(np.argmax(missing))
        seen = _token_text(buf, int(starts[line]), int(min(line_ends[line], buf.size)))[:80]
        problem = f"found no tab in {seen!r}" if seen.strip() else "an empty line"
        raise DataFormatError(path, f"expected 'l1,l2,...<TAB>text', {problem}", line=line + 1)
    arrays = _text_label_part(path, buf, starts, tabs)
    arrays["text_bytes"] = _text_part(path, buf, starts, tabs)
    return arrays


def read_label_names(path: str | os.PathLike) -> list[str] | None:
    """Label names beside the data file ``path``, else None.

    From ``labels.txt`` (or ``.gz``): one name a line; else from the repository's ``lbl.json`` (or ``.gz``):
    the ``title`` of one JSON object a line.
    """
    folder = Path(os.fspath(path)).parent
    for name in ("labels.txt", "labels.txt.gz", "lbl.json", "lbl.json.gz"):
        candidate = folder / name
        if candidate.is_file():
            return read_label_file(candidate)
    return None


def read_label_file(path: str | os.PathLike) -> list[str]:
    """The label names of the file ``path``, the name of label ``i`` at ``[i]``: the ``title`` of each JSON
    object of a JSON lines file (``.json``, ``.json.gz``: the repository's ``lbl.json``), else one name a
    line (``labels.txt``)."""
    path = os.fspath(path)
    if path.endswith((".json", ".json.gz")):
        return _json_label_titles(path)
    names = _read_bytes(path).decode("utf-8", errors="replace").split("\n")
    if names and names[-1] == "":
        names.pop()
    return [name.rstrip("\r") for name in names]


def _json_label_titles(path: str) -> list[str]:
    """The ``title`` of each line of a JSON lines label file; errors name the line."""
    lines = _read_bytes(path).split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    titles = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
            raise DataFormatError(path, f"invalid JSON ({error})", line=number) from None
        title = record.get("title") if isinstance(record, dict) else None
        if not isinstance(title, str):
            raise DataFormatError(path, "expected a JSON object with a string 'title'", line=number)
        titles.append(title)
    return titles


def read_text(
    path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    cache: bool = True,
) -> XMCData:
    """Read a text-format file, ``l1,l2,...<TAB>text`` one document a line (plain or ``.gz``).

    The labels are ids, or names (``python,devel<TAB>text``) where the file's first labelled line names its
    own: a name's id is its place in ``label_names``, else in the ``labels.txt`` beside the file, else in the
    sorted names of the file (:attr:`XMCData.label_names`).

    Args:
        path: the file.
        num_labels: the label space size; else the line count of ``labels.txt(.gz)`` beside the file, else the
            largest label id + 1 (names: the number of names).
        label_names: the names of the run's labels (a test file's, read by its training file's names).
        cache: read and write the parsed arrays cache (see the module docstring).

    Returns:
        :class:`XMCData` with ``labels`` and ``texts``; ``features`` is None.

    Raises:
        DataFormatError: naming the file, the 1-based line and the problem.
    """
    path = os.fspath(path)
    arrays = _cached_arrays(path, "text", _parse_text, cache)
    texts = _split_texts(path, arrays["text_bytes"], 1)
    reads_names = num_labels is None  # the file sets its own label space (a training file)
    beside = read_label_names(path) if reads_names and label_names is None else None
    arrays, names = _labels_as_ids(path, arrays, label_names, reads_names=reads_names, beside=beside)
    indices = arrays["label_indices"]
    if num_labels is not None:
        label_space = _checked_num_labels(num_labels)
    elif names is not None:
        label_space = max(len(names), 1)
    else:
        label_space = len(beside) if beside else (int(indices.max()) + 1 if indices.size else 1)
    return XMCData(path, _label_rows(path, arrays, label_space, 1), None, texts, names)


def read_rows(
    raw: bytes,
    where: str,
    *,
    num_labels: int,
    num_features: int | None = None,
    label_names: list[str] | None = None,
) -> XMCData:
    """Rows to predict on, their labels optional: BoW lines when ``num_features`` is given, else text lines
    (whose labels may be names of ``label_names``, the run's).

    BoW input may start with its header (whose feature count must be ``num_features``) or not; a line is
    ``l1,l2 f:v ...`` or, without labels, `` f:v ...`` or ``f:v ...``. A text line is ``l1,l2<TAB>text`` or,
    without labels, bare text (no tab). ``raw`` may be gzipped; ``where`` names it in errors (a path, or
    ``<stdin>``). Ids are checked against ``num_features`` and ``num_labels``.

    >>> read_rows(b"3:0.5\n1 0:1\n", "<stdin>", num_labels=2, num_features=4).labels.to_lists()
    [[], [1]]
    """
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataFormatError(where, f"corrupt gzip data ({error})") from None
    if not raw.strip():
        raise DataFormatError(where, "no rows: expected one document a line")
    if num_features is None:
        return _text_rows(raw, where, num_labels, label_names)
    first = raw.split(b"\n", 1)[0]
    if len(first.split()) == 3 and all(field.isdigit() for field in first.split()):
        arrays = _parse_bow(where, raw)
        header_features = int(arrays["header"][1])
        if header_features != num_features:
            problem = f"header says {header_features} features, expected the run's {num_features}"
            raise DataFormatError(where, problem, line=1)
        line_base = 2
    else:
        buf = np.frombuffer(raw, dtype=np.uint8)
        arrays, line_base = _parse_bow_body(where, buf, _line_starts(buf), 1), 1
    labels = _label_rows(where, arrays, num_labels, line_base)
    return XMCData(where, labels, _feature_rows(where, arrays, num_features, line_base), None)


def _text_rows(raw: bytes, where: str, num_labels: int, label_names: list[str] | None) -> XMCData:
    """Text lines, a line without a tab being an unlabelled document (it gets an empty label list); labels
    that are names are read by ``label_names`` (the run's: none is an error)."""
    lines = raw.split(b"\n")
    labelled = b"\n".join(line if b"\t" in line else b"\t" + line for line in lines)
    if raw.endswith(b"\n"):
        labelled = labelled[:-1]  # the piece after the final newline is no line
    arrays = _parse_text(where, labelled)
    texts = _split_texts(where, arrays["text_bytes"], 1)
    arrays, _ = _labels_as_ids(where, arrays, label_names, reads_names=False, beside=None)
    return XMCData(where, _label_rows(where, arrays, num_labels, 1), None, texts, label_names)


def _labels_as_ids(
    where: str,
    arrays: dict[str, np.ndarray],
    label_names: list[str] | None,
    *,
    reads_names: bool,
    beside: list[str] | None,
) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """A text file's parsed label arrays with ids, and the names they index (None for a file of ids).

    A file of a run whose labels are names (``label_names``, its training file's) must name its labels; one
    of a run of ids must give ids, unless it is a training file that sets its own label space
    (``reads_names``), whose names are those of ``beside`` (the ``labels.txt`` beside it) or its own."""
    named = "label_field" in arrays
    if label_names is not None and not named and arrays["label_indices"].size:
        line = int(np.argmax(np.diff(arrays["label_indptr"]) > 0)) + 1
        problem = (
            "labels are ids, but the run's are names (its training file's first labelled line names them)"
        )
        raise DataFormatError(where, f"{problem}: give names", line=line)
    if not named:
        return arrays, None
    if label_names is None and not reads_names:
        fields = arrays["label_field"].tobytes().split(b"\t")
        line = next(number for number, field in enumerate(fields, 1) if field.strip())
        problem = (
            "labels are names, but the run's are ids: give ids (a training file whose first labelled line "
            "names its labels takes its label space from them: leave data.num_classes unset)"
        )
        raise DataFormatError(where, problem, line=line)
    if label_names is not None:
        source = "the run (its training file's; a labels.txt beside that file, a name a line, makes room)"
        return _named_labels(where, arrays["label_field"], 1, label_names, source)
    return _named_labels(where, arrays["label_field"], 1, beside, "the labels.txt beside the file")


def load_xmc(
    path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    cache: bool = True,
) -> XMCData:
    """Read a BoW or text file, telling them apart by the first line (a 3-number header or a tab); a text
    file's label names are read as :func:`read_text` reads them (``label_names``: the run's).

    >>> data = load_xmc("data/deb-tags/train.txt.gz")  # doctest: +SKIP
    >>> data.format, data.num_labels  # doctest: +SKIP
    ('text', 595)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    if os.path.getsize(path) == 0:
        raise DataFormatError(path, "empty file: expected a BoW header or 'l1,l2,...<TAB>text' lines")
    first = _first_line(path)
    if b"\t" not in first and len(first.split()) == 3:
        return read_bow(path, num_labels=num_labels, cache=cache)  # the header check names a wrong count
    if not first.strip():
        raise DataFormatError(path, "empty first line: expected a BoW header or 'l1,l2,...<TAB>text'", line=1)
    if b"\t" in first:
        return read_text(path, num_labels=num_labels, label_names=label_names, cache=cache)
    seen = first[:80].decode("utf-8", errors="replace").rstrip("\n")
    problem = (
        f"unknown format: expected a BoW header 'num_docs num_features num_labels' or a tab, got {seen!r}"
    )
    raise DataFormatError(path, problem, line=1)


# ---------------------------------------------------------------------------------------------- writers

_POWERS_OF_TEN = 10 ** np.arange(19, dtype=np.int64)
_VALUE_DECIMALS = 6


def _render(values: np.ndarray, sep: np.ndarray, *, width: np.ndarray | int = 1, prefix=None) -> np.ndarray:
    """Format non-negative integers as ASCII, each zero-padded to ``width``, followed by its ``sep`` byte.

    A negative value renders as an empty token (only its separator); ``prefix`` is one byte (0 for none) put
    before the digits. Vectorised: one pass per digit position.
    """
    values = np.asarray(values, dtype=np.int64)
    digits = np.zeros(values.shape, dtype=np.int64)
    digits[values >= 0] = 1
    for power in _POWERS_OF_TEN[1:]:
        digits += values >= power
    width = np.where(values >= 0, np.maximum(digits, width), 0)
    has_prefix = np.zeros(values.shape, dtype=np.int64) if prefix is None else (prefix != 0).astype(np.int64)
    lengths = width + has_prefix + 1
    offsets = np.zeros(values.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    if prefix is not None:
        out[offsets[:-1][has_prefix == 1]] = prefix[has_prefix == 1]
    sep_at = offsets[1:] - 1
    out[sep_at] = sep
    for position in range(int(width.max(initial=0))):
        mask = width > position
        out[sep_at[mask] - 1 - position] = 48 + (values[mask] // _POWERS_OF_TEN[position]) % 10
    return out


def _row_tokens(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start of each row in a token stream, and each token's rank inside its row."""
    starts = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    rank = np.arange(starts[-1], dtype=np.int64) - np.repeat(starts[:-1], lengths)
    return starts, rank


def _value_tokens(values: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split values into integer part, fraction digits (trailing zeros dropped), fraction width and sign."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)) or (values.size and np.abs(values).max() >= 1e12):
        raise ValueError(f"{where}: feature values must be finite and below 1e12 in magnitude")
    scale = 10**_VALUE_DECIMALS
    fixed = np.rint(np.abs(values) * scale).astype(np.int64)
    whole, fraction = fixed // scale, fixed % scale
    width = np.full(values.shape, _VALUE_DECIMALS, dtype=np.int64)
    for _ in range(_VALUE_DECIMALS - 1):
        trailing = (fraction % 10 == 0) & (width > 1)
        fraction = np.where(trailing, fraction // 10, fraction)
        width -= trailing
    sign = np.where((values < 0) & (fixed > 0), np.uint8(ord("-")), np.uint8(0))
    return whole, fraction, width, sign


def _labels_and_features_stream(labels: CSR, features: CSR | None, where: str) -> np.ndarray:
    """Render BoW lines ``l1,l2 f:v f:v`` for all rows as one byte buffer."""
    num_rows = len(labels)
    label_count = labels.row_lengths()
    feature_count = np.zeros(num_rows, dtype=np.int64) if features is None else features.row_lengths()
    tokens_per_row = np.maximum(label_count + 3 * feature_count, 1)  # an empty row is one empty token
    row_start, _ = _row_tokens(tokens_per_row)
    total = int(row_start[-1])
    values = np.full(total, -1, dtype=np.int64)
    sep = np.full(total, _SPACE, dtype=np.uint8)
    width = np.ones(total, dtype=np.int64)
    prefix = np.zeros(total, dtype=np.uint8)
    _, label_rank = _row_tokens(label_count)
    label_at = np.repeat(row_start[:-1], label_count) + label_rank
    values[label_at] = labels.indices
    not_last = label_rank < np.repeat(label_count, label_count) - 1
    sep[label_at] = np.where(not_last, np.uint8(_COMMA), np.uint8(_SPACE))
    if features is not None and features.nnz:
        _, feature_rank = _row_tokens(feature_count)
        id_at = np.repeat(row_start[:-1] + label_count, feature_count) + 3 * feature_rank
        whole, fraction, fraction_width, sign = _value_tokens(features.data, where)
        values[id_at], sep[id_at] = features.indices, _COLON
        values[id_at + 1], sep[id_at + 1], prefix[id_at + 1] = whole, ord("."), sign
        values[id_at + 2], width[id_at + 2] = fraction, fraction_width
    sep[row_start[1:] - 1] = _NEWLINE
    return _render(values, sep, width=width, prefix=prefix)


def write_bow(path: str | os.PathLike, data: XMCData) -> None:
    """Write ``data`` (labels and features) in the BoW format; gzipped when ``path`` ends with ``.gz``.

    Values are written with up to 6 decimals.
    """
    if data.features is None:
        raise ValueError(f"write_bow({os.fspath(path)!r}): data has no features (text data: use write_text)")
    if len(data.features) != len(data.labels):
        raise ValueError(f"write_bow: {len(data.features)} feature rows but {len(data.labels)} label rows")
    header = f"{len(data.labels)} {data.num_features} {data.num_labels}\n".encode()
    body = _labels_and_features_stream(data.labels, data.features, os.fspath(path))
    with _open_text_for_write(path) as out:
        out.write(header)
        out.write(memoryview(body))


def _interleave(first: np.ndarray, first_ptr: np.ndarray, second: np.ndarray, second_ptr: np.ndarray):
    """Concatenate row ``i`` of ``first`` then row ``i`` of ``second``, for every row (byte buffers)."""
    first_len, second_len = np.diff(first_ptr), np.diff(second_ptr)
    out_start = np.zeros(first_len.shape[0] + 1, dtype=np.int64)
    np.cumsum(first_len + second_len, out=out_start[1:])
    # Mark the bytes that come from ``first``: +1 where a row starts, -1 where its ``second`` part starts.
    delta = np.zeros(int(out_start[-1]) + 1, dtype=np.int8)
    delta[out_start[:-1]] += 1
    delta[out_start[:-1] + first_len] -= 1
    from_first = np.cumsum(delta[:-1], dtype=np.int8).astype(bool)
    out = np.empty(int(out_start[-1]), dtype=np.uint8)
    out[from_first] = first
    out[~from_first] = second
    return out


def _label_prefixes(labels: CSR, last_sep: int) -> tuple[np.ndarray, np.ndarray]:
    """Render ``l1,l2,...`` then ``last_sep`` for each row; returns the bytes and row offsets."""
    counts = np.maximum(labels.row_lengths(), 1)
    row_start, rank = _row_tokens(counts)
    values = np.full(int(row_start[-1]), -1, dtype=np.int64)
    _, label_rank = _row_tokens(labels.row_lengths())
    values[np.repeat(row_start[:-1], labels.row_lengths()) + label_rank] = labels.indices
    sep = np.full(values.shape, _COMMA, dtype=np.uint8)
    sep[row_start[1:] - 1] = last_sep
    rendered = _render(values, sep)
    row_ends = np.flatnonzero(rendered == last_sep) + 1
    return rendered, np.concatenate([[0], row_ends]).astype(np.int64)


def write_text(path: str | os.PathLike, data: XMCData) -> None:
    """Write ``data`` (labels and texts) as ``l1,l2,...<TAB>text`` lines; gzipped when ``path`` ends .gz."""
    if data.texts is None:
        raise ValueError(f"write_text({os.fspath(path)!r}): data has no texts (BoW data: use write_bow)")
    if len(data.texts) != len(data.labels):
        raise ValueError(f"write_text: {len(data.texts)} texts but {len(data.labels)} label rows")
    joined = "\n".join(data.texts)
    if joined.count("\n") != max(len(data.texts) - 1, 0):
        row = next(i for i, text in enumerate(data.texts) if "\n" in text)
        raise ValueError(f"write_text: text {row} contains a newline; one document must be one line")
    encoded = np.frombuffer((joined + "\n").encode("utf-8") if data.texts else b"", dtype=np.uint8)
    text_ptr = np.concatenate([[0], np.flatnonzero(encoded == _NEWLINE) + 1]).astype(np.int64)
    prefix, prefix_ptr = _label_prefixes(data.labels, _TAB)
    with _open_text_for_write(path) as out:
        out.write(memoryview(_interleave(prefix, prefix_ptr, encoded, text_ptr)))


# -------------------------------------------------------------------------------------------- label features


def label_features(features: CSR, labels: CSR, *, dim: int | None = 256, seed: int = 0) -> np.ndarray:
    """PIFA label embeddings: the L2-normalised sum of each label's L2-normalised training documents.

    When ``features.num_columns > dim``, documents are first projected to ``dim`` dimensions by a seeded
    random sign matrix (Johnson-Lindenstrauss), kept as bits (``num_columns * dim / 8`` bytes; expanded to
    float32 for a sparse matrix product when that takes at most 512 MiB), so memory stays ``O(C * dim)``.
    Labels without documents get zero vectors.

    Args:
        features: ``(N, F)`` document features.
        labels: ``(N, C)`` labels of the same documents.
        dim: the projected dimension ``E``; None never projects.
        seed: the projection's seed.

    Returns:
        ``(C, E)`` float32, ``E = min(F, dim)`` (``F`` when ``dim`` is None).
    """
    import torch

    if len(features) != len(labels):
        raise ValueError(f"label_features: {len(features)} feature rows but {len(labels)} label rows")
    if dim is not None and dim < 1:
        raise ValueError(f"label_features: dim must be positive or None, got {dim}")
    project = dim is not None and features.num_columns > dim
    width = dim if project else features.num_columns
    signs = dense = None
    if project:
        rng = np.random.default_rng(seed)
        signs = rng.integers(0, 256, size=(features.num_columns, (width + 7) // 8), dtype=np.uint8)
        if features.num_columns * width * 4 <= _DENSE_PROJECTION_BYTES:
            dense = (
                torch.from_numpy(np.unpackbits(signs, axis=1, count=width)).float().mul_(2).sub_(1)
            )  # (F, E)
    out = torch.zeros(labels.num_columns, width, dtype=torch.float32)
    chunk = 4096
    for first in range(0, len(features), chunk):
        rows = np.arange(first, min(first + chunk, len(features)))
        docs = _project_rows(features.take(rows), signs, dense, width)  # (chunk, E)
        docs /= docs.norm(dim=1, keepdim=True).clamp_min(1e-30)
        chunk_labels = labels.take(rows)
        label_ids = torch.from_numpy(chunk_labels.indices.astype(np.int64))
        out.index_add_(0, label_ids, docs[chunk_labels.row_ids()])
    out /= out.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return out.numpy()


_DENSE_PROJECTION_BYTES = 1 << 29


def _project_rows(rows: CSR, signs: np.ndarray | None, dense, width: int):
    """Dense ``(n, width)`` float32 torch rows, L2-normalised: the rows, or their random sign projection."""
    import torch

    values = rows.data if rows.data is not None else np.ones(rows.nnz, dtype=np.float32)
    row_of_entry = rows.row_ids()
    norms = np.sqrt(np.bincount(row_of_entry, weights=values.astype(np.float64) ** 2, minlength=len(rows)))
    scale = torch.from_numpy((values / np.maximum(norms, 1e-30)[row_of_entry]).astype(np.float32))
    columns = torch.from_numpy(rows.indices.astype(np.int64))
    if signs is None or dense is not None:
        with warnings.catch_warnings(), torch.sparse.check_sparse_tensor_invariants(enable=False):
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            matrix = torch.sparse_csr_tensor(
                torch.from_numpy(rows.indptr),
                columns,
                scale,
                size=(len(rows), rows.num_columns),
                check_invariants=False,  # valid by construction
            )
            return matrix @ dense if dense is not None else matrix.to_dense()  # (n, F) @ (F, E) or (n, F)
    row_ids = torch.from_numpy(row_of_entry)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    step = 1 << 16
    for first in range(0, rows.nnz, step):
        part = slice(first, first + step)
        bits = np.unpackbits(signs[rows.indices[part]], axis=1, count=width)  # (n, E) of 0/1
        contribution = torch.from_numpy(bits).float().mul_(2).sub_(1).mul_(scale[part, None])
        out.index_add_(0, row_ids[part], contribution)
    return out
