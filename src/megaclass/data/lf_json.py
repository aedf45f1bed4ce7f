"""The Extreme Classification Repository's JSON lines format (LF-AmazonTitles-131K, LF-WikiSeeAlso-320K, ...).

A data file (``trn.json.gz``, ``tst.json.gz``) holds one JSON object a line::

    {"uid": "B0001", "title": "...", "content": "...", "target_ind": [3, 17], "target_rel": [1.0, 1.0]}

A document's text is its ``title``, followed by a space and its ``content`` when that is present and not
empty; its labels are ``target_ind`` (0-based rows of ``lbl.json.gz`` beside the file, whose lines are
``{"uid": ..., "title": ...}``: the label names, see :func:`megaclass.data.xmc.read_label_names`).
``target_rel`` and other keys are ignored. The label space is, in order: ``num_labels`` when given; the number
of label names beside the file; the largest label id + 1 over the file and its other split (``trn.json`` and
``tst.json``, plain or ``.gz``, in the same folder). What comes out is what the text reader gives
(:class:`~megaclass.data.xmc.XMCData` with ``texts``): a text featuriser or a tokenizer reads it as
it reads ``labels<TAB>text`` files.

>>> data = read_lf_json("LF-AmazonTitles-131K/trn.json.gz")  # doctest: +SKIP
>>> len(data), data.num_labels  # doctest: +SKIP
(294805, 131073)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from megaclass.data.xmc import (
    CSR,
    XMCData,
    _check_range,
    _checked_num_labels,
    _dedupe_rows,
    _read_bytes,
    read_label_names,
)
from megaclass.errors import DataFormatError

__all__ = ["is_lf_json_line", "parse_lf_json_lines", "read_lf_json"]

_MAX_LABEL_ID = (1 << 31) - 2  # label ids are stored as int32 and the label space (largest id + 1) must fit
_SPLIT_NAMES = {"trn.json": "tst.json", "tst.json": "trn.json"}


def is_lf_json_line(line: bytes) -> bool:
    """Whether ``line`` (a file's first line) is a JSON object with a ``target_ind`` key.

    >>> is_lf_json_line(b'{"uid": "a", "title": "x", "target_ind": [1]}\\n'), is_lf_json_line(b"1,2\\tx\\n")
    (True, False)
    """
    if not line.lstrip().startswith(b"{"):
        return False
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False
    return isinstance(record, dict) and "target_ind" in record


def _text_field(path: str, record: dict[str, Any], key: str, number: int) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        problem = f"{key!r} must be a string, got {type(value).__name__} {str(value)[:40]!r}"
        raise DataFormatError(path, problem, line=number)
    return value


def _label_ids(path: str, record: dict[str, Any], number: int) -> list[int]:
    if "target_ind" not in record:
        keys = ", ".join(sorted(record))[:80]
        raise DataFormatError(
            path, f"no 'target_ind' (the label ids) in the object; keys: {keys}", line=number
        )
    ids = record["target_ind"]
    if not isinstance(ids, list):
        problem = f"'target_ind' must be a list of label ids, got {type(ids).__name__} {str(ids)[:40]!r}"
        raise DataFormatError(path, problem, line=number)
    for value in ids:
        if type(value) is not int or value < 0:  # bool is an int subclass: refused by the exact type test
            problem = f"'target_ind' holds {value!r}: expected non-negative integer label ids"
            raise DataFormatError(path, problem, line=number)
        if value > _MAX_LABEL_ID:
            problem = f"label id {value} too large: expected at most {_MAX_LABEL_ID}"
            raise DataFormatError(path, problem, line=number)
    return ids


def _parse(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Texts, label ``indptr (N + 1,)`` and label ids ``(L,)`` int64 of every line; errors name the line."""
    lines = _read_bytes(path).split(b"\n")
    while lines and not lines[-1].strip():  # a final newline (or blank lines at the end) opens no document
        lines.pop()
    if not lines:
        raise DataFormatError(path, "empty file: expected one JSON object with 'target_ind' a line")
    return parse_lf_json_lines(path, lines)


def parse_lf_json_lines(path: str, lines: list[bytes]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Texts, label ``indptr (N + 1,)`` and label ids ``(L,)`` int64 of ``lines``, the file's first lines
    (errors name the file ``path`` and the line).

    >>> texts, indptr, ids = parse_lf_json_lines("trn.json", [b'{"title": "a", "target_ind": [4, 2]}'])
    >>> texts, indptr.tolist(), ids.tolist()
    (['a'], [0, 2], [4, 2])
    """
    texts, counts, flat = [], np.zeros(len(lines), dtype=np.int64), []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except UnicodeDecodeError as error:
            raise DataFormatError(path, f"invalid UTF-8 ({error.reason})", line=number) from None
        except json.JSONDecodeError as error:
            seen = line[:60].decode("utf-8", errors="replace").strip()
            problem = f"invalid JSON ({error.msg}, column {error.colno}) in {seen!r}"
            raise DataFormatError(path, problem, line=number) from None
        if not isinstance(record, dict):
            problem = f"expected a JSON object with 'target_ind', got {type(record).__name__}"
            raise DataFormatError(path, problem, line=number)
        ids = _label_ids(path, record, number)
        title = _text_field(path, record, "title", number)
        content = _text_field(path, record, "content", number)
        texts.append(f"{title} {content}" if content else title)
        counts[number - 1] = len(ids)
        flat.extend(ids)
    indptr = np.zeros(len(lines) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return texts, indptr, np.array(flat, dtype=np.int64)


def _other_split(path: str) -> str | None:
    """``tst.json(.gz)`` beside ``trn.json(.gz)`` and the other way round, when that file exists."""
    source = Path(path)
    name = source.name.removesuffix(".gz")
    if name not in _SPLIT_NAMES:
        return None
    for suffix in ("", ".gz"):
        candidate = source.with_name(_SPLIT_NAMES[name] + suffix)
        if candidate.is_file():
            return str(candidate)
    return None


def _label_space(path: str, ids: np.ndarray) -> int:
    """The number of label names beside ``path``, else the largest id + 1 over it and its other split."""
    names = read_label_names(path)
    if names:
        return len(names)
    largest = int(ids.max()) if ids.size else 0
    other = _other_split(path)
    if other is not None:
        other_ids = _parse(other)[2]
        largest = max(largest, int(other_ids.max()) if other_ids.size else 0)
    return largest + 1


def read_lf_json(
    path: str | os.PathLike, *, num_labels: int | None = None, label_names: list[str] | None = None
) -> XMCData:
    """Read a JSON lines file of the repository's LF data sets (plain or ``.gz``; see the module docstring).

    Args:
        path: the file: one ``{"title": ..., "content": ..., "target_ind": [...]}`` object a line.
        num_labels: the label space size; None takes it from the label names beside the file (``lbl.json``).
        label_names: the run's label names, where its training file named its labels: refused (these
            labels are ids).

    Returns:
        :class:`~megaclass.data.xmc.XMCData` with ``labels`` and ``texts``; ``features`` is None.

    Raises:
        DataFormatError: naming the file, the 1-based line and the problem (bad JSON, no or bad
            ``target_ind``, a label id outside the label space).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    if label_names is not None:
        raise DataFormatError(
            path,
            "its labels are ids ('target_ind'), the run's are names (as its training file's lines give them)",
        )
    texts, indptr, ids = _parse(path)
    label_space = _checked_num_labels(num_labels) if num_labels is not None else _label_space(path, ids)
    try:
        _check_range(path, "label", ids, indptr, label_space, 1)
    except DataFormatError as error:
        if num_labels is not None or read_label_names(path) is None:
            raise
        names = "the label names beside it (labels.txt or lbl.json)"
        raise DataFormatError(path, f"{error.problem}: {names} hold {label_space}", line=error.line) from None
    indptr, ids = _dedupe_rows(path, indptr, ids, 1)
    return XMCData(path, CSR(indptr, ids.astype(np.int32), None, label_space), None, texts)
