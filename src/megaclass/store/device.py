"""Rows on the compute device: the fastest store while ``C x D`` fits in GPU memory."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from megaclass.state_io import SavedTensor
from megaclass.store.average import RowAverage
from megaclass.store.base import RowStore
from megaclass.store.local import LocalRows, check_ids

__all__ = ["DeviceStore"]


class DeviceStore(RowStore):
    """A :class:`RowStore` over rows held on the compute device; pulls index them in place.

    Args:
        rows: the matrix and its optimizer state; rows are delivered on the device they live on.

    >>> import torch
    >>> store = DeviceStore(LocalRows(5, 3, device="cpu"))
    >>> store.pull(torch.tensor([4, 0])).shape
    torch.Size([2, 3])
    """

    def __init__(self, rows: LocalRows) -> None:
        self.local = rows
        self.num_rows, self.dim, self.device = rows.num_rows, rows.dim, rows.weight.device

    @property
    def capturable(self) -> bool:
        return True

    def pull(self, ids: Tensor) -> Tensor:
        check_ids(ids)
        return self.local.weight[ids.to(self.device)].float()

    def push(self, ids: Tensor, grads: Tensor, *, step: int, lr: float) -> None:
        check_ids(ids)
        self.local.update_(ids, grads, lr=lr, step=step)

    def read(self, start: int, stop: int) -> Tensor:
        return self.local.weight[start:stop].float()

    def rows(self) -> Tensor:
        return self.local.weight

    def start_average(self, decay: float, *, before_swap: Callable[[], None] = lambda: None) -> RowAverage:
        return self.local.start_average(decay, before_swap=before_swap)

    def held_bytes(self) -> tuple[int, int]:
        return self.local.held_bytes()

    def state_dict(self) -> dict[str, Tensor]:
        return self.local.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor | SavedTensor]) -> None:
        self.local.load_state_dict(state)

    def load_rows(self, rows: Tensor | SavedTensor) -> None:
        self.local.load_rows(rows)
