"""Rows in this process's memory with their row-sparse optimizer state: what device and host stores hold."""

from __future__ import annotations

import torch
from torch import Tensor

from megaclass.ops.row_optimizers import RowOptimizerConfig, apply_sparse_update_, init_row_state, init_rows_

__all__ = ["LocalRows", "check_ids"]


def check_ids(ids: Tensor) -> None:
    """Raise ``ValueError`` unless ``ids`` is a ``(S,)`` int64 tensor of row ids."""
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(f"ids: expected a (S,) int64 tensor, got {tuple(ids.shape)} {ids.dtype}")


class LocalRows:
    """A ``(C, D)`` float32 matrix and its row-sparse optimizer state, in device or host memory.

    Args:
        num_rows: ``C``.
        dim: ``D``.
        device: where the tensors live.
        optimizer: the row-sparse optimizer :meth:`update_` applies.
        seed: seeds the initial rows (see :func:`~megaclass.ops.row_optimizers.init_rows_`).
        init_bound: initial rows are ``U(-init_bound, init_bound)``; None: ``1 / sqrt(D)``.
        draw_device: where the initial rows are drawn; None: ``device``. The matrix depends on the seed and
            the draw device only, so rows in host memory drawn on the compute device equal rows held there.
        pin_memory: page-lock the (host) tensors, for asynchronous copies to a GPU.

    >>> rows = LocalRows(5, 3, optimizer=RowOptimizerConfig(momentum=0.0), init_bound=0.0)
    >>> rows.update_(torch.tensor([4]), torch.ones(1, 3), lr=0.5)
    >>> rows.weight[4].tolist()
    [-0.5, -0.5, -0.5]
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
        draw_device: torch.device | str | None = None,
        pin_memory: bool = False,
    ) -> None:
        if num_rows < 1 or dim < 1:
            raise ValueError(f"num_rows and dim must be >= 1, got {num_rows} and {dim}")
        self.optimizer = optimizer or RowOptimizerConfig()
        self.weight = torch.empty(num_rows, dim, dtype=torch.float32, device=device, pin_memory=pin_memory)
        draw_device = device if draw_device is None else draw_device
        init_rows_(self.weight, seed=seed, bound=init_bound, draw_device=draw_device)
        self.state = init_row_state(self.optimizer, num_rows, dim, device=device, pin_memory=pin_memory)

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def update_(self, ids: Tensor, grads: Tensor, *, lr: float, step: int | None = None) -> None:
        """Global optimizer step ``step`` on rows ``ids (S,)`` (unique) given ``grads (S, D)``, in place."""
        apply_sparse_update_(self.weight, self.state, ids, grads, lr=lr, config=self.optimizer, step=step)

    def held_bytes(self) -> tuple[int, int]:
        """``(rows, optimizer state)`` bytes."""
        optimizer = sum(tensor.numel() * tensor.element_size() for tensor in self.state.values())
        return self.weight.numel() * self.weight.element_size(), optimizer

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of the rows (``weight``) and optimizer state (``optim.<name>``) on the CPU."""
        state = {"weight": self.weight.to("cpu", copy=True)}
        state.update({f"optim.{name}": tensor.to("cpu", copy=True) for name, tensor in self.state.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy what :meth:`state_dict` returned into the rows and optimizer state."""
        expected = {"weight": self.weight, **{f"optim.{name}": tensor for name, tensor in self.state.items()}}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"store state: missing {missing}, unexpected {unexpected}")
        for name, target in expected.items():
            if state[name].shape != target.shape:
                expected_shape, got = tuple(target.shape), tuple(state[name].shape)
                raise ValueError(f"store state {name!r}: expected shape {expected_shape}, got {got}")
            target.copy_(state[name])
