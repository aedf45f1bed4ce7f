"""The exact weight average (EMA) of rows updated a few at a time, kept lazily: the maths shared by the
in-process row stores (:mod:`megaclass.store.average`) and the parameter-server shards.

``train.ema_decay`` averages every weight after every optimizer step,
``avg_t = d_t avg_{t-1} + (1 - d_t) w_t``, with the warm-up ``d_t = min(decay, (1 + t) / (10 + t))``
(:func:`ema_decay_at`). A row-sparse head changes a few of its ``C`` rows a step; folding every row in every
step would cost a pass over ``C x D`` values a step. But a row that keeps the value ``w`` over steps
``s + 1 .. t`` has

    avg_t = F(s, t) avg_s + (1 - F(s, t)) w,    F(s, t) = prod_{u = s + 1}^{t} d_u = exp(L(t) - L(s)),

with ``L(n) = sum_{u <= n} log d_u`` in closed form (:func:`log_decay_total`: ``lgamma`` over the warm-up, a
line after it). So each row keeps ``(avg_s, s)`` and is brought up to a step (:func:`fold_rows_`) just before
its value changes, and wherever its average is read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ema_decay_at", "fold_rows_", "log_decay_total"]


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
    """``L(n) = sum_{u=1}^{n} log d_u`` (:func:`ema_decay_at`) of each ``n`` in ``steps`` (whole numbers
    ``>= 0``, of any dtype), in float64: ``lgamma(n + 2) - lgamma(n + 11) + lgamma(11)`` over the warm-up,
    ``log decay`` a step after.

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


@torch.no_grad()
def fold_rows_(average: Tensor, last: Tensor, values: Tensor, *, decay: float, step: int) -> None:
    """Bring the float32 averages ``average (S, D)``, kept as of steps ``last (S,)``, up to step ``step``,
    the rows having held ``values (S, D)`` (any float dtype) since; in place, ``last`` too. A row kept as of
    a later step than ``step`` stays as it is.

    >>> average, last = torch.zeros(1, 2), torch.zeros(1)
    >>> fold_rows_(average, last, torch.ones(1, 2), decay=0.9, step=1)  # 1 - d_1 of the value: d_1 = 2 / 11
    >>> average.tolist(), last.tolist()
    ([[0.8181818127632141, 0.8181818127632141]], [1.0])
    """
    target = last.clamp(min=step)  # (S,)
    carried = torch.exp(log_decay_total(decay, target) - log_decay_total(decay, last))  # (S,) F(last, target)
    average.lerp_(values.to(average.dtype), (1 - carried).to(average.dtype)[:, None])
    last.copy_(target)
