"""Rows in (pinned) host memory: the class count is bounded by host memory, not GPU memory.

Each step the active rows are gathered on the host and copied to the GPU on a side CUDA stream; after the
backward their gradients are copied back on that stream and a worker thread applies the row-sparse optimizer
to the host rows, while the GPU goes on with the next step (encoder forward, selection). A pull waits only
for the updates pushed before it (FIFO), so every step sees the rows its predecessors wrote. On a CPU device
everything runs synchronously in the calling thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from megaclass.store.base import RowStore
from megaclass.store.device import _check_ids, init_rows_, load_store_state_
from megaclass.store.optim import RowOptimizerConfig, apply_sparse_update_, init_row_state

__all__ = ["HostStore"]


class HostStore(RowStore):
    """A ``(C, D)`` float32 matrix and its optimizer state in host memory (pinned when CUDA is in use).

    Args:
        num_rows: ``C``.
        dim: ``D``.
        device: where pulled rows are delivered (the compute device).
        optimizer: the row-sparse optimizer applied on :meth:`push` (on the host).
        seed: seeds the initial rows (the same matrix a :class:`DeviceStore` starts from).
        init_bound: initial rows are ``U(-init_bound, init_bound)``; None: ``1 / sqrt(D)``.

    >>> store = HostStore(5, 3, device="cpu")
    >>> store.push(torch.tensor([1]), torch.ones(1, 3), step=0, lr=0.1)
    >>> store.pull(torch.tensor([1])).shape
    torch.Size([1, 3])
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        device: torch.device | str = "cpu",
        optimizer: RowOptimizerConfig | None = None,
        seed: int = 0,
        init_bound: float | None = None,
    ) -> None:
        if num_rows < 1 or dim < 1:
            raise ValueError(f"num_rows and dim must be >= 1, got {num_rows} and {dim}")
        self.num_rows, self.dim, self.device = num_rows, dim, torch.device(device)
        self.optimizer = optimizer or RowOptimizerConfig()
        self._asynchronous = self.device.type == "cuda"
        self.weight = torch.empty(num_rows, dim, dtype=torch.float32, pin_memory=self._asynchronous)
        init_rows_(self.weight, seed=seed, bound=init_bound, draw_device=self.device)
        self.state = init_row_state(self.optimizer, num_rows, dim, pin_memory=self._asynchronous)
        self._stream = torch.cuda.Stream(self.device) if self._asynchronous else None
        self._worker = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-store") if self._asynchronous else None
        )
        self._pending: Future | None = None

    # ------------------------------------------------------------------ pull
    def pull(self, ids: Tensor) -> Tensor:
        _check_ids(ids)
        if not self._asynchronous:
            return self.weight[ids.cpu()].to(self.device)
        self.flush()
        ids_host = ids.cpu()  # host sync: the gather runs on the host
        staged = torch.empty(ids_host.numel(), self.dim, pin_memory=True)
        torch.index_select(self.weight, 0, ids_host, out=staged)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            rows = staged.to(self.device, non_blocking=True)
        current.wait_stream(self._stream)
        rows.record_stream(current)
        return rows

    def read(self, start: int, stop: int) -> Tensor:
        self.flush()
        return self.weight[start:stop].to(self.device)

    def rows(self) -> Tensor:
        self.flush()
        return self.weight

    # ------------------------------------------------------------------ push
    def push(self, ids: Tensor, grads: Tensor, *, step: int, lr: float) -> None:
        _check_ids(ids)
        if grads.shape != (ids.numel(), self.dim):
            raise ValueError(f"grads: expected shape {(ids.numel(), self.dim)}, got {tuple(grads.shape)}")
        if not self._asynchronous:
            apply_sparse_update_(
                self.weight, self.state, ids.cpu(), grads.cpu(), lr=lr, config=self.optimizer
            )
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
            apply_sparse_update_(self.weight, self.state, ids_host, grads_host, lr=lr, config=self.optimizer)

        self._pending = self._worker.submit(apply)

    def flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Tensor]:
        self.flush()
        state = {"weight": self.weight.clone()}
        state.update({f"optim.{name}": tensor.clone() for name, tensor in self.state.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.flush()
        load_store_state_(self.weight, self.state, state)

    def close(self) -> None:
        """Apply pending updates and stop the worker thread."""
        self.flush()
        if self._worker is not None:
            self._worker.shutdown()
