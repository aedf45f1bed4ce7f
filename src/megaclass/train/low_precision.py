"""Low-precision head state: weights and optimizer state in bfloat16, updated with stochastic rounding.

A head over millions of classes spends most of its memory on its weight matrix and the optimizer's state for
it: fp32 weights plus Adam's two moments are 12 bytes a weight, bf16 ones 6. Round-to-nearest bf16 would
swallow every update smaller than half an ulp (about 2^-9 of the weight), so training stalls; stochastic
rounding keeps each update in expectation (ELMO, ICML 2025). Every update here is computed in fp32 from the
bf16 values, then rounded back stochastically with a seed derived from ``(seed, step, tensor)``, so a resumed
run repeats the same bits.

``head_state: bf16_sr`` in a run config casts the head's floating parameters to bf16 with
:func:`to_bf16_state` and trains them with :class:`BF16AdamW` or :class:`BF16SGD`. Row stores (the selected
head) call :func:`row_adamw_` / :func:`row_sgd_` on the rows a step touched; so do both optimizers for a
parameter whose gradient is sparse (an MLP's first layer over a large vocabulary, in any dtype): only the
rows with a non-zero gradient move ("lazy" Adam: the others' moments and weight decay wait for their rows'
next gradient; the bias corrections follow the optimizer's step count).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from megaclass.ops.row_optimizers import put_rows_, take_rows
from megaclass.ops.stochastic_rounding import AdamWStep, rounding_seed, sr_adamw_, stochastic_round

__all__ = [
    "BF16AdamW",
    "BF16SGD",
    "HeadState",
    "adamw_math",
    "head_input",
    "round_into_",
    "row_adamw_",
    "row_sgd_",
    "sgd_math",
    "to_bf16_state",
]

_WEIGHT, _EXP_AVG, _EXP_AVG_SQ, _MOMENTUM = range(
    4
)  # stream ids: each stored tensor gets its own random bits
_Dict = dict[str, Any]  # a parameter group, a parameter's state, keyword arguments
_Rows = tuple[Tensor, Tensor]  # rows (S,) and their gradients (S, D)
_CHUNK = 1 << 22  # elements updated at once: the fp32 temporaries stay a few 16 MiB buffers at any C


def _chunks(param: Tensor) -> list[slice]:
    """Slices of the flattened ``param`` updated one at a time (one slice when it is not contiguous)."""
    count = param.numel()
    if not param.is_contiguous():
        return [slice(0, count)]
    return [slice(start, min(start + _CHUNK, count)) for start in range(0, count, _CHUNK)]


def _flat(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` as a 1-D view when ``like`` is contiguous (a grad is copied if it must be), else as is."""
    if not like.is_contiguous():
        return tensor
    return tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)


def _touched_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows (S,), gradients (S, D))`` of a sparse ``(C, D)`` gradient: its entries summed by row, the rows
    whose gradient is all zeros left out (a padded entry moves nothing, replayed or eager). Entries already
    a row each, in order (a CPU layer's gradient; autograd drops the flag that says so), are taken as they
    are: summing them would copy every row."""
    rows = grad._indices()[0]  # (N,)
    if not bool((rows[1:] > rows[:-1]).all()):  # host sync: the check of the entries' rows
        grad = grad.coalesce()
        rows = grad._indices()[0]
    values = grad._values()  # (S, D)
    moved = values.ne(0).flatten(1).any(1)
    if bool(moved.all()):  # host sync (as the mask's indexing below): no copy of the rows where all move
        return rows, values
    return rows[moved], values[moved]


class HeadState(str, enum.Enum):
    """How a head keeps weights and optimizer state: ``fp32``, or ``bf16_sr`` (bf16, stochastic rounding)."""

    FP32 = "fp32"
    BF16_SR = "bf16_sr"


def to_bf16_state(module: nn.Module) -> nn.Module:
    """Cast ``module``'s floating-point parameters (not buffers) to bfloat16 in place; returns ``module``."""
    for param in module.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)
    return module


