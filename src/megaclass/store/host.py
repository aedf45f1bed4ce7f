"""Rows in host memory: the class count is bounded by host memory, not GPU memory.

With a GPU the rows and their optimizer state are page-locked where they are and mapped into the GPU's
address space (:func:`~megaclass.staging.map_to_device`): a pull gathers the active rows and an update
rewrites them with the GPU's own kernels, across the bus, as a device store does in GPU memory. A step then
never waits for the host, and can be captured in a CUDA graph; only the rows it touches cross the bus.

Where CUDA refuses to lock the rows, and while a weight average is kept (which swaps the rows' tensor), each
step's active rows are gathered on the host into page-locked memory and copied to the GPU on a side CUDA
stream instead; after the backward their gradients are copied back on that stream and a worker thread applies
the row-sparse optimizer to the host rows, while the GPU goes on with the next step (encoder forward,
selection). A pull waits only for the updates pushed before it (FIFO), so every step sees the rows its
predecessors wrote. On a CPU device everything runs synchronously in the calling thread.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from megaclass.staging import blocks_to_device, map_to_device
from megaclass.state_io import SavedTensor
from megaclass.store.average import RowAverage
from megaclass.store.base import RowStore
from megaclass.store.local import LocalRows, check_ids

__all__ = ["HostStore"]


class HostStore(RowStore):
    """A :class:`RowStore` over rows in host memory, delivered to the compute device ``device``.

    Args:
        rows: the matrix and its optimizer state, in (pageable) host memory.
        device: where pulled rows are delivered (the compute device).
        mapped: with a CUDA ``device``, whether to map the rows into its address space (see the module;
            the optimizer then runs on the GPU), else gather each step's rows on the host and run the
            optimizer there.

    >>> store = HostStore(LocalRows(5, 3), device="cpu")
    >>> store.push(torch.tensor([1]), torch.ones(1, 3), step=0, lr=0.1)
    >>> store.pull(torch.tensor([1])).shape
    torch.Size([1, 3])
    """

    def __init__(self, rows: LocalRows, *, device: torch.device | str = "cpu", mapped: bool = True) -> None:
        self.device = torch.device(device)
        self._asynchronous = self.device.type == "cuda"
        if rows.weight.device.type != "cpu":
            raise ValueError(
                f"rows: a host store needs rows in host memory, got them on {rows.weight.device}"
            )
        self.local = rows
        self.num_rows, self.dim = rows.num_rows, rows.dim
        self._stream = torch.cuda.Stream(self.device) if self._asynchronous else None
        self._worker = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-store") if self._asynchronous else None
        )
        self._pending: Future | None = None
        self._mapped = self._map(rows) if self._asynchronous and mapped else None

    def _map(self, rows: LocalRows) -> LocalRows | None:
        """``rows`` seen from the GPU: the same object over device tensors that are the host tensors' memory
        (:func:`~megaclass.staging.map_to_device`); None where CUDA refuses to lock one of them."""
        tensors = {"weight": rows.weight, **rows.state}
        mapped = {}
        for name, tensor in tensors.items():
            mapped[name] = map_to_device(tensor, self.device)
            if mapped[name] is None:
                return None  # (those locked so far are unlocked as their tensors go)
        seen = copy.copy(rows)
        seen.weight = mapped.pop("weight")
        seen.state = mapped
        return seen

    @property
    def mapped(self) -> bool:
        """Whether the GPU reads and updates the rows in place (see the module)."""
        return self._mapped is not None

    @property
    def capturable(self) -> bool:
        return self.mapped

    # ------------------------------------------------------------------ pull
    def pull(self, ids: Tensor) -> Tensor:
        check_ids(ids)
        if self._mapped is not None:
            return self._mapped.weight[ids.to(self.device)].float()  # across the bus, by the GPU
        if not self._asynchronous:
            return self.local.weight[ids.cpu()].to(self.device, torch.float32)
        self.flush()
        ids_host = ids.cpu()  # host sync: the gather runs on the host
        staged = torch.empty(ids_host.numel(), self.dim, dtype=self.local.weight.dtype, pin_memory=True)
        torch.index_select(self.local.weight, 0, ids_host, out=staged)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            rows = staged.to(self.device, non_blocking=True)  # bf16 rows cross in half the bytes
        current.wait_stream(self._stream)
        rows.record_stream(current)
        return rows.float()

    def read(self, start: int, stop: int) -> Tensor:
        self.flush()
        return self.local.weight[start:stop].to(self.device, torch.float32)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        """As :meth:`RowStore.blocks`; to a GPU through page-locked buffers the host fills in turn, in the
        dtype the rows are held in (half the bytes for ``bf16_sr``), converted there."""
        self.flush()
        starts = range(0, self.num_rows, block_rows)
        moved = blocks_to_device(self.local.weight, self.device, block_rows)
        for start, block in zip(starts, moved, strict=True):
            yield start, block.float()

    def rows(self) -> Tensor:
        self.flush()
        return self.local.weight

    # ------------------------------------------------------------------ push
    def push(self, ids: Tensor, grads: Tensor, *, step: int, lr: float) -> None:
        check_ids(ids)
        if grads.shape != (ids.numel(), self.dim):
            raise ValueError(f"grads: expected shape {(ids.numel(), self.dim)}, got {tuple(grads.shape)}")
        if self._mapped is not None:
            self._mapped.update_(ids, grads, lr=lr, step=step)  # the GPU's kernels, in place across the bus
            return
        if not self._asynchronous:
            self.local.update_(ids.cpu(), grads.cpu(), lr=lr, step=step)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # grads are ready there
        with torch.cuda.stream(self._stream):
            grads_host = torch.empty(grads.shape, dtype=grads.dtype, pin_memory=True)
            ids_host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            grads_host.copy_(grads, non_blocking=True)
            ids_host.copy_(ids, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        grads.record_stream(self._stream)
        ids.record_stream(self._stream)
        previous = self._pending

        def apply() -> None:
            if previous is not None:
                previous.result()  # surface an earlier failure in order
            copied.synchronize()
            self.local.update_(ids_host, grads_host, lr=lr, step=step)

        self._pending = self._worker.submit(apply)

    def flush(self) -> None:
        if self._mapped is not None:
            torch.cuda.synchronize(self.device)  # host sync: the host reads what the GPU's updates wrote
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def start_average(self, decay: float, *, before_swap: Callable[[], None] = lambda: None) -> RowAverage:
        """The rows' average, folded by the thread that applies the updates; read once they are applied.
        Mapped rows are unmapped first: the average swaps the rows' tensor, which a mapping would not see."""
        self.flush()
        self._mapped = None  # unlocked as its tensors go (nothing else holds them: pulls are copies)
        return self.local.start_average(decay, flush=self.flush, before_swap=before_swap)

    # ------------------------------------------------------------------ checkpoint
    def held_bytes(self) -> tuple[int, int]:
        return self.local.held_bytes()

    def state_dict(self) -> dict[str, Tensor]:
        self.flush()
        return self.local.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor | SavedTensor]) -> None:
        self.flush()
        self.local.load_state_dict(state)

    def load_rows(self, rows: Tensor | SavedTensor) -> None:
        self.flush()
        self.local.load_rows(rows)

    def close(self, *, wait: bool = True) -> None:
        """Apply pending updates (unless not ``wait``), unlock mapped rows and stop the worker thread."""
        if wait:
            self.flush()
        self._mapped = None  # unlocked after the device's work, which may still read it
        if self._worker is not None:
            self._worker.shutdown(cancel_futures=not wait)
