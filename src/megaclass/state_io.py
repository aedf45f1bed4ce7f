"""Nested state on disk: tensors in safetensors, the rest in JSON, every file checksummed, renamed into place.

A state folder holds ``tensors.safetensors``, ``state.json`` and ``manifest.json``. Any nested state (module
and optimizer state dicts, RNG states, counters) is split by :func:`flatten` into a JSON tree whose tensors
are replaced by ``{"__tensor__": key}`` references into the safetensors file. ``manifest.json`` gives the
size and checksum of every other file under the folder (:func:`write_manifest`), so a reader tells a whole
folder from a truncated or altered one (:func:`verify_manifest`). The checksum (:func:`piece_fingerprint`) is
the SHA-256 of the SHA-256 digests of the file's 64 MiB pieces, which threads hash side by side: one SHA-256
stream runs at some 1.7 GB/s, 32 s for a 55 GB checkpoint. The folder is written under a temporary
name and renamed (:func:`replace_folder`), so a kill leaves the old folder or the new one, never half of one.

Tensors are streamed, never copied whole: :func:`write_tensors` writes each one block at a time
(:data:`STREAM_CHUNK_BYTES` at most) from wherever it lives (GPU, pinned or plain host memory, or a
:class:`RowSource` that reads rows when asked, such as a parameter server's) into the file, hashing the bytes
as they go, so saving a row store of 10^8 classes needs one block of host memory, not a copy of
its rows. A contiguous tensor's blocks end where the checksum's pieces do, so that its whole pieces are
hashed side by side while the file is written. Reading back, the tensors a caller names come as
:class:`SavedTensor`: a handle into the file that :func:`copy_into_` streams into existing tensors (a row
store's own rows), block by block.

>>> import tempfile, torch
>>> folder = write_state(tempfile.mkdtemp() + "/model", {"w": torch.ones(2), "step": 3})
>>> read_state(folder)["step"]
3
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from megaclass import staging

__all__ = [
    "MANIFEST",
    "STREAM_CHUNK_BYTES",
    "DamagedStateError",
    "RowSource",
    "SavedTensor",
    "StackedRows",
    "copy_into_",
    "file_fingerprint",
    "flatten",
    "folder_bytes",
    "format_bytes",
    "free_bytes",
    "fsync_path",
    "link_state",
    "path_fingerprint",
    "piece_fingerprint",
    "read_state",
    "read_tensors",
    "replace_folder",
    "row_blocks",
    "unflatten",
    "verify_manifest",
    "write_json_atomic",
    "write_manifest",
    "write_state",
    "write_tensors",
]

MANIFEST = "manifest.json"
STREAM_CHUNK_BYTES = 256 << 20  # host memory a tensor is written or read through: one block of rows
_TENSORS = "tensors.safetensors"
_STATE = "state.json"
_CHUNK_BYTES = 1 << 20
_PIECE_BYTES = 64 << 20  # a file is checksummed in pieces of this many bytes, hashed side by side
_READ_BYTES = 4 << 20  # a hashing thread reads its piece this much at a time
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on the JSON header


class DamagedStateError(ValueError):
    """A state folder's files do not match its manifest (or it has none): truncated, altered or unfinished.

    The message names the folder, the file and what differs.
    """


# ------------------------------------------------------------------------------------------ nested state


def flatten(state: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor | RowSource]]:
    """Split ``state`` into a JSON-able tree and the tensors it references (the state's own, not copies: a
    writer reads them block by block, so write them before the state changes).

    Dicts (any hashable keys), lists, tuples, numbers, strings, None, numpy arrays, tensors and
    :class:`RowSource` handles are allowed. Non-string dict keys and tuples are tagged so that
    :func:`unflatten` gives back the same Python values.
    """
    tensors: dict[str, Tensor | RowSource] = {}
    tree = _flatten(state, prefix, tensors)
    return tree, tensors


def _child(key: str, name: Any, index: int) -> str:
    part = name if isinstance(name, str) else f"#{index}"
    return f"{key}.{part}" if key else part


def _store(tensors: dict[str, Tensor | RowSource], key: str, tensor: Tensor | RowSource) -> str:
    if key in tensors:  # two paths spelled alike ("a.b" inside "x" vs "b" inside "x.a"): keep both
        key = f"{key}~{len(tensors)}"
    tensors[key] = tensor
    return key


def _flatten(value: Any, key: str, tensors: dict[str, Tensor | RowSource]) -> Any:
    if isinstance(value, (Tensor, RowSource)):
        return {"__tensor__": _store(tensors, key, value.detach() if isinstance(value, Tensor) else value)}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _store(tensors, key, torch.from_numpy(np.ascontiguousarray(value).copy()))}
    if isinstance(value, dict):
        items = [
            [
                _flatten(name, _child(key, f"#key{i}", i), tensors),
                _flatten(item, _child(key, name, i), tensors),
            ]
            for i, (name, item) in enumerate(value.items())
        ]
        return {"__dict__": items}
    if isinstance(value, (list, tuple)):
        items = [_flatten(item, _child(key, i, i), tensors) for i, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"checkpoint state at {key!r}: cannot store a {type(value).__name__}")


def unflatten(tree: Any, tensors: Mapping[str, Tensor | RowSource]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            array = tensors[tree["__ndarray__"]]
            return (array.read() if isinstance(array, RowSource) else array).numpy()
        if "__tuple__" in tree:
            return tuple(unflatten(item, tensors) for item in tree["__tuple__"])
        if "__dict__" in tree:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in tree["__dict__"]}
        raise ValueError(f"checkpoint state: unexpected mapping {sorted(tree)!r}")
    if isinstance(tree, list):
        return [unflatten(item, tensors) for item in tree]
    return tree


# ------------------------------------------------------------------------------------------- checksums


def file_fingerprint(path: str) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of the file at ``path``, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _hash_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _sha256(data: Any) -> bytes:
    return hashlib.sha256(data).digest()


class _PieceDigest:
    """The checksum of :func:`piece_fingerprint` of bytes given in order: whole pieces go to ``pool`` (hashing
    frees the GIL), a piece cut by the blocks' edges is hashed in the caller as its parts come."""

    def __init__(self, pool: ThreadPoolExecutor, piece_bytes: int = _PIECE_BYTES) -> None:
        self._pool, self._piece_bytes = pool, piece_bytes
        self._digests: list[Future | bytes] = []
        self._current, self._filled, self.size = hashlib.sha256(), 0, 0

    def update(self, data: Any) -> list[Future]:
        """Hash ``data`` (bytes or a uint8 array); the futures of its whole pieces, which read ``data``: wait
        for them before its memory is reused."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        started = []
        while len(view):
            take = min(self._piece_bytes - self._filled, len(view))
            if self._filled == 0 and take == self._piece_bytes:
                started.append(self._pool.submit(_sha256, view[:take]))
                self._digests.append(started[-1])
            else:
                self._current.update(view[:take])
                self._filled += take
                if self._filled == self._piece_bytes:
                    self._close_piece()
            view = view[take:]
        return started

    def _close_piece(self) -> None:
        self._digests.append(self._current.digest())
        self._current, self._filled = hashlib.sha256(), 0

    def fingerprint(self) -> dict[str, Any]:
        if self._filled:
            self._close_piece()
        pieces = [d.result() if isinstance(d, Future) else d for d in self._digests]
        return _pieces_fingerprint(self.size, pieces, self._piece_bytes)


def _pieces_fingerprint(size: int, pieces: list[bytes], piece_bytes: int) -> dict[str, Any]:
    """:func:`piece_fingerprint`'s record of a file of ``size`` bytes from its pieces' digests, in order."""
    digest = hashlib.sha256(b"".join(pieces)).hexdigest()
    return {"size": size, "sha256_pieces": digest, "piece_bytes": piece_bytes}


def piece_fingerprint(path: str, *, piece_bytes: int = _PIECE_BYTES) -> dict[str, Any]:
    """``{"size", "sha256_pieces", "piece_bytes"}`` of the file at ``path``: the SHA-256 of the SHA-256
    digests of its ``piece_bytes`` pieces in order (of none, for an empty file), the pieces read and hashed
    by several threads at once, each a few MiB at a time."""
    size = os.path.getsize(path)

    def piece(start: int) -> bytes:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as file:
            file.seek(start)
            left = min(piece_bytes, size - start)
            while left > 0:
                chunk = file.read(min(_READ_BYTES, left))
                if not chunk:
                    raise DamagedStateError(f"{path}: ends before its {size} bytes")
                digest.update(chunk)
                left -= len(chunk)
        return digest.digest()

    with ThreadPoolExecutor(_hash_threads(), thread_name_prefix="sha256") as pool:
        pieces = list(pool.map(piece, range(0, size, piece_bytes)))
    return _pieces_fingerprint(size, pieces, piece_bytes)


def path_fingerprint(path: str) -> dict[str, Any]:
    """:func:`file_fingerprint` of a file; of a folder (an image folder may hold millions of files), the total
    size of its files and the SHA-256 of its listing: each file's relative path and size."""
    if not os.path.isdir(path):
        return file_fingerprint(path)
    digest = hashlib.sha256()
    total = 0
    for relative in _files_under(path, skip_manifest=False):
        size = os.path.getsize(os.path.join(path, relative))
        digest.update(f"{relative}\t{size}\n".encode())
        total += size
    return {"size": total, "sha256": digest.hexdigest()}


