"""MXNet RecordIO (``.rec`` + ``.idx``), the format InsightFace publishes its face data sets in.

Framing follows dmlc-core (``include/dmlc/recordio.h``): each record part is the little-endian ``uint32``
magic ``0xced7230a``, then ``lrec = cflag << 29 | length``, then ``length`` payload bytes zero-padded to a
multiple of 4. A payload that holds the magic word at a 4-byte aligned offset is written split there into
parts with ``cflag`` 1 (first), 2 (middle), 3 (last); a reader rejoins the parts with the magic between them
(``cflag`` 0 is a whole record). The ``.idx`` file has one ``key<TAB>byte offset`` line per record.

Image records start with MXNet's ``IRHeader`` packed as ``IfQQ`` (flag, label, id, id2); when ``flag > 0``,
``flag`` float32 labels follow the header and the header's own label is 0. InsightFace's layout: record 0 is a
header whose label ``[a, b]`` says images are records ``1 .. a-1`` and identities records ``a .. b-1``;
identity record ``a + c`` has label ``[first, end)``, the image records of class ``c``.

>>> import tempfile, os
>>> folder = tempfile.mkdtemp()
>>> with RecordWriter(os.path.join(folder, "x.rec")) as writer:
...     writer.write(7, pack(IRHeader(0, 3.0, 7, 0), b"payload"))
>>> reader = RecordReader(os.path.join(folder, "x.rec"))
>>> unpack(reader.read(7))
(IRHeader(flag=0, label=3.0, id=7, id2=0), b'payload')
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from megaclass.errors import DataFormatError

__all__ = [
    "MAGIC",
    "FaceRecordIndex",
    "IRHeader",
    "RecordReader",
    "RecordWriter",
    "index_path_for",
    "pack",
    "read_face_index",
    "read_idx",
    "unpack",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrec
_LENGTH_MASK = (1 << 29) - 1
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2: 24 bytes
_MAX_LABEL = (1 << 31) - 2  # the label space (largest label + 1) must fit int32, as other formats' does


class IRHeader(NamedTuple):
    """MXNet's image record header. ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Encode ``header`` and ``payload`` as one record (``mx.recordio.pack``'s layout).

    A non-scalar ``header.label`` is stored as ``flag = len(label)`` float32 values after the header.
    """
    label = header.label
    if np.ndim(label) == 0:
        return _IR_HEADER.pack(0, float(label), header.id, header.id2) + bytes(payload)
    values = np.ascontiguousarray(label, dtype="<f4").reshape(-1)  # (flag,)
    return _IR_HEADER.pack(values.size, 0.0, header.id, header.id2) + values.tobytes() + bytes(payload)


def unpack(record: bytes, *, where: str = "<record>") -> tuple[IRHeader, bytes]:
    """Split a record into its :class:`IRHeader` and payload (``mx.recordio.unpack``)."""
    if len(record) < _IR_HEADER.size:
        raise DataFormatError(where, f"record of {len(record)} bytes is shorter than the 24-byte IRHeader")
    flag, label, ident, ident2 = _IR_HEADER.unpack_from(record)
    start = _IR_HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if end > len(record):
            raise DataFormatError(
                where, f"IRHeader flag {flag} needs {4 * flag} label bytes, record has fewer"
            )
        label = np.frombuffer(record, dtype="<f4", count=flag, offset=start).astype(np.float32)
        start = end
    return IRHeader(flag, label, ident, ident2), bytes(record[start:])


def index_path_for(rec_path: str | os.PathLike) -> str:
    """The ``.idx`` path beside a ``.rec`` path."""
    stem, _ = os.path.splitext(os.fspath(rec_path))
    return stem + ".idx"


def read_idx(path: str | os.PathLike) -> dict[int, int]:
    """Parse an ``.idx`` file into ``{key: byte offset}`` (file order)."""
    index: dict[int, int] = {}
    with open(path, encoding="ascii", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataFormatError(path, f"expected 'key<TAB>offset', got {line.rstrip()!r}", line=number)
            try:
                key, offset = int(parts[0]), int(parts[1])
            except ValueError:
                raise DataFormatError(
                    path, f"key and offset must be integers, got {line.rstrip()!r}", line=number
                ) from None
            if offset < 0:
                raise DataFormatError(path, f"negative offset {offset}", line=number)
            index[key] = offset
    return index


class RecordReader:
    """Random and sequential access to a ``.rec`` file, safe to share with DataLoader workers.

    The file is opened lazily in each process (one handle per worker) and read with positional reads, so
    workers never fight over a file position. Pickling drops the handle.

    Args:
        path: the ``.rec`` file.
        idx_path: its ``.idx``; default the ``.idx`` beside ``path``. Needed for :meth:`read` only.
    """

    def __init__(self, path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self._fd: int | None = None  # first: __del__ runs even when the checks below raise
        self._pid: int | None = None
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"RecordIO file not found: {self.path}")
        self.size = os.path.getsize(self.path)
        self.idx_path = index_path_for(self.path) if idx_path is None else os.fspath(idx_path)
        self._index: dict[int, int] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's handle (reopened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    @property
    def index(self) -> dict[int, int]:
        """``{key: offset}`` from the ``.idx`` file, each offset checked against the file size."""
        if self._index is None:
            if not os.path.isfile(self.idx_path):
                raise FileNotFoundError(
                    f"RecordIO index not found: {self.idx_path} (needed for random access)"
                )
            index = read_idx(self.idx_path)
            for key, offset in index.items():
                if offset + _FRAME.size > self.size:
                    raise DataFormatError(
                        self.idx_path,
                        f"key {key}: offset {offset} points past the end of {self.path} ({self.size} bytes): "
                        "the .rec is truncated, or the .idx belongs to another file",
                    )
            self._index = index
        return self._index

    @property
    def keys(self) -> list[int]:
        """Record keys in ``.idx`` order."""
        return list(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = pid
        return self._fd

    def read(self, key: int) -> bytes:
        """The record stored under ``key`` (all parts rejoined)."""
        offset = self.index.get(key)
        if offset is None:
            raise DataFormatError(
                self.idx_path,
                f"no record with key {key}: the index lists {len(self.index)} keys, not this one",
            )
        record, _ = self.read_at(offset)
        return record

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """The record starting at byte ``offset`` and the offset just past it."""
        fd = self._handle()
        parts: list[bytes] = []
        while True:
            frame = os.pread(fd, _FRAME.size, offset)
            if len(frame) < _FRAME.size:
                raise DataFormatError(
                    self.path, f"truncated record header at byte {offset} (file has {self.size})"
                )
            magic, lrec = _FRAME.unpack(frame)
            if magic != MAGIC:
                raise DataFormatError(
                    self.path, f"bad magic 0x{magic:08x} at byte {offset}, expected 0x{MAGIC:08x}"
                )
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            payload = os.pread(fd, length, offset + _FRAME.size)
            if len(payload) < length:
                raise DataFormatError(
                    self.path, f"truncated record at byte {offset}: needs {length} bytes, {len(payload)} left"
                )
            offset += _FRAME.size + ((length + 3) & ~3)
            if cflag == 0 and not parts:
                return payload, offset
            if cflag not in (1, 2, 3) or (cflag == 1) != (not parts):
                raise DataFormatError(self.path, f"part flag {cflag} out of order at byte {offset}")
            parts.append(payload)
            if cflag == 3:
                return _MAGIC_BYTES.join(parts), offset

    def __iter__(self) -> Iterator[bytes]:
        """Every record in file order, without the ``.idx``."""
        offset = 0
        while offset < self.size:
            record, offset = self.read_at(offset)
            yield record


class RecordWriter:
    """Write records in dmlc-core framing, plus the ``.idx`` (``key<TAB>offset``) beside them.

    Args:
        path: the ``.rec`` file to create.
        idx_path: its ``.idx``; default beside ``path``; ``False`` writes none.
    """

    def __init__(self, path: str | os.PathLike, idx_path: str | os.PathLike | bool | None = None) -> None:
        self.path = os.fspath(path)
        self._rec = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        if idx_path is False:
            self._idx = None
        else:
            target = index_path_for(self.path) if idx_path in (None, True) else os.fspath(idx_path)
            self._idx = open(target, "w", encoding="ascii")  # noqa: SIM115
        self.count = 0

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def tell(self) -> int:
        return self._rec.tell()

    def write(self, key: int, record: bytes) -> None:
        """Append ``record`` under ``key``, split where it holds the magic word at an aligned offset."""
        if len(record) >= 1 << 29:
            raise ValueError(f"record of {len(record)} bytes exceeds RecordIO's 2^29 - 1 limit")
        if self._idx is not None:
            self._idx.write(f"{key}\t{self._rec.tell()}\n")
        data = bytes(record)
        view = memoryview(data)
        start = 0
        position = data.find(_MAGIC_BYTES)
        while position != -1:
            if position % 4 == 0:  # dmlc-core splits only at aligned occurrences
                self._write_part(1 if start == 0 else 2, view[start:position])
                start = position + 4
                position = data.find(_MAGIC_BYTES, start)
            else:
                position = data.find(_MAGIC_BYTES, position + 1)
        self._write_part(3 if start else 0, view[start:])
        self.count += 1

    def _write_part(self, cflag: int, part: memoryview) -> None:
        length = len(part)
        self._rec.write(_FRAME.pack(MAGIC, cflag << 29 | length))
        self._rec.write(part)
        self._rec.write(b"\0" * (((length + 3) & ~3) - length))


@dataclass(frozen=True)
class FaceRecordIndex:
    """Which records of an InsightFace ``.rec`` are images, and their classes.

    Attributes:
        keys: ``(N,)`` int64 record key of each image.
        labels: ``(N,)`` int64 class of each image, ``0 .. num_classes - 1``.
        num_classes: ``C``.
    """

    keys: np.ndarray
    labels: np.ndarray
    num_classes: int


def read_face_index(reader: RecordReader) -> FaceRecordIndex:
    """Image keys and labels of an InsightFace ``.rec``, from its header and identity records.

    Without the header record (flag 0 at key 0), every record is an image and each header is read for its
    label (slower: one read per image).
    """
    if not reader.index:
        raise DataFormatError(
            reader.idx_path, f"no records: expected a key<TAB>offset line per record of {reader.path}"
        )
    header, _ = unpack(reader.read(0), where=f"{reader.path} key 0") if 0 in reader.index else (None, b"")
    if header is None or header.flag <= 0:
        return _labels_from_images(reader, np.asarray(reader.keys, dtype=np.int64))
    first_identity, end_identity = _record_range(reader, 0, header.label, len(reader.index))
    image_keys = np.arange(1, first_identity, dtype=np.int64)
    if end_identity <= first_identity or any(
        k not in reader.index for k in (first_identity, end_identity - 1)
    ):
        return _labels_from_images(reader, image_keys)
    covered = np.zeros(image_keys.size, dtype=np.int64)  # identities claiming each image record
    labels = np.full(image_keys.size, -1, dtype=np.int64)
    for label, key in enumerate(range(first_identity, end_identity)):
        identity, _ = unpack(reader.read(key), where=f"{reader.path} key {key}")
        start, end = _record_range(reader, key, identity.label, first_identity - 1)
        labels[start - 1 : end - 1] = label
        covered[start - 1 : end - 1] += 1
    if np.any(covered != 1):
        key = int(np.flatnonzero(covered != 1)[0]) + 1
        problem = (
            f"image record {key} belongs to {int(covered[key - 1])} identities: the identity records "
            f"{first_identity}..{end_identity - 1} (header label of record 0) must split the image records "
            f"1..{first_identity - 1} into ranges, each image in exactly one"
        )
        raise DataFormatError(reader.path, problem)
    return FaceRecordIndex(image_keys, labels, end_identity - first_identity)


def _record_range(reader: RecordReader, key: int, label: object, last: int) -> tuple[int, int]:
    """``[a, b)`` of a header (key 0) or identity record's label, checked: integers, ``1 <= a <= b``.

    ``b - 1`` must not pass ``last`` for an identity record's images; the header's image records
    ``1 .. a - 1`` must not outnumber the ``.idx`` (``last``: its number of keys).
    """
    values = np.asarray(label, dtype=np.float64).reshape(-1)
    what = "header record 0" if key == 0 else f"identity record {key}"
    if values.size < 2 or not np.all(np.isfinite(values[:2])) or np.any(values[:2] != np.round(values[:2])):
        raise DataFormatError(
            reader.path, f"{what} has label {values.tolist()}, expected two integers [a, b)"
        )
    start, end = int(values[0]), int(values[1])
    if key == 0:
        if not 1 <= start <= end or start - 1 > last:
            raise DataFormatError(
                reader.path,
                f"{what} has label [{start}, {end}): expected 1 <= a <= b with a - 1 image records, at most "
                f"the {last} keys of {reader.idx_path}",
            )
    elif not 1 <= start <= end <= last + 1:
        raise DataFormatError(reader.path, f"{what}: image range [{start}, {end}) outside [1, {last + 1})")
    return start, end


def _labels_from_images(reader: RecordReader, keys: np.ndarray) -> FaceRecordIndex:
    labels = np.empty(keys.size, dtype=np.int64)
    for position, key in enumerate(keys.tolist()):
        header, _ = unpack(reader.read(key), where=f"{reader.path} key {key}")
        label = float(header.label if np.ndim(header.label) == 0 else header.label[0])
        if not (math.isfinite(label) and label == round(label) and label <= _MAX_LABEL):
            raise DataFormatError(
                reader.path,
                f"image record {key} has label {label:g}: expected an integer class id at most {_MAX_LABEL}",
            )
        labels[position] = int(label)
    if labels.size and labels.min() < 0:
        raise DataFormatError(reader.path, f"negative label {labels.min()} in image records")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    return FaceRecordIndex(keys, labels, num_classes)
