"""Copies between a GPU and pageable host memory through page-locked buffers of bounded size.

A plain copy between a GPU and pageable host memory crosses through the driver's own staging, and into
fresh host memory it also takes one page fault at a time: on an H200 host, 10 GB of rows drawn on the GPU
took 10.3 s to reach fresh pageable memory that way and 0.84 s through a page-locked buffer (the bus at its
speed, then torch's multi-threaded host copy); reading them back to the GPU, 1.58 s plain. Page-locking the
whole matrix instead takes seconds of its own (10 s for 10 GB) and torch's pinned allocator rounds it up to
a power of two of bytes.

Torch keeps a freed page-locked block for reuse by requests of its own power-of-two size, for the rest of
the process: buffers of many sizes (a checkpoint's tensors, each staged on its way to a file) would each
leave one behind, host memory growing with the sizes of the tensors staged. Every buffer here is cut from a
block of :data:`STAGING_BYTES` (:func:`page_locked`; a checkpoint's, of its block size), so the same few
blocks serve them all.

Rows a GPU reads and writes a few at a time, every step, need no copies at all: :func:`map_to_device`
page-locks them where they are and hands back a device tensor over the same memory, which the GPU's kernels
read and write across the bus (CUDA's mapped host memory through unified addressing).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["STAGING_BYTES", "blocks_to_device", "copy_rows_", "map_to_device", "page_locked"]

STAGING_BYTES = 64 << 20  # a page-locked buffer: large enough for the bus's speed, small enough to lock fast


def page_locked(
    rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, *, block_bytes: int | None = None
) -> Tensor:
    """A page-locked ``(rows, *row_shape)`` buffer of ``dtype``, the start of a block of ``block_bytes``
    (:data:`STAGING_BYTES` when None; of its own size where it needs more): one size of block, whatever the
    buffers' shapes, for torch's pinned-memory cache to reuse."""
    size = rows * math.prod(row_shape) * dtype.itemsize
    block = _page_locked_bytes(max(size, STAGING_BYTES if block_bytes is None else block_bytes))
    return block[:size].view(dtype).view(rows, *row_shape)


def _page_locked_bytes(size: int) -> Tensor:
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


def _staged(host: Tensor, device: torch.device) -> bool:
    """Whether copies between pageable ``host`` rows and ``device`` go through a page-locked buffer."""
    return device.type == "cuda" and host.device.type == "cpu" and not host.is_pinned()


def _block_rows(rows: Tensor) -> int:
    row_bytes = max(1, rows[:1].numel() * rows.element_size())
    return max(1, STAGING_BYTES // row_bytes)


def copy_rows_(destination: Tensor, source: Tensor) -> Tensor:
    """``destination.copy_(source)`` for rows of the same shape; from a GPU into pageable host memory through
    a page-locked buffer, a block of rows at a time (converted to ``destination``'s dtype on the GPU first).
    """
    if destination.shape != source.shape:
        raise ValueError(f"shapes differ: {tuple(destination.shape)} and {tuple(source.shape)}")
    if not _staged(destination, source.device) or destination.dim() == 0:
        return destination.copy_(source)
    source = source.to(destination.dtype)
    step = _block_rows(destination)
    buffer = page_locked(min(step, len(source)), tuple(source.shape[1:]), source.dtype)
    for start in range(0, len(source), step):
        block = source[start : start + step]
        staged = buffer[: len(block)].copy_(block)  # waits for the copy: the buffer is read next
        destination[start : start + len(block)].copy_(staged)
    return destination


def blocks_to_device(rows: Any, device: torch.device | str, block_rows: int) -> Iterator[Tensor]:
    """``rows[start : start + block_rows]`` on ``device`` for each block in order, each block enqueued on
    the current stream; ``rows``: a tensor, or any sized object whose row slices are tensors. Pageable host
    rows for a GPU cross through two page-locked buffers of at most :data:`STAGING_BYTES` each: the host fills
    one while the other's copy runs."""
    device = torch.device(device)
    if not isinstance(rows, Tensor) or not _staged(rows, device):
        for start in range(0, rows.shape[0], block_rows):
            yield rows[start : start + block_rows].to(device, non_blocking=True)
        return
    piece = min(block_rows, rows.shape[0], _block_rows(rows))  # rows a buffer holds
    buffers = [page_locked(piece, tuple(rows.shape[1:]), rows.dtype) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    stream = torch.cuda.current_stream(device)
    pieces = 0
    for start in range(0, rows.shape[0], block_rows):
        block = rows[start : start + block_rows]
        moved = torch.empty(block.shape, dtype=block.dtype, device=device)
        for begin in range(0, len(block), piece):
            slot = pieces % 2
            pieces += 1
            if copied[slot] is not None:
                copied[slot].synchronize()  # the buffer's previous piece has crossed
            part = block[begin : begin + piece]
            staged = buffers[slot][: len(part)].copy_(part)
            moved[begin : begin + len(part)].copy_(staged, non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record(stream)
        yield moved


_REGISTER_PORTABLE_MAPPED = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped


class _LockedHost:
    """``host``'s memory as a CUDA array (``__cuda_array_interface__``, bytes): the device tensor made from it
    holds this object for as long as its storage lives, and when it goes the memory is unlocked (after the
    device's work, which may still read it)."""

    def __init__(self, host: Tensor, device: torch.device) -> None:
        self.host, self.device = host, device
        size = host.numel() * host.element_size()
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (host.data_ptr(), False),  # with unified addressing the host address is the device's
            "version": 3,
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone: nothing left to unlock
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())


def map_to_device(host: Tensor, device: torch.device | str) -> Tensor | None:
    """A tensor on the CUDA ``device`` over ``host``'s memory: ``host`` (contiguous, in host memory) is
    page-locked in place (no copy, no rounding of its size) and the GPU's kernels read and write it across
    the bus, so a step that touches a few of its rows needs neither copies nor the host (and can be captured
    in a CUDA graph). The memory stays locked while the returned tensor lives; ``host``'s own values change
    as the GPU writes them (read them after the device's work is done). None, with a warning, where CUDA
    refuses to lock it (more than the system lets a process lock).

    Raises:
        ValueError: ``host`` is not a contiguous host tensor, or ``device`` is not a CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda" or host.device.type != "cpu" or not host.is_contiguous():
        raise ValueError(
            f"map_to_device: expected a contiguous host tensor and a CUDA device, got a "
            f"{'contiguous' if host.is_contiguous() else 'non-contiguous'} {host.device} tensor and {device}"
        )
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    size = host.numel() * host.element_size()
    if size == 0:
        return torch.empty(host.shape, dtype=host.dtype, device=device)
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(host.data_ptr(), size, _REGISTER_PORTABLE_MAPPED))
    if error != 0:
        why = cudart.cudaGetErrorString(cudart.cudaError(error))
        _take_last_error(device)
        warnings.warn(
            f"CUDA could not page-lock {size / 2**30:.2f} GiB of host memory ({why}): a step's rows are "
            "copied instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    mapped = torch.as_tensor(_LockedHost(host, device), device=device)  # (bytes,) over host's memory
    return mapped.view(host.dtype).view(host.shape)


def _take_last_error(device: torch.device) -> None:
    """A refused ``cudaHostRegister`` stays the CUDA runtime's last error until something reads it, and
    torch's next kernel launch would read it and raise it as its own. One small launch reads it here."""
    with contextlib.suppress(RuntimeError):  # torch.AcceleratorError: the refusal, reported
        torch.ones(1, device=device)