def format_bytes(count: float) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``512 B``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def folder_bytes(folder: str) -> int:
    """Bytes of every file under ``folder``."""
    names = _files_under(folder, skip_manifest=False)
    return sum(os.path.getsize(os.path.join(folder, name)) for name in names)


def free_bytes(path: str) -> int:
    """Free bytes on the file system ``path`` is (or, not made yet, would be) on."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def _files_under(folder: str, *, skip_manifest: bool = True) -> list[str]:
    """Every file under ``folder`` (but its manifest), relative to it (``/``-separated, sorted)."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST or not skip_manifest:
                found.append(relative)
    return sorted(found)


def write_manifest(folder: str, *, fingerprints: Mapping[str, dict[str, Any]] | None = None) -> None:
    """Write ``folder/manifest.json``: the size and :func:`piece_fingerprint` of every file under ``folder``,
    after syncing each to disk (a manifest never vouches for bytes still in the page cache only).

    Args:
        fingerprints: relative path -> :func:`piece_fingerprint` of files hashed while they were written
            (:func:`write_tensors`); they are synced, not read again.
    """
    fingerprints = fingerprints or {}
    files = {}
    for relative in _files_under(folder):
        path = os.path.join(folder, relative)
        fsync_path(path)
        files[relative] = fingerprints.get(relative) or piece_fingerprint(path)
    write_json_atomic(os.path.join(folder, MANIFEST), {"files": files})


