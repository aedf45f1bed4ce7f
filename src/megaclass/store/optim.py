"""Row-sparse optimizers as pure functions over tensors: only the rows a step touched change.

A store keeps, beside its ``(C, D)`` rows, a state dict of same-leading-dimension tensors (momentum buffers,
Adam moments, per-row step counts). A step gathers the touched rows and their state, calls
:func:`apply_row_update_` on the gathered slices, and writes them back; :func:`apply_sparse_update_` does the
three at once for rows held in one tensor. Untouched rows get no momentum, no decay and no step count, which
is the lazy behaviour of HF-Softmax's SGD and of ``torch.optim.SparseAdam`` (with per-row bias correction).

When every row is touched every step the updates equal ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` /
``Adagrad`` on the dense matrix (tests check it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

from megaclass.schema import ConfigError

__all__ = [
    "RowOptimizerConfig",
    "RowOptimizerKind",
    "apply_row_update_",
    "apply_sparse_update_",
    "gather_state",
    "init_row_state",
    "scatter_state_",
]


class RowOptimizerKind(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"
    ADAGRAD = "adagrad"


@dataclass(frozen=True)
class RowOptimizerConfig:
    """The optimizer a row store applies to the rows a step touched."""

    kind: RowOptimizerKind = RowOptimizerKind.SGD  # HF-Softmax trains its classifier with SGD + momentum
    momentum: float = 0.9  # SGD momentum (0 keeps no buffer)
    weight_decay: float = 0.0  # L2 added to the gradient (decoupled, applied to the row, for AdamW)
    nesterov: bool = False  # SGD Nesterov momentum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW moment decays
    eps: float = 1e-8  # Adam/AdamW/Adagrad denominator guard

    def __post_init__(self) -> None:
        try:  # modes accept their string names
            object.__setattr__(self, "kind", RowOptimizerKind(self.kind))
        except ValueError:
            raise ConfigError(
                f"optimizer.kind: {self.kind!r} is not one of {[k.value for k in RowOptimizerKind]}"
            ) from None
        object.__setattr__(self, "betas", tuple(self.betas))
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and (self.kind is not RowOptimizerKind.SGD or self.momentum == 0):
            raise ConfigError("optimizer.nesterov needs kind sgd with momentum > 0")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"optimizer.eps must be > 0, got {self.eps}")

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each state tensor (``()`` for a scalar per row)."""
        if self.kind is RowOptimizerKind.SGD:
            return {"momentum_buffer": (dim,)} if self.momentum > 0 else {}
        if self.kind is RowOptimizerKind.ADAGRAD:
            return {"sum": (dim,), "step": ()}
        return {"exp_avg": (dim,), "exp_avg_sq": (dim,), "step": ()}


def init_row_state(
    config: RowOptimizerConfig,
    num_rows: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    pin_memory: bool = False,
) -> dict[str, Tensor]:
    """Zeroed float32 optimizer state for ``num_rows`` rows of width ``dim``: ``{name: (num_rows, ...)}``."""
    return {
        name: torch.zeros((num_rows, *shape), dtype=torch.float32, device=device, pin_memory=pin_memory)
        for name, shape in config.state_shapes(dim).items()
    }


@torch.no_grad()
def apply_row_update_(
    rows: Tensor, state: dict[str, Tensor], grads: Tensor, *, lr: float, config: RowOptimizerConfig
) -> None:
    """One optimizer step on ``rows (S, D)`` in place, given ``grads (S, D)`` and the rows' ``state``.

    ``state`` holds this optimizer's tensors for the same ``S`` rows (see :func:`init_row_state`); they are
    updated in place, including the per-row ``step`` count used for Adam's bias correction.
    """
    if rows.shape != grads.shape:
        raise ValueError(f"grads: expected shape {tuple(rows.shape)} like rows, got {tuple(grads.shape)}")
    grads = grads.to(torch.promote_types(rows.dtype, torch.float32))  # fp32 maths at least
    if config.kind is RowOptimizerKind.SGD:
        _sgd_(rows, state, grads, lr=lr, config=config)
    elif config.kind is RowOptimizerKind.ADAGRAD:
        _adagrad_(rows, state, grads, lr=lr, config=config)
    else:
        _adam_(rows, state, grads, lr=lr, config=config)