def head_input(features: Tensor, head: nn.Module) -> Tensor:
    """``features`` in the dtype of a bf16-state head (CPU runs have no autocast to cast them); else as is."""
    param = next(head.parameters(), None)
    if param is not None and param.dtype == torch.bfloat16 and features.is_floating_point():
        return features.to(torch.bfloat16)
    return features


def round_into_(target: Tensor, value: Tensor, *, seed: int) -> None:
    """Write fp32 ``value`` into ``target``: stochastically rounded if ``target`` is bf16, else copied."""
    if target.dtype == torch.bfloat16:
        if target.is_contiguous():
            stochastic_round(value.contiguous(), seed=seed, out=target)
        else:
            target.copy_(stochastic_round(value, seed=seed))
    else:
        target.copy_(value)


def adamw_math(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decoupled-weight-decay Adam step in fp32 (Loshchilov & Hutter 2019); returns new (w, m, v) in fp32.

    ``step`` counts from 1 and sets the bias corrections ``1 - beta^step``.
    """
    beta1, beta2 = betas
    w = weight.float()
    g = grad.float()
    m = exp_avg.float().mul_(beta1).add_(g, alpha=1 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
    w.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    return w, m, v


def sgd_math(
    weight: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor | None]:
    """One SGD step in fp32 (weight decay added to the gradient, heavy-ball momentum); returns (w, buffer)."""
    w = weight.float()
    g = grad.float()
    if weight_decay:
        g = g.add(w, alpha=weight_decay)
    buffer = None
    if momentum_buffer is not None:
        buffer = momentum_buffer.float().mul_(momentum).add_(g)
        g = buffer
    w.add_(g, alpha=-lr)
    return w, buffer


class _SeededOptimizer(torch.optim.Optimizer):
    """Shared bookkeeping: a base seed and a stable index per parameter for the rounding streams, and the
    step loop (each optimizer starts a parameter's state in :meth:`_init_state`, updates it in
    :meth:`_update`)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Apply one update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ids = self._tensor_ids()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    self._init_state(group, param, state)
                state["step"] += 1
                if param.grad.is_sparse:
                    rows, grads = _touched_rows(param.grad)
                    common = {
                        "step": state["step"],
                        "lr": group["lr"],
                        "weight_decay": group["weight_decay"],
                        "seed": rounding_seed(group["seed"], ids[id(param)]),
                    }
                    self._update_rows(group, param, state, (rows, grads), common)
                else:
                    self._update(group, param, state, ids[id(param)])
        return loss

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update(self, group: dict[str, Any], param: Tensor, state: dict[str, Any], tensor_id: int) -> None:
        raise NotImplementedError

    def _update_rows(self, group: _Dict, param: Tensor, state: _Dict, touched: _Rows, common: _Dict) -> None:
        """Update the rows ``touched = (rows (S,), grads (S, D))``; ``common``: step, lr, decay, seed."""
        raise NotImplementedError

    def _tensor_ids(self) -> dict[int, int]:
        ids: dict[int, int] = {}
        for group in self.param_groups:
            for param in group["params"]:
                ids.setdefault(id(param), len(ids))
        return ids

    def _seed(self, group: dict[str, Any], step: int, tensor_id: int, stream: int, chunk: int) -> int:
        return rounding_seed(group["seed"], step, tensor_id, stream, chunk)


class BF16AdamW(_SeededOptimizer):
    """AdamW whose moments live in each parameter's dtype, stochastically rounded when that is bfloat16.

    bf16 parameters keep bf16 ``exp_avg`` / ``exp_avg_sq`` (6 bytes a weight in all instead of 12); fp32
    parameters are updated exactly as :class:`torch.optim.AdamW` would, so one optimizer serves a mixed model.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: Adam's moment decay rates.
        eps: added to the denominator.
        weight_decay: decoupled weight decay.
        seed: base seed of the rounding streams.

    >>> w = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    >>> opt = BF16AdamW([w], lr=1e-3)
    >>> w.grad = torch.ones(3, dtype=torch.bfloat16); opt.step(); w.dtype
    torch.bfloat16
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"BF16AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"BF16AdamW: betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"BF16AdamW: eps must be > 0, got {eps}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "seed": seed}
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], param: Tensor, state: dict[str, Any], tensor_id: int) -> None:
        step = state["step"]
        if param.is_cuda and param.dtype == torch.bfloat16 and param.is_contiguous():
            # one fused kernel: bf16 in, bf16 out, no fp32 copy of anything (stochastic_rounding.sr_adamw_)
            seeds = tuple(
                self._seed(group, step, tensor_id, stream, 0) for stream in (_WEIGHT, _EXP_AVG, _EXP_AVG_SQ)
            )
            options = AdamWStep(
                group["lr"], *group["betas"], group["eps"], group["weight_decay"], step, seeds
            )
            sr_adamw_(param.data, param.grad, state["exp_avg"], state["exp_avg_sq"], options)
            return
        flats = [_flat(t, param) for t in (param.data, param.grad, state["exp_avg"], state["exp_avg_sq"])]
        for index, part in enumerate(_chunks(param)):
            weight, grad, exp_avg, exp_avg_sq = (t[part] for t in flats)
            w, m, v = adamw_math(
                weight,
                grad,
                exp_avg,
                exp_avg_sq,
                step=step,
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
            round_into_(weight, w, seed=self._seed(group, step, tensor_id, _WEIGHT, index))
            round_into_(exp_avg, m, seed=self._seed(group, step, tensor_id, _EXP_AVG, index))
            round_into_(exp_avg_sq, v, seed=self._seed(group, step, tensor_id, _EXP_AVG_SQ, index))

    def _update_rows(self, group: _Dict, param: Tensor, state: _Dict, touched: _Rows, common: _Dict) -> None:
        moments = state["exp_avg"], state["exp_avg_sq"]
        row_adamw_(param.data, *moments, *touched, betas=group["betas"], eps=group["eps"], **common)


class BF16SGD(_SeededOptimizer):
    """SGD (optional heavy-ball momentum) whose bf16 parameters and momentum are stochastically rounded.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: heavy-ball momentum; 0 keeps no state at all (2 bytes a bf16 weight).
        weight_decay: L2 penalty added to the gradient.
        seed: base seed of the rounding streams.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"BF16SGD: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"BF16SGD: momentum must be in [0, 1), got {momentum}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "seed": seed}
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        if group["momentum"]:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], param: Tensor, state: dict[str, Any], tensor_id: int) -> None:
        step = state["step"]
        buffer = state.get("momentum_buffer")
        flat_weight, flat_grad = _flat(param.data, param), _flat(param.grad, param)
        flat_buffer = None if buffer is None else _flat(buffer, param)
        for index, part in enumerate(_chunks(param)):
            weight = flat_weight[part]
            part_buffer = None if flat_buffer is None else flat_buffer[part]
            w, new_buffer = sgd_math(
                weight,
                flat_grad[part],
                part_buffer,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
            )
            round_into_(weight, w, seed=self._seed(group, step, tensor_id, _WEIGHT, index))
            if part_buffer is not None:
                round_into_(
                    part_buffer, new_buffer, seed=self._seed(group, step, tensor_id, _MOMENTUM, index)
                )

    def _update_rows(self, group: _Dict, param: Tensor, state: _Dict, touched: _Rows, common: _Dict) -> None:
        row_sgd_(param.data, state.get("momentum_buffer"), *touched, momentum=group["momentum"], **common)


