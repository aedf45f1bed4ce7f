"""Rows held in this process's memory (GPU or host), in float32 or in bfloat16 with stochastic rounding."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from megaclass.ops.held_rows import RowDtype, put_held_rows_
from megaclass.ops.row_optimizers import (
    RowOptimizerConfig,
    apply_row_update_,
    apply_sparse_update_,
    init_row_state,
    init_rows_,
    take_rows,
)
from megaclass.ops.stochastic_rounding import rounding_seed
from megaclass.state_io import SavedTensor, copy_into_
from megaclass.store.average import HeldRowAverage

__all__ = ["LocalRows", "RowDtype", "check_ids"]


def check_ids(ids: Tensor) -> None:
    """Raise ``ValueError`` unless ``ids`` is a ``(S,)`` int64 tensor of row ids."""
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(f"ids: expected a (S,) int64 tensor, got {tuple(ids.shape)} {ids.dtype}")


_UNKNOWN_STEP = float(torch.finfo(torch.float32).max)  # a row's last update step in an older checkpoint


class LocalRows:
    """A ``(C, D)`` matrix and its row-sparse optimizer state, in device or host memory.

    With ``dtype="bf16_sr"`` the rows and the row-shaped optimizer state (momentum, Adam moments, Adagrad
    sums) are bfloat16: a step gathers the touched rows and their state in float32, applies the optimizer
    there, and writes them back stochastically rounded (``E[stored] == float32 result``), seeded by
    ``(seed, step, tensor)`` so a resumed run repeats the same bits. Per-row step counts stay float32.

    Args:
        num_rows: ``C``.
        dim: ``D``.
        device: where the tensors live.
        optimizer: the row-sparse optimizer :meth:`update_` applies.
        seed: seeds the initial rows (see :func:`~megaclass.ops.row_optimizers.init_rows_`) and the rounding.
        init_bound: initial rows are ``U(-init_bound, init_bound)``; None: ``1 / sqrt(D)``.
        draw_device: where the initial rows are drawn; None: ``device``. The matrix depends on the seed and
            the draw device only, so rows in host memory drawn on the compute device equal rows held there.
        dtype: ``float32`` or ``bf16_sr``.

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
        dtype: RowDtype | str = RowDtype.FLOAT32,
    ) -> None:
        if num_rows < 1 or dim < 1:
            raise ValueError(f"num_rows and dim must be >= 1, got {num_rows} and {dim}")
        try:
            self.row_dtype = RowDtype(dtype)
        except ValueError:
            raise ValueError(f"dtype: {dtype!r} is not one of {[d.value for d in RowDtype]}") from None
        self.optimizer = optimizer or RowOptimizerConfig()
        self.seed = seed
        held = self.row_dtype.held
        self.weight = torch.empty(num_rows, dim, dtype=held, device=device)
        draw_device = device if draw_device is None else draw_device
        init_rows_(self.weight, seed=seed, bound=init_bound, draw_device=draw_device)
        self.state = init_row_state(self.optimizer, num_rows, dim, device=device, dtype=held)
        self.average: HeldRowAverage | None = None  # train.ema_decay's, once started

    def start_average(self, decay: float, **hooks: Callable[[], None]) -> HeldRowAverage:
        """Keep the rows' weight average from now on (:class:`~megaclass.store.average.HeldRowAverage`, given
        ``hooks``: ``flush``, ``before_swap``: each row brought up to date as an update changes it); returns
        it."""
        self.average = HeldRowAverage(self, decay=decay, **hooks)
        return self.average

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def update_(self, ids: Tensor, grads: Tensor, *, lr: float, step: int = 0) -> None:
        """Global optimizer step ``step`` (1-based; 0: none given: the lazy rule) on rows ``ids (S,)``
        (unique) given ``grads (S, D)``, in place; ``step`` also seeds the stochastic rounding of ``bf16_sr``
        rows."""
        global_step = step if step > 0 else None  # rows catch up over the steps they sat out (row_optimizers)
        if self.row_dtype is RowDtype.FLOAT32 and self.average is None:
            apply_sparse_update_(
                self.weight, self.state, ids, grads, lr=lr, config=self.optimizer, step=global_step
            )
            return
        if ids.dim() != 1 or grads.shape != (ids.numel(), self.dim):
            raise ValueError(
                f"ids/grads: expected (S,) and (S, {self.dim}), "
                f"got {tuple(ids.shape)} and {tuple(grads.shape)}"
            )
        ids = ids.to(self.weight.device)
        rows = take_rows(self.weight, ids).float()  # (S, D)
        rows_state = {name: take_rows(tensor, ids).float() for name, tensor in self.state.items()}
        if self.average is not None:
            self.average.fold_(ids, rows, step=step)
        apply_row_update_(
            rows, rows_state, grads.to(rows.device), lr=lr, config=self.optimizer, step=global_step
        )
        written = [(self.weight, rows), *((tensor, rows_state[name]) for name, tensor in self.state.items())]
        put_held_rows_(written, ids, seed=rounding_seed(self.seed, step))

    def held_bytes(self) -> tuple[int, int]:
        """``(rows, optimizer state)`` bytes."""
        optimizer = sum(tensor.numel() * tensor.element_size() for tensor in self.state.values())
        return self.weight.numel() * self.weight.element_size(), optimizer

    def state_dict(self) -> dict[str, Tensor]:
        """The rows (``weight``) and optimizer state (``optim.<name>``) themselves, not copies (as
        ``nn.Module.state_dict``): a checkpoint streams them to its file a block at a time."""
        return {"weight": self.weight, **{f"optim.{name}": tensor for name, tensor in self.state.items()}}

    def load_rows(self, rows: Tensor | SavedTensor) -> None:
        """Copy ``rows`` (a tensor, or a :class:`~megaclass.state_io.SavedTensor` streamed) into the rows."""
        expected = tuple(self.weight.shape)
        if tuple(rows.shape) != expected:
            raise ValueError(f"store rows: expected shape {expected}, got {tuple(rows.shape)}")
        copy_into_(self.weight, rows)

    def load_state_dict(self, state: Mapping[str, Tensor | SavedTensor]) -> None:
        """Copy what :meth:`state_dict` returned (tensors, or :class:`~megaclass.state_io.SavedTensor` handles
        streamed from a checkpoint file) into the rows and optimizer state."""
        expected = self.state_dict()
        if "optim.last_step" in expected and "optim.last_step" not in state:
            # saved before rows caught up on the steps they sat out: when each row was last updated is not
            # known, so its next update catches up on none (a last step past any step), later ones do
            state = {**state, "optim.last_step": torch.full_like(expected["optim.last_step"], _UNKNOWN_STEP)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"store state: missing {missing}, unexpected {unexpected}")
        for name, target in expected.items():
            if tuple(state[name].shape) != tuple(target.shape):
                expected_shape, got = tuple(target.shape), tuple(state[name].shape)
                raise ValueError(f"store state {name!r}: expected shape {expected_shape}, got {got}")
            if state[name] is not target:
                copy_into_(target, state[name])