def _sgd_(
    rows: Tensor, state: dict[str, Tensor], grads: Tensor, *, lr: float, config: RowOptimizerConfig
) -> None:
    # torch.optim.SGD: d = g + wd * w; buf = mu * buf + d; d = d + mu * buf (Nesterov) or buf; w -= lr * d
    step = grads + config.weight_decay * rows if config.weight_decay else grads
    if config.momentum > 0:
        buffer = state["momentum_buffer"]
        buffer.mul_(config.momentum).add_(step)
        step = step + config.momentum * buffer if config.nesterov else buffer
    rows.add_(step.to(rows.dtype), alpha=-lr)


def _adagrad_(
    rows: Tensor, state: dict[str, Tensor], grads: Tensor, *, lr: float, config: RowOptimizerConfig
) -> None:
    # torch.optim.Adagrad (lr_decay 0): g += wd * w; sum += g^2; w -= lr * g / (sqrt(sum) + eps)
    if config.weight_decay:
        grads = grads + config.weight_decay * rows
    state["step"].add_(1)
    state["sum"].addcmul_(grads, grads)
    rows.addcdiv_(grads, state["sum"].sqrt().add_(config.eps), value=-lr)


def _adam_(
    rows: Tensor, state: dict[str, Tensor], grads: Tensor, *, lr: float, config: RowOptimizerConfig
) -> None:
    # torch.optim.Adam / AdamW with a step count per row (t_r counts the steps row r was touched):
    # m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
    beta1, beta2 = config.betas
    if config.weight_decay and config.kind is RowOptimizerKind.ADAMW:
        rows.mul_(1 - lr * config.weight_decay)
    elif config.weight_decay:
        grads = grads + config.weight_decay * rows
    count = state["step"].add_(1)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grads, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
    correction1 = 1 - beta1**count  # (S,)
    correction2 = 1 - beta2**count
    denominator = (exp_avg_sq / correction2[:, None]).sqrt_().add_(config.eps)
    rows.addcdiv_(exp_avg, denominator * (correction1[:, None] / lr), value=-1.0)


def gather_state(state: dict[str, Tensor], ids: Tensor) -> dict[str, Tensor]:
    """The state of rows ``ids (S,)``, as new tensors on ``ids``' device."""
    return {
        name: tensor[ids.to(tensor.device)].to(ids.device, non_blocking=True)
        for name, tensor in state.items()
    }


def scatter_state_(state: dict[str, Tensor], ids: Tensor, rows_state: dict[str, Tensor]) -> None:
    """Write ``rows_state`` (from :func:`gather_state`) back into ``state`` at rows ``ids``."""
    for name, tensor in state.items():
        tensor[ids.to(tensor.device)] = rows_state[name].to(tensor.device)


@torch.no_grad()
def apply_sparse_update_(
    weight: Tensor,
    state: dict[str, Tensor],
    ids: Tensor,
    grads: Tensor,
    *,
    lr: float,
    config: RowOptimizerConfig,
) -> None:
    """One lazy step on rows ``ids (S,)`` (unique) of ``weight (C, D)`` and its full-size ``state``."""
    if ids.dim() != 1 or grads.shape != (ids.numel(), weight.shape[1]):
        raise ValueError(
            f"ids/grads: expected (S,) and (S, {weight.shape[1]}), "
            f"got {tuple(ids.shape)} and {tuple(grads.shape)}"
        )
    ids = ids.to(weight.device)
    rows = weight[ids]
    rows_state = gather_state(state, ids)
    apply_row_update_(rows, rows_state, grads.to(weight.device), lr=lr, config=config)
    weight[ids] = rows
    scatter_state_(state, ids, rows_state)