def row_adamw_(
    weight: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    ids: Tensor,
    grads: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> None:
    """Row-sparse ("lazy") AdamW on rows ``ids`` of a ``(C, D)`` matrix, stochastically rounded if bf16.

    Only the touched rows' moments move; ``step`` (from 1) is the store's global step (bias corrections).

    Args:
        weight: ``(C, D)`` rows, bf16 or fp32, updated in place.
        exp_avg: ``(C, D)`` first moment, same dtype as ``weight``.
        exp_avg_sq: ``(C, D)`` second moment, same dtype as ``weight``.
        ids: ``(S,)`` unique row ids.
        grads: ``(S, D)`` gradients of those rows (any float dtype).
        step: global step, from 1.
        lr: learning rate.
        betas: Adam's moment decay rates.
        eps: added to the denominator.
        weight_decay: decoupled weight decay of the touched rows.
        seed: base seed; the rounding seed is derived from it and ``step``.
    """
    _check_rows(weight, ids, grads, exp_avg, exp_avg_sq)
    ids = ids.to(weight.device)
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        # float32 rows on the CPU: gathered, updated by PyTorch's fused AdamW kernel (one pass over the rows,
        # their moments and gradients, where adamw_math makes five), written back
        held = (weight, exp_avg, exp_avg_sq)
        rows, first, second = (take_rows(tensor, ids) for tensor in held)  # (S, D) each
        torch._fused_adamw_(
            [rows], [grads.float()], [first], [second], [], [torch.tensor(float(step))],
            lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
            maximize=False,
        )  # fmt: skip
        for tensor, updated in zip(held, (rows, first, second), strict=True):
            put_rows_(tensor, ids, updated)
        return
    w, m, v = adamw_math(
        weight[ids],
        grads.to(weight.device),
        exp_avg[ids],
        exp_avg_sq[ids],
        step=step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
    )  # each (S, D) fp32
    weight[ids] = _rounded(w, weight.dtype, rounding_seed(seed, step, _WEIGHT))
    exp_avg[ids] = _rounded(m, exp_avg.dtype, rounding_seed(seed, step, _EXP_AVG))
    exp_avg_sq[ids] = _rounded(v, exp_avg_sq.dtype, rounding_seed(seed, step, _EXP_AVG_SQ))


def row_sgd_(
    weight: Tensor,
    momentum_buffer: Tensor | None,
    ids: Tensor,
    grads: Tensor,
    *,
    step: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> None:
    """Row-sparse SGD on rows ``ids (S,)`` of ``weight (C, D)`` given ``grads (S, D)``; bf16 rows use SR.

    ``momentum_buffer`` is ``(C, D)`` like ``weight`` when ``momentum > 0``, else None.
    """
    if momentum and momentum_buffer is None:
        raise ValueError(f"row_sgd_: momentum={momentum} needs a momentum_buffer")
    _check_rows(weight, ids, grads, *([] if momentum_buffer is None else [momentum_buffer]))
    ids = ids.to(weight.device)
    buffer = None if momentum_buffer is None else momentum_buffer[ids]
    w, new_buffer = sgd_math(
        weight[ids], grads.to(weight.device), buffer, lr=lr, momentum=momentum, weight_decay=weight_decay
    )  # (S, D) fp32
    weight[ids] = _rounded(w, weight.dtype, rounding_seed(seed, step, _WEIGHT))
    if momentum_buffer is not None:
        seed_m = rounding_seed(seed, step, _MOMENTUM)
        momentum_buffer[ids] = _rounded(new_buffer, momentum_buffer.dtype, seed_m)


def _rounded(value: Tensor, dtype: torch.dtype, seed: int) -> Tensor:
    if dtype == torch.bfloat16:
        return stochastic_round(value.contiguous(), seed=seed)
    return value.to(dtype)


def _check_rows(weight: Tensor, ids: Tensor, grads: Tensor, *states: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"row update: weight must be (C, D), got shape {tuple(weight.shape)}")
    if ids.dim() != 1 or grads.shape != (ids.numel(), weight.shape[1]):
        raise ValueError(
            f"row update: expected ids (S,) and grads (S, {weight.shape[1]}), "
            f"got {tuple(ids.shape)} and {tuple(grads.shape)}"
        )
    for state in states:
        if state.shape != weight.shape or state.dtype != weight.dtype:
            raise ValueError(
                f"row update: optimizer state must match weight {tuple(weight.shape)} {weight.dtype}, "
                f"got {tuple(state.shape)} {state.dtype}"
            )
