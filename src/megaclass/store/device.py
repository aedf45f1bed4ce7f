"""Rows on the compute device: the fastest store while ``C x D`` fits in GPU memory."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megaclass.store.base import RowStore
from megaclass.store.optim import RowOptimizerConfig, apply_sparse_update_, init_row_state

__all__ = ["DeviceStore", "init_rows_"]

_INIT_CHUNK = 1 << 16  # rows drawn per generator seed, so every store initialises the same matrix


@torch.no_grad()
def init_rows_(
    weight: Tensor, *, seed: int, bound: float | None = None, draw_device: torch.device | str | None = None
) -> None:
    """Fill ``weight (C, D)`` with ``U(-bound, bound)`` (default ``1 / sqrt(D)``, as ``nn.Linear``).

    Drawn on ``draw_device`` (default the CPU) in chunks of rows with seed ``seed + chunk``, so the result
    does not depend on where the rows live: a device store and a host store with the same compute device
    start from the same matrix (and a host store draws on the GPU, not with the slower CPU generator).
    """
    bound = 1.0 / math.sqrt(weight.shape[1]) if bound is None else bound
    draw_device = torch.device("cpu" if draw_device is None else draw_device)
    for index, start in enumerate(range(0, weight.shape[0], _INIT_CHUNK)):
        generator = torch.Generator(device=draw_device).manual_seed(seed + index)
        rows = min(_INIT_CHUNK, weight.shape[0] - start)
        chunk = (
            torch.rand(rows, weight.shape[1], generator=generator, device=draw_device) * (2 * bound) - bound
        )
        weight[start : start + rows] = chunk.to(weight.device, weight.dtype)


def _check_ids(ids: Tensor) -> None:
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(f"ids: expected a (S,) int64 tensor, got {tuple(ids.shape)} {ids.dtype}")


class DeviceStore(RowStore):
    """A ``(C, D)`` float32 matrix and its row-sparse optimizer state on ``device``.

    Args:
        num_rows: ``C``.
        dim: ``D``.
        device: where rows live and are delivered.
        optimizer: the row-sparse optimizer applied on :meth:`push`.
        seed: seeds the initial rows (see :func:`init_rows_`).
        init_bound: initial rows are ``U(-init_bound, init_bound)``; None: ``1 / sqrt(D)``.

    >>> store = DeviceStore(5, 3, device="cpu")
    >>> store.pull(torch.tensor([4, 0])).shape
    torch.Size([2, 3])
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
        self.weight = torch.empty(num_rows, dim, dtype=torch.float32, device=self.device)
        init_rows_(self.weight, seed=seed, bound=init_bound, draw_device=self.device)
        self.state = init_row_state(self.optimizer, num_rows, dim, device=self.device)

    def pull(self, ids: Tensor) -> Tensor:
        _check_ids(ids)
        return self.weight[ids.to(self.device)]

    def push(self, ids: Tensor, grads: Tensor, *, step: int, lr: float) -> None:
        _check_ids(ids)
        apply_sparse_update_(self.weight, self.state, ids, grads, lr=lr, config=self.optimizer)

    def read(self, start: int, stop: int) -> Tensor:
        return self.weight[start:stop]

    def rows(self) -> Tensor:
        return self.weight

    def state_dict(self) -> dict[str, Tensor]:
        state = {"weight": self.weight.cpu()}
        state.update({f"optim.{name}": tensor.cpu() for name, tensor in self.state.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        load_store_state_(self.weight, self.state, state)


def load_store_state_(weight: Tensor, optim_state: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    """Copy a store's :meth:`~RowStore.state_dict` into its ``weight`` and optimizer tensors."""
    expected = {"weight": weight, **{f"optim.{name}": tensor for name, tensor in optim_state.items()}}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"store state: missing {missing}, unexpected {unexpected}")
    for name, target in expected.items():
        if state[name].shape != target.shape:
            raise ValueError(
                f"store state {name!r}: expected shape {tuple(target.shape)}, got {tuple(state[name].shape)}"
            )
        target.copy_(state[name])