def verify_manifest(folder: str) -> None:
    """Check every file that ``folder/manifest.json`` lists against its size and checksum (its
    :func:`piece_fingerprint`, or the whole file's SHA-256 in manifests written before those).

    Raises:
        DamagedStateError: the manifest is missing or unreadable, or a file is missing, of another size
            (truncated) or of other content.
    """
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as file:
            files = json.load(file)["files"]
    except FileNotFoundError:
        raise DamagedStateError(
            f"{folder}: no {MANIFEST} (unfinished, or written before manifests)"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedStateError(f"{folder}/{MANIFEST}: unreadable ({error})") from None
    for relative, expected in files.items():
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            raise DamagedStateError(f"{folder}: {relative} is missing")
        size = os.path.getsize(path)
        if size != expected["size"]:
            raise DamagedStateError(
                f"{folder}: {relative} has {size} bytes, the manifest says {expected['size']} (truncated?)"
            )
        if "sha256_pieces" in expected:
            found = piece_fingerprint(path, piece_bytes=int(expected["piece_bytes"]))["sha256_pieces"]
            same = found == expected["sha256_pieces"]
        else:
            same = file_fingerprint(path)["sha256"] == expected["sha256"]
        if not same:
            raise DamagedStateError(f"{folder}: {relative} differs from its checksum in the manifest")


# ------------------------------------------------------------------------------------ streamed tensors

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def row_blocks(length: int, row_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` blocks of ``length`` rows of ``row_bytes``, each at most ``chunk_bytes`` (or one
    row)."""
    rows = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, length, rows):
        yield start, min(start + rows, length)


class RowSource(abc.ABC):
    """A tensor read a block of rows at a time from where it lives (a file, a server): ``source[a:b]`` reads
    rows ``[a, b)`` as a new CPU tensor, :meth:`read` all of it.

    It answers ``shape``, ``dtype``, ``dim()``, ``numel()`` and ``len()`` like a tensor: :func:`flatten` keeps
    it as a tensor of the state, :func:`write_tensors` writes it block by block and :func:`copy_into_` streams
    it into an existing tensor. A subclass sets ``shape`` and ``dtype`` and implements :meth:`read_rows`.
    """

    shape: torch.Size
    dtype: torch.dtype

    @abc.abstractmethod
    def read_rows(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` (inside the tensor; a 0-d tensor is one row) as a CPU tensor of
        :attr:`dtype`."""

    @property
    def row_bytes(self) -> int:
        """Bytes of one row."""
        return math.prod(self.shape[1:]) * _element_bytes(self.dtype)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError(f"len() of a 0-d {type(self).__name__}")
        return self.shape[0]

    def __getitem__(self, rows: slice) -> Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1) or not self.shape:
            raise TypeError(f"{self!r}: only a row range source[start:stop] is read, got [{rows!r}]")
        start, stop, _ = rows.indices(self.shape[0])
        return self._checked(start, max(start, stop))

    def read(self) -> Tensor:
        """The whole tensor, in host memory."""
        return self._checked(0, self.shape[0] if self.shape else 1).reshape(self.shape)

    def _checked(self, start: int, stop: int) -> Tensor:
        """:meth:`read_rows`, checked to be the rows asked for, contiguous on the CPU."""
        block = self.read_rows(start, stop)
        expected = (stop - start, *self.shape[1:])
        if tuple(block.shape) != expected or block.dtype != self.dtype:
            raise ValueError(
                f"{self!r}: rows [{start}, {stop}) came as {block.dtype} of shape {tuple(block.shape)}, "
                f"expected {self.dtype} of shape {expected}"
            )
        return block.to("cpu").contiguous()


class SavedTensor(RowSource):
    """A tensor inside a safetensors file, read when asked (a :class:`RowSource`); its file must stay in place
    while it is used. :func:`read_tensors` and :func:`read_state` hand these out for the keys their ``stream``
    argument names; :func:`copy_into_` reads one straight into a contiguous CPU tensor of its dtype.
    """

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path, self.offset = path, offset
        self.shape, self.dtype = torch.Size(shape), dtype

    def __repr__(self) -> str:
        return f"SavedTensor({self.path!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def read_rows(self, start: int, stop: int) -> Tensor:
        block = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)  # (rows, ...)
        self._read_into(start, block)
        return block

    def _read_into(self, start: int, out: Tensor) -> None:
        """Read rows from ``start`` on into the contiguous CPU tensor ``out`` (as many as it holds)."""
        assert out.is_contiguous() and out.device.type == "cpu" and out.dtype == self.dtype
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as file:
            file.seek(self.offset + start * self.row_bytes)
            done = 0
            while done < len(view):
                count = file.readinto(view[done:])
                if not count:
                    raise DamagedStateError(f"{self.path}: the file ends inside tensor data (truncated?)")
                done += count


class StackedRows(RowSource):
    """Row ranges of several tensors stacked along their first dimension, read when asked (a
    :class:`RowSource`): one tensor of a state split over files, written whole without a copy of it.

    Args:
        parts: ``(source, start, stop)``: rows ``[start, stop)`` of ``source`` (a tensor or a RowSource of
            at least one dimension), in order; all of one dtype and one shape past their first dimension.
    """

    def __init__(self, parts: Sequence[tuple[Tensor | RowSource, int, int]]) -> None:
        if not parts:
            raise ValueError("StackedRows: no parts")
        first = parts[0][0]
        self.dtype, trailing = first.dtype, tuple(first.shape[1:])
        self.parts: list[tuple[Tensor | RowSource, int, int, int]] = []  # (source, start, stop, global start)
        length = 0
        for source, start, stop in parts:
            if not source.shape or source.dtype != self.dtype or tuple(source.shape[1:]) != trailing:
                raise ValueError(
                    f"StackedRows: a part of {source.dtype} {tuple(source.shape)} does not stack on "
                    f"{self.dtype} rows of shape {trailing}"
                )
            if not 0 <= start <= stop <= source.shape[0]:
                raise ValueError(f"StackedRows: rows [{start}, {stop}) outside a part of {source.shape[0]}")
            self.parts.append((source, start, stop, length))
            length += stop - start
        self.shape = torch.Size((length, *trailing))

    def __repr__(self) -> str:
        return f"StackedRows({len(self.parts)} parts, shape={tuple(self.shape)}, dtype={self.dtype})"

    def read_rows(self, start: int, stop: int) -> Tensor:
        pieces = []
        for source, first, last, offset in self.parts:
            low, high = max(start, offset), min(stop, offset + last - first)
            if low < high:
                piece = source[first + low - offset : first + high - offset]
                pieces.append(piece.detach().to("cpu") if isinstance(piece, Tensor) else piece)
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces) if pieces else torch.empty((0, *self.shape[1:]), dtype=self.dtype)


def _byte_blocks(
    value: Tensor | RowSource, chunk_bytes: int, *, offset: int = 0, piece_bytes: int = _PIECE_BYTES
) -> Iterator[np.ndarray]:
    """The bytes of ``value`` in row-major order, a block of at most ``chunk_bytes`` at a time: a contiguous
    host tensor's own, else copied into one staging block that each block reuses once the caller has written
    the previous one (a GPU tensor's page-locked, :func:`~megaclass.staging.page_locked`, always of
    ``chunk_bytes``: one size for torch's pinned-memory cache, whatever the tensors).

    A contiguous tensor is cut where the file's checksum pieces begin (``offset``: the file offset of its
    first byte; ``piece_bytes``: :func:`piece_fingerprint`'s), so that its whole pieces are hashed side by
    side (:class:`_PieceDigest`); others, a block of rows (at most ``chunk_bytes``, or one row) at a time.
    """
    if isinstance(value, Tensor) and value.is_contiguous():
        flat = value.detach().reshape(-1)
        if flat.stride(0) != 1:  # one element through a stride of 0 (an expanded scalar) is contiguous too
            flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
        yield from _aligned_blocks(flat.view(torch.uint8), chunk_bytes, offset, piece_bytes)
        return
    shape = tuple(value.shape)
    row_bytes = math.prod(shape[1:]) * _element_bytes(value.dtype)
    on_gpu = isinstance(value, Tensor) and value.is_cuda
    buffer: Tensor | None = None
    for start, stop in row_blocks(shape[0] if shape else 1, row_bytes, chunk_bytes):  # a source's 0-d: a row
        if isinstance(value, RowSource):
            block = value._checked(start, stop)
        else:
            block = value[start:stop].detach()
            if buffer is None:  # the first block is the largest
                buffer = _staging_block(
                    len(block), shape[1:], block.dtype, cuda=on_gpu, chunk_bytes=chunk_bytes
                )
            block = buffer[: len(block)].copy_(block)
        yield block.reshape(-1).view(torch.uint8).numpy()


def _aligned_blocks(data: Tensor, chunk_bytes: int, offset: int, piece_bytes: int) -> Iterator[np.ndarray]:
    """The bytes ``data (n,)`` (uint8, at file offset ``offset``) a block at a time; where a block holds whole
    pieces of ``piece_bytes``, the blocks end where pieces do. A device's bytes cross through one staging
    block (page-locked for a GPU's)."""
    if not len(data):
        return
    on_host = data.device.type == "cpu"
    block_bytes, first = chunk_bytes, chunk_bytes
    if chunk_bytes >= piece_bytes:  # whole pieces a block, after one up to the first piece's end
        block_bytes = chunk_bytes // piece_bytes * piece_bytes
        first = (-offset) % piece_bytes or block_bytes
    cuts = [0, *range(min(first, len(data)), len(data), block_bytes), len(data)]
    buffer: Tensor | None = None
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        block = data[start:stop]
        if not on_host:
            if buffer is None:  # no block is larger than the second (or a lone first)
                size = min(len(data), block_bytes)
                buffer = _staging_block(size, (), torch.uint8, cuda=data.is_cuda, chunk_bytes=chunk_bytes)
            block = buffer[: len(block)].copy_(block)
        yield block.numpy()


def _staging_block(
    rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, *, cuda: bool, chunk_bytes: int
) -> Tensor:
    """The host buffer a device tensor's blocks cross: page-locked for a GPU's, of one block size whatever the
    tensor (:func:`~megaclass.staging.page_locked`), plain for another device's."""
    if cuda:
        return staging.page_locked(rows, row_shape, dtype, block_bytes=chunk_bytes)
    return torch.empty((rows, *row_shape), dtype=dtype)


def write_tensors(
    path: str,
    tensors: Mapping[str, Tensor | RowSource],
    *,
    metadata: Mapping[str, str] | None = None,
    chunk_bytes: int = STREAM_CHUNK_BYTES,
) -> dict[str, Any]:
    """Write ``tensors`` as the safetensors file ``path``, each streamed a block at a time from where it
    lives (GPU, host memory, another file or any :class:`RowSource`), through a temporary file and a
    rename.

    The host memory taken is one block of ``chunk_bytes``; nothing is copied whole.

    Returns:
        The file's :func:`piece_fingerprint`, hashed while writing.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, value in tensors.items():
        if value.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: cannot store dtype {value.dtype}")
        size = value.numel() * _element_bytes(value.dtype)
        header[name] = {
            "dtype": _DTYPE_NAMES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with (
        _replacing(path, "wb", suffix=".safetensors") as file,
        ThreadPoolExecutor(_hash_threads(), thread_name_prefix="sha256") as pool,
    ):
        digest = _PieceDigest(pool)
        for piece in (len(encoded).to_bytes(8, "little"), encoded):
            file.write(piece)
            digest.update(piece)
        start = file.tell()
        for name, value in tensors.items():
            _write_blocks(
                file, digest, _byte_blocks(value, chunk_bytes, offset=start + header[name]["data_offsets"][0])
            )
        return digest.fingerprint()


def _write_blocks(file: Any, digest: _PieceDigest, blocks: Iterator[np.ndarray]) -> None:
    """Write and hash ``blocks`` in order; no reference to the last is left once written, so that the next
    tensor's staging block is the same one, not a second beside it."""
    for block in blocks:
        hashing = digest.update(block)  # whole pieces hashed by the pool while the block is written
        file.write(block)
        for future in hashing:  # before the block's staging memory is reused
            future.result()


def read_tensors(
    path: str, *, stream: Callable[[str], bool] | None = None
) -> dict[str, Tensor | SavedTensor]:
    """The tensors of the safetensors file ``path``, in its order; those whose name ``stream`` accepts as
    :class:`SavedTensor` handles (read later, block by block), the others read now.

    Raises:
        DamagedStateError: the header is unreadable or the file is shorter than the header says.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        header_bytes = int.from_bytes(file.read(8), "little")
        if not 0 < header_bytes <= min(_MAX_HEADER_BYTES, file_size - 8):
            raise DamagedStateError(f"{path}: not a safetensors file (header of {header_bytes} bytes)")
        try:
            header = json.loads(file.read(header_bytes))
        except ValueError as error:
            raise DamagedStateError(f"{path}: unreadable safetensors header ({error})") from None
    start = 8 + header_bytes
    tensors: dict[str, Tensor | SavedTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise DamagedStateError(f"{path}: tensor {name!r} has an unreadable header entry") from None
        if end - begin != math.prod(shape) * _element_bytes(dtype) or start + end > file_size:
            raise DamagedStateError(
                f"{path}: tensor {name!r} takes bytes [{begin}, {end}) of data, which the file "
                f"({file_size - start} bytes of data) or its shape {list(shape)} contradicts (truncated?)"
            )
        saved = SavedTensor(path, start + begin, shape, dtype)
        tensors[name] = saved if stream is not None and stream(name) else saved.read()
    return tensors


@torch.no_grad()
def copy_into_(target: Tensor, source: Tensor | RowSource, *, chunk_bytes: int = STREAM_CHUNK_BYTES) -> None:
    """``target.copy_(source)``; a :class:`RowSource` is streamed a block of rows at a time (a
    :class:`SavedTensor` read straight into ``target`` when that is a contiguous CPU tensor of its dtype).

    Raises:
        ValueError: the shapes differ.
    """
    if tuple(source.shape) != tuple(target.shape):
        raise ValueError(f"copy: expected shape {tuple(target.shape)}, got {tuple(source.shape)}")
    if isinstance(source, Tensor):
        target.copy_(source)
        return
    if target.dim() == 0:
        target.copy_(source.read())
        return
    direct = (
        isinstance(source, SavedTensor)
        and target.device.type == "cpu"
        and target.is_contiguous()
        and target.dtype == source.dtype
    )
    for start, stop in row_blocks(len(source), source.row_bytes, chunk_bytes):
        if direct:
            source._read_into(start, target[start:stop])
        else:
            target[start:stop].copy_(source[start:stop])


# -------------------------------------------------------------------------------------- atomic writes


def fsync_path(path: str) -> None:
    """Flush the file or folder at ``path`` to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same folder and a rename."""
    with _replacing(path, "w", suffix=".json") as file:
        json.dump(data, file, indent=1)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and a rename."""
    with _replacing(path, "w", suffix=".txt") as file:
        file.write(text)


@contextlib.contextmanager
def _replacing(path: str, mode: str, *, suffix: str) -> Iterator[IO]:
    """A file opened in ``mode`` that replaces ``path`` once written and flushed to disk; on an error it is
    removed and ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".tmp-{os.urandom(8).hex()}{suffix}")
    # created as open() creates files (0666 less the umask), not mkstemp's 0600, which the rename would keep
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def replace_folder(temporary: str, final: str) -> None:
    """Rename the finished folder ``temporary`` to ``final``.

    A folder cannot be renamed over a full one: a previous ``final`` is first moved to
    ``.old-<name>-*/<name>`` beside it and removed once the new one is in place. A kill between the two
    renames leaves it whole there, where a reader that knows this layout finds it.
    """
    parent, name = os.path.split(os.path.abspath(final))
    previous = None
    if os.path.exists(final):
        previous = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
        os.replace(final, os.path.join(previous, name))
    os.replace(temporary, final)
    fsync_path(parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def _staged_folder(folder: str) -> Iterator[str]:
    """A temporary folder beside ``folder`` to fill; renamed to ``folder`` (:func:`replace_folder`) when the
    block ends, removed if it raises."""
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        yield temporary
        replace_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_state(folder: str, state: Any, *, chunk_bytes: int = STREAM_CHUNK_BYTES) -> str:
    """Write ``state`` to ``folder`` (tensors, JSON, manifest) under a temporary name, then rename it into
    place; returns the folder's absolute path.

    Its tensors are streamed (:func:`write_tensors`): the host memory it takes is one block of
    ``chunk_bytes``, not a copy of the state.
    """
    folder = os.path.abspath(folder)
    with _staged_folder(folder) as temporary:
        tree, tensors = flatten(state)
        fingerprint = write_tensors(os.path.join(temporary, _TENSORS), tensors, chunk_bytes=chunk_bytes)
        with open(os.path.join(temporary, _STATE), "w", encoding="utf-8") as file:
            json.dump(tree, file)
        write_manifest(temporary, fingerprints={_TENSORS: fingerprint})
    return folder


def link_state(source: str, folder: str) -> str:
    """``folder`` holding the files of the state folder ``source`` as hard links (copies where the file
    system makes none), renamed into place as :func:`write_state` does; returns its absolute path. Linked,
    the same state under two names takes the disk room and the write time of one."""
    folder = os.path.abspath(folder)
    with _staged_folder(folder) as temporary:
        folders = set()
        for relative in _files_under(source, skip_manifest=False):
            target = os.path.join(temporary, relative)
            folders.add(os.path.dirname(target))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(os.path.join(source, relative), target)
            except OSError:
                shutil.copy2(os.path.join(source, relative), target)
                fsync_path(target)
        for path in folders:  # the new entries reach the disk before the rename publishes them
            fsync_path(path)
    return folder


def read_state(folder: str, *, verify: bool = True, stream: Callable[[str], bool] | None = None) -> Any:
    """The state written by :func:`write_state` in ``folder``.

    Args:
        verify: check the files against the folder's manifest first (a folder without one is read as is).
        stream: given a tensor's key (its dotted path in the state, as :func:`flatten` names it, e.g.
            ``head.store.weight``), whether it comes back as a :class:`SavedTensor` to stream into place
            rather than read into memory now.

    Raises:
        DamagedStateError: ``verify`` and a file differs from the manifest.
    """
    if verify and os.path.exists(os.path.join(folder, MANIFEST)):
        verify_manifest(folder)
    tensors = read_tensors(os.path.join(folder, _TENSORS), stream=stream)
    with open(os.path.join(folder, _STATE), encoding="utf-8") as file:
        tree = json.load(file)
    return unflatten(tree, tensors)
