"""Column order of a fixed fan-in index: its connections sorted by input column (a CSC view), per chunk.

The input gradient ``dx[b, d]`` sums the contributions of every connection that reads column ``d``. The
Triton backward pass writes each connection's contribution (or the label's ``dz`` row, which a per-label
connection scales by its weight) into a ``(rows, B)`` buffer, one chunk of labels at a time, and a second
kernel sums, for each column, the rows listed here: a deterministic segmented reduction instead of
``B * C * K / G`` atomic adds. The CPU launchers read each chunk's transposed weights (a CSR matrix) from it.
The order depends on the index only, so it is built once per topology (a rewiring changes the index in
place, which bumps its version) and cached.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CHUNK_ROWS", "LABEL_TILE", "ColumnOrder", "cached_bytes", "column_order", "grouped_tiles"]

_CACHE_ENTRIES = 4  # topologies kept at once (a head's index, a test's, ...)
_MAX_DOT_K = 256  # the grouped kernels hold a group's whole (G, K) weight tile
LABEL_TILE = 32  # labels a tile of the per-label kernels (a grouped tile is one group)
# the kernels' input-gradient buffer rows a chunk of labels: (rows, B), 128 MiB at B 128 in bf16
CHUNK_ROWS = 1 << 19


def grouped_tiles(group: int, fan_in: int) -> bool:
    """Whether the Triton kernels run a group's labels as one tensor-core tile (power-of-two ``G >= 16``,
    ``K <= 256``): their column order then lists index-row connections, else each label's."""
    return group >= 16 and group & (group - 1) == 0 and fan_in <= _MAX_DOT_K


@dataclass(frozen=True)
class ColumnOrder:
    """Connections sorted by ``(chunk, column)``.

    Attributes:
        perm: ``(N,)`` connection ids (``row * K + k`` over the rows of the connection table) in column
            order within each chunk; int32 when ``N < 2^31``, else int64.
        colptr: ``(chunks * D + 1,)`` int64: chunk ``i``'s connections into column ``d`` are
            ``perm[colptr[i * D + d] : colptr[i * D + d + 1]]``.
        rows_per_chunk: rows of the connection table per chunk (labels, or groups).
        chunks: number of chunks.
    """

    perm: Tensor
    colptr: Tensor
    rows_per_chunk: int
    chunks: int


def _build(index: Tensor, *, classes: int, group: int, dim: int, per_label: bool, rows_per_chunk: int):
    """Sort each chunk's connections by column; ``per_label`` expands groups to ``C`` label rows."""
    # deliberate host sync, once per topology: out-of-range columns would corrupt the column pointers
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= dim:
        raise ValueError(f"index: expected input columns in [0, {dim}), got values in [{low}, {high}]")
    fan_in = index.shape[1]
    rows = classes if per_label else index.shape[0]
    chunks = -(-rows // rows_per_chunk)
    total = rows * fan_in
    perm_dtype = torch.int32 if total < 2**31 else torch.int64
    perm = torch.empty(total, dtype=perm_dtype, device=index.device)
    counts = torch.empty(chunks, dim, dtype=torch.int64, device=index.device)
    for chunk in range(chunks):  # chunk by chunk: the sort's scratch memory stays one chunk's size
        start, stop = chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, rows)
        if per_label and group > 1:
            labels = torch.arange(start, stop, device=index.device)
            cols = index[labels // group].reshape(-1)  # (n * K,)
        else:
            cols = index[start:stop].reshape(-1)  # (n * K,)
        order = torch.argsort(cols, stable=True)  # stable: a fixed summation order, deterministic dx
        perm[start * fan_in : stop * fan_in] = (order + start * fan_in).to(perm_dtype)
        counts[chunk] = torch.bincount(cols.long(), minlength=dim)
    colptr = torch.zeros(chunks * dim + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(counts.reshape(-1), 0, out=colptr[1:])
    return ColumnOrder(perm=perm, colptr=colptr, rows_per_chunk=rows_per_chunk, chunks=chunks)


_cache: dict[int, tuple[weakref.ref, int, tuple[int, ...], ColumnOrder]] = {}


def column_order(
    index: Tensor, *, classes: int, group: int, dim: int, per_label: bool, rows_per_chunk: int
) -> ColumnOrder:
    """The column order of ``index (ceil(C / G), K)``, cached while the tensor lives and is not modified.

    Args:
        classes: ``C``.
        group: ``G``, labels per index row.
        dim: ``D``, the number of input columns.
        per_label: connections are ``(label, k)`` pairs (``C * K`` of them, the per-label kernels) rather than
            ``(group, k)`` pairs (``ceil(C / G) * K``, the grouped tensor-core kernels).
        rows_per_chunk: labels (``per_label``) or groups per chunk of the backward pass's buffer.
    """
    params = (classes, group, dim, int(per_label), rows_per_chunk, index.shape[0], index.shape[1])
    key = id(index)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is index and entry[1] == index._version and entry[2] == params:
        return entry[3]
    order = _build(
        index, classes=classes, group=group, dim=dim, per_label=per_label, rows_per_chunk=rows_per_chunk
    )

    def forget(ref: weakref.ref, key: int = key) -> None:
        if key in _cache and _cache[key][0] is ref:
            del _cache[key]

    while len(_cache) >= _CACHE_ENTRIES:
        del _cache[next(iter(_cache))]
    _cache[key] = (weakref.ref(index, forget), index._version, params, order)
    return order


def cached_bytes(index: Tensor) -> int:
    """Bytes of the column order cached for ``index`` (0 while none is)."""
    entry = _cache.get(id(index))
    if entry is None or entry[0]() is not index:
        return 0
    order = entry[3]
    return order.perm.numel() * order.perm.element_size() + order.colptr.numel() * order.colptr.element_size()
