"""The exact weight average (EMA) of rows updated a few at a time, kept lazily.

``train.ema_decay`` averages every weight after every optimizer step,
``avg_t = d_t avg_{t-1} + (1 - d_t) w_t``, with the warm-up ``d_t = min(decay, (1 + t) / (10 + t))``
(:func:`ema_decay_at`). A row-sparse head changes a few of its ``C`` rows a step; folding every row in every
step would cost a pass over ``C x D`` values a step. But a row that keeps the value ``w`` over steps
``s + 1 .. t`` has

    avg_t = F(s, t) avg_s + (1 - F(s, t)) w,    F(s, t) = prod_{u = s + 1}^{t} d_u = exp(L(t) - L(s)),

with ``L(n) = sum_{u <= n} log d_u`` in closed form (:func:`log_decay_total`: ``lgamma`` over the warm-up, a
line after it). So each row keeps ``(avg_s, s)``: it is brought up to date just before its value changes
(:meth:`RowAverage.fold_`, from the rows the update gathers anyway) and all rows at once only where the
average is read: an evaluation, a checkpoint (:meth:`RowAverage.exact`). The result equals averaging every
row every step (tested against that).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from megaclass.ops.row_optimizers import put_rows_, take_rows
from megaclass.state_io import copy_into_

__all__ = ["RowAverage", "ema_decay_at", "log_decay_total"]

_BLOCK_VALUES = 1 << 24  # rows caught up at once: a block of 64 MiB of float32 values


def _nothing() -> None:
    pass


def ema_decay_at(decay: float, step: int) -> float:
    """The decay folded in after optimizer step ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``,
    so that early averages do not remember the random initial weights.

    >>> ema_decay_at(0.999, 1), ema_decay_at(0.9, 10**6)
    (0.18181818181818182, 0.9)
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def _first_flat_step(decay: float) -> int:
    """The first step ``u >= 1`` whose decay is ``decay`` itself (the warm-up's ``(1 + u) / (10 + u)`` has
    reached it)."""
    step = max(1, math.ceil((10.0 * decay - 1.0) / (1.0 - decay)))
    while step > 1 and (step / (9.0 + step)) >= decay:  # the ceiling's float rounding, one step either way
        step -= 1
    while (1.0 + step) / (10.0 + step) < decay:
        step += 1
    return step


def log_decay_total(decay: float, steps: Tensor) -> Tensor:
    """``L(n) = sum_{u=1}^{n} log d_u`` (:func:`ema_decay_at`) of each ``n`` in ``steps`` (int, ``>= 0``), in
    float64: ``lgamma(n + 2) - lgamma(n + 11) + lgamma(11)`` over the warm-up, ``log decay`` a step after.

    >>> n = torch.tensor([0, 3, 5000])
    >>> direct = [sum(math.log(ema_decay_at(0.99, u)) for u in range(1, k + 1)) for k in n.tolist()]
    >>> bool(torch.allclose(log_decay_total(0.99, n), torch.tensor(direct, dtype=torch.float64)))
    True
    """
    flat = _first_flat_step(decay)
    n = steps.to(torch.float64)
    warm = n.clamp(max=flat - 1)
    total = torch.lgamma(warm + 2) - torch.lgamma(warm + 11) + math.lgamma(11)
    return total + (n - warm) * math.log(decay)


class RowAverage:
    """The weight average of the ``(C, D)`` matrix ``rows.weight``, each row brought up to date as it changes.

    Args:
        rows: holds the averaged matrix as its ``weight`` attribute (any float dtype; a
            :class:`~megaclass.store.local.LocalRows`), which :meth:`swap_` exchanges with the average; the
            average starts equal to it, at step 0.
        decay: the long-run decay in ``(0, 1)``.
        flush: called before all rows are read (a store applying updates in a thread waits for them).
        before_swap: called before the average takes the rows' place (a head brings its index up to the
            trained rows, so that nothing built while the average is in place is built from it).

    >>> class Rows: weight = torch.zeros(4, 2)
    >>> rows = Rows(); average = RowAverage(rows, decay=0.9)
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

    def _carried(self, ids: Tensor | slice, step: int) -> Tensor:
        """``(n, 1)`` float32 ``F(last, step)`` of rows ``ids``: the share of their average carried to
        ``step``."""
        log_total = log_decay_total(self.decay, self.last[ids])  # (n,)
        now = log_decay_total(self.decay, torch.tensor(step)).item()
        return torch.exp(now - log_total).to(torch.float32)[:, None]

    @torch.no_grad()
    def fold_(self, ids: Tensor, old: Tensor, *, step: int) -> None:
        """Bring rows ``ids (S,)`` (unique) up to step ``step - 1`` from their values ``old (S, D)``, before
        optimizer step ``step`` (1-based) changes them."""
        if step < 1:
            raise ValueError(f"a row average needs the optimizer step (>= 1), got {step}")
        if self.swapped:
            raise RuntimeError("rows updated while they hold their average (an evaluation's swap)")
        ids = ids.to(self.value.device)
        carried = self._carried(ids, step - 1)  # (S, 1)
        folded = take_rows(self.value, ids)  # (S, D) a copy, folded in place
        folded.lerp_(old.to(self.value.device, torch.float32), 1 - carried)
        put_rows_(self.value, ids, folded)
        self.last[ids] = step - 1

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
            carried = self._carried(part, step)  # (b, 1)
            self.value[part].lerp_(weight[part].to(self.value.device, torch.float32), 1 - carried)
        self.last.fill_(step)
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
    def load_(self, value: Tensor, *, step: int) -> None:
        """Restore an average that was exact at ``step`` (what :meth:`exact` returned, from a file)."""
        if self.swapped:
            raise RuntimeError("the row average is swapped in: it is loaded once the rows are back")
        if tuple(value.shape) != tuple(self.value.shape):
            raise ValueError(
                f"row average: expected shape {tuple(self.value.shape)}, got {tuple(value.shape)}"
            )
        copy_into_(self.value, value)
        self.last.fill_(step)
