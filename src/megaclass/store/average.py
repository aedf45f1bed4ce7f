"""The weight average (EMA) of a store's rows held in this process, each row brought up to date as it
changes (:mod:`megaclass.ops.row_average` has the maths): the same numbers as averaging every row every
step, without a pass over every row a step.

:class:`RowAverage` is what every store's average does (:meth:`~megaclass.store.base.RowStore.start_average`);
:class:`HeldRowAverage` keeps it for rows held in this process (GPU, host memory), folding each row just
before an update changes it (from the rows the update gathers anyway) and all rows at once only where the
average is read: an evaluation, a checkpoint.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from megaclass.ops.row_average import fold_rows_
from megaclass.ops.row_optimizers import put_rows_, take_rows
from megaclass.state_io import RowSource, copy_into_

__all__ = ["HeldRowAverage", "RowAverage"]

_BLOCK_VALUES = 1 << 24  # rows caught up at once: a block of 64 MiB of float32 values


def _nothing() -> None:
    pass


class RowAverage(abc.ABC):
    """The weight average of a store's ``(C, D)`` rows (``train.ema_decay``), kept by the store."""

    decay: float

    @abc.abstractmethod
    def exact(self, *, step: int) -> Tensor | RowSource:
        """The ``(C, D)`` float32 average at optimizer step ``step``: a tensor where it is held here, else a
        source read a block at a time (a checkpoint streams either)."""

    @abc.abstractmethod
    def swap_(self, *, step: int) -> None:
        """Put the average at ``step`` in the rows' place (what the store's reads give), or, when it is
        there, the trained rows back; no update is taken while it is there."""

    @abc.abstractmethod
    def load_(self, value: Tensor | RowSource, *, step: int) -> None:
        """Restore an average that was exact at ``step`` (what :meth:`exact` gave, from a file)."""

    @abc.abstractmethod
    def restart_(self, *, step: int) -> None:
        """Start the average over from the rows as they are, at ``step`` (a checkpoint that kept none)."""


class HeldRowAverage(RowAverage):
    """The weight average of the ``(C, D)`` matrix ``rows.weight`` held in this process.

    Args:
        rows: holds the averaged matrix as its ``weight`` attribute (any float dtype; a
            :class:`~megaclass.store.local.LocalRows`), which :meth:`swap_` exchanges with the average; the
            average starts equal to it, at step 0.
        decay: the long-run decay in ``(0, 1)``.
        flush: called before all rows are read (a store applying updates in a thread waits for them).
        before_swap: called before the average takes the rows' place (a head brings its index up to the
            trained rows, so that nothing built while the average is in place is built from it).

    >>> class Rows: weight = torch.zeros(4, 2)
    >>> rows = Rows(); average = HeldRowAverage(rows, decay=0.9)
    >>> ids = torch.tensor([1])
    >>> average.fold_(ids, rows.weight[ids].float(), step=1); rows.weight[1] = 1.0  # step 1 changes row 1
    >>> average.exact(step=1)[1].tolist()  # (1 - d_1) of the new value: d_1 = 2 / 11
    [0.8181818127632141, 0.8181818127632141]
    """

    def __init__(
        self,
        rows: Any,
        *,
        decay: float,
        flush: Callable[[], None] = _nothing,
        before_swap: Callable[[], None] = _nothing,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a value in (0, 1), got {decay}")
        self.rows, self.decay, self.flush, self.before_swap = rows, decay, flush, before_swap
        weight = rows.weight
        self.value = weight.detach().float().clone()  # (C, D) the average as of each row's `last` step
        self.last = torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device)  # (C,)
        self.swapped = False  # whether rows.weight holds the average (and self.value the trained rows)

    @torch.no_grad()
    def fold_(self, ids: Tensor, old: Tensor, *, step: int) -> None:
        """Bring rows ``ids (S,)`` (unique) up to step ``step - 1`` from their values ``old (S, D)``, before
        optimizer step ``step`` (1-based) changes them."""
        if step < 1:
            raise ValueError(f"a row average needs the optimizer step (>= 1), got {step}")
        if self.swapped:
            raise RuntimeError("rows updated while they hold their average (an evaluation's swap)")
        ids = ids.to(self.value.device)
        folded, last = take_rows(self.value, ids), self.last[ids]  # (S, D), (S,) copies, folded in place
        fold_rows_(folded, last, old.to(self.value.device), decay=self.decay, step=step - 1)
        put_rows_(self.value, ids, folded)
        self.last[ids] = last

    @torch.no_grad()
    def exact(self, *, step: int) -> Tensor:
        """The ``(C, D)`` float32 average at step ``step``, every row brought up to it from the rows as they
        are (unchanged since each row's last fold), a block at a time."""
        if self.swapped:
            raise RuntimeError("the row average is swapped in: read the rows' weight")
        self.flush()
        weight = self.rows.weight
        block = max(1, _BLOCK_VALUES // max(1, self.value.shape[1]))
        for start in range(0, self.value.shape[0], block):
            part = slice(start, start + block)
            values = weight[part].to(self.value.device)
            fold_rows_(self.value[part], self.last[part], values, decay=self.decay, step=step)
        return self.value

    def swap_(self, *, step: int) -> None:
        """Put the average at ``step`` in the rows' place (their ``weight``, float32 while it is there), or,
        when it is there, the trained rows back."""
        if not self.swapped:  # (no update can come while the average is in place: fold_ refuses it)
            self.before_swap()
            self.exact(step=step)  # waits for the updates under way
        self.rows.weight, self.value = self.value, self.rows.weight
        self.swapped = not self.swapped

    @torch.no_grad()
    def load_(self, value: Tensor | RowSource, *, step: int) -> None:
        if self.swapped:
            raise RuntimeError("the row average is swapped in: it is loaded once the rows are back")
        if tuple(value.shape) != tuple(self.value.shape):
            raise ValueError(
                f"row average: expected shape {tuple(self.value.shape)}, got {tuple(value.shape)}"
            )
        copy_into_(self.value, value)
        self.last.fill_(step)

    def restart_(self, *, step: int) -> None:
        self.load_(self.rows.weight, step=step)
