"""Autograd Function and public functionals of the fixed fan-in layer.

``impl`` picks the launchers at call time: Triton kernels for CUDA tensors (``kernels.py``), the chunked
plain-PyTorch launchers otherwise (``chunked.py``). Both keep no ``B x C`` tensor for the backward pass of the
fused row values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megaclass.ops import Impl, resolve_impl

__all__ = ["FaninLoss", "FixedFaninFunction", "FixedFaninOptions", "fixed_fanin", "fixed_fanin_rows"]


class FaninLoss(str, enum.Enum):
    """What the layer's pass produces: plain logits, or fused row values of a loss."""

    NONE = "none"
    BCE = "bce"
    HINGE = "hinge"
    SOFTMAX = "softmax"


@dataclass(frozen=True)
class FixedFaninOptions:
    """Non-tensor options of :class:`FixedFaninFunction`."""

    group: int = 1  # G labels share one index row
    loss: FaninLoss = FaninLoss.NONE
    impl: Impl = Impl.REFERENCE  # concrete: TRITON or REFERENCE (chunked PyTorch)


def _launchers(impl: Impl) -> tuple[Any, Any]:
    if impl is Impl.TRITON:
        from megaclass.ops.fixed_fanin.kernels import fixed_fanin_bwd, fixed_fanin_fwd

        return fixed_fanin_fwd, fixed_fanin_bwd
    from megaclass.ops.fixed_fanin.chunked import chunked_bwd, chunked_fwd

    return chunked_fwd, chunked_bwd


@torch.library.custom_op("megaclass::fixed_fanin_fwd", mutates_args=())
def _fixed_fanin_fwd_op(
    x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, group: int, loss: str, impl: str
) -> Tensor:
    """Logits ``(B, C)`` (``loss="none"``) or fp32 row values ``(B,)``, by the launchers of ``impl``."""
    forward_launcher, _ = _launchers(Impl(impl))
    return forward_launcher(x, weight, index, bias, group=group, loss=loss)


@_fixed_fanin_fwd_op.register_fake
def _(
    x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, group: int, loss: str, impl: str
) -> Tensor:
    if loss == FaninLoss.NONE.value:
        return x.new_empty(x.shape[0], weight.shape[0])
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("megaclass::fixed_fanin_bwd", mutates_args=())
def _fixed_fanin_bwd_op(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    bias: Tensor | None,
    grad: Tensor,
    lse: Tensor | None,
    group: int,
    loss: str,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; ``dbias`` is empty without a bias (custom ops return no None)."""
    _, backward_launcher = _launchers(Impl(impl))
    grad_x, grad_w, grad_b = backward_launcher(
        x, weight, index, bias, group=group, loss=loss, grad=grad, lse=lse
    )
    return grad_x, grad_w, grad_b if grad_b is not None else weight.new_empty(0)


@_fixed_fanin_bwd_op.register_fake
def _(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    bias: Tensor | None,
    grad: Tensor,
    lse: Tensor | None,
    group: int,
    loss: str,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else weight.new_empty(0),
    )


class FixedFaninFunction(torch.autograd.Function):
    """``(x, weight, index, bias) -> logits (B, C)`` or fused row values ``(B,)``; index gets no gradient.

    Forward and backward run the ``megaclass::fixed_fanin_fwd`` / ``_bwd`` custom ops, so ``torch.compile``
    traces through them.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, options: FixedFaninOptions
    ) -> Tensor:
        out = _fixed_fanin_fwd_op(
            x, weight, index, bias, options.group, options.loss.value, options.impl.value
        )
        lse = out if options.loss is FaninLoss.SOFTMAX else None
        ctx.save_for_backward(x, weight, index, bias, lse)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, index, bias, lse = ctx.saved_tensors
        options: FixedFaninOptions = ctx.options
        grad_x, grad_w, grad_b = _fixed_fanin_bwd_op(
            x,
            weight,
            index,
            bias,
            grad.contiguous(),
            lse,
            options.group,
            options.loss.value,
            options.impl.value,
        )
        return grad_x, grad_w, None, grad_b if bias is not None else None, None


def _check_inputs(x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, group: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x: expected (B, D), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or index.dim() != 2:
        raise ValueError(f"weight, index: expected 2-D, got {tuple(weight.shape)} and {tuple(index.shape)}")
    if group < 1:
        raise ValueError(f"group: expected >= 1, got {group}")
    classes, fan_in = weight.shape
    groups = -(-classes // group)
    if tuple(index.shape) != (groups, fan_in):
        raise ValueError(
            f"index: expected shape (ceil(C / group), K) = ({groups}, {fan_in}), got {tuple(index.shape)}"
        )
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index: expected int32 or int64, got {index.dtype}")
    if bias is not None and tuple(bias.shape) != (classes,):
        raise ValueError(f"bias: expected shape ({classes},), got {tuple(bias.shape)}")


def fixed_fanin(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    bias: Tensor | None = None,
    *,
    group: int = 1,
    impl: Impl | str = "auto",
) -> Tensor:
    """Fixed fan-in sparse layer ``y[b, c] = sum_k x[b, index[c // group, k]] * weight[c, k] (+ bias[c])``.

    Args:
        x: ``(B, D)`` inputs.
        weight: ``(C, K)`` the ``K`` weights of each label.
        index: ``(ceil(C / group), K)`` int32/int64 input columns; the ``group`` labels ``g*G .. g*G+G-1``
            share row ``g`` (``group=1``: one row per label).
        bias: optional ``(C,)``.
        group: ``G``; powers of two ``>= 16`` run on tensor cores.
        impl: ``auto`` (Triton on CUDA), ``triton`` or ``reference``.

    Returns:
        ``(B, C)`` logits in ``x``'s dtype.

    >>> x, w, idx = torch.randn(2, 8), torch.randn(3, 4), torch.randint(0, 8, (3, 4))
    >>> fixed_fanin(x, w, idx).shape
    torch.Size([2, 3])
    """
    _check_inputs(x, weight, index, bias, group)
    options = FixedFaninOptions(group=group, loss=FaninLoss.NONE, impl=resolve_impl(impl, x, weight, index))
    return FixedFaninFunction.apply(x, weight.contiguous(), index.contiguous(), bias, options)


def fixed_fanin_rows(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    bias: Tensor | None = None,
    *,
    group: int = 1,
    loss: FaninLoss | str = "bce",
    impl: Impl | str = "auto",
) -> Tensor:
    """Fused row values ``(B,)`` fp32 over all ``C`` labels, without keeping ``B x C`` logits.

    ``bce``: ``sum_c softplus(z[b, c])``; ``hinge``: ``sum_c max(0, 1 + z[b, c])^2`` (the losses with every
    target 0); ``softmax``: ``logsumexp_c z[b, c]``. Differentiable in ``x``, ``weight`` and ``bias``.
    """
    _check_inputs(x, weight, index, bias, group)
    loss = FaninLoss(loss)
    if loss is FaninLoss.NONE:
        raise ValueError("loss: expected 'bce', 'hinge' or 'softmax' for fused row values, got 'none'")
    options = FixedFaninOptions(group=group, loss=loss, impl=resolve_impl(impl, x, weight, index))
    return FixedFaninFunction.apply(x, weight.contiguous(), index.contiguous(), bias, options)
