"""The optimizer settings of a shard, and its lazy row updates (:mod:`megaclass.ops.row_optimizers`).

The server applies the same row-sparse optimizer functions as the in-process stores, so a run with
``store=ps://...`` follows the same update rule as ``store=host``: rows not pushed in a step are left alone
(no decay, no momentum drift), and Adam/Adagrad count steps per row.
"""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor

from megaclass.ops.row_optimizers import RowOptimizerConfig, RowOptimizerKind, apply_row_update_

OPTIMIZERS = tuple(kind.value for kind in RowOptimizerKind)


@dataclasses.dataclass(frozen=True)
class HyperParams:
    """Optimizer settings of a shard; a trainer may send ``lr`` with every push (its schedule).

    Args:
        lr: learning rate used when a push carries none.
        momentum: SGD momentum (0: plain SGD, and no momentum state is kept).
        weight_decay: L2 added to the gradient as ``torch.optim`` does (decoupled for AdamW).
        nesterov: SGD Nesterov momentum.
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        eps: Adagrad/Adam denominator guard.
        barrier_timeout_s: sync mode: seconds a step waits for a missing trainer before dropping it.
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    barrier_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "barrier_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"hyper-parameter {name}={value!r}: expected a finite number >= 0")
        if self.barrier_timeout_s <= 0:
            raise ValueError(f"hyper-parameter barrier_timeout_s={self.barrier_timeout_s!r}: expected > 0")

    def row_optimizer(self, optimizer: str) -> RowOptimizerConfig:
        """The :class:`RowOptimizerConfig` of ``optimizer`` with these settings (ConfigError if invalid)."""
        return RowOptimizerConfig(
            kind=optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
            betas=(self.beta1, self.beta2),
            eps=self.eps,
            lazy=True,  # a shard applies each push without the trainer's global step
        )


def state_shapes(optimizer: str, hyper: HyperParams, dim: int) -> dict[str, tuple[int, ...]]:
    """Per-row shape of each optimizer state slot (``(D,)`` or ``()``) that ``optimizer`` keeps."""
    return hyper.row_optimizer(optimizer).state_shapes(dim)


def apply_update(
    optimizer: str, rows: Tensor, state: dict[str, Tensor], grads: Tensor, hyper: HyperParams, *, lr: float
) -> None:
    """One lazy step on gathered ``rows (S, D)`` and their ``state`` (``(S, D)`` / ``(S,)``), in place."""
    apply_row_update_(rows, state, grads, lr=lr, config=hyper.row_optimizer(optimizer))
