"""Autograd Function and public functionals of the fixed fan-in layer.

``impl`` picks the launchers at call time: Triton kernels for CUDA tensors (``kernels.py``), the chunked
plain-PyTorch launchers otherwise (``chunked.py``). Both keep no ``B x C`` tensor for the backward pass of the
fused row values. With the Triton kernels, BCE and squared-hinge row values that need gradients get them in
the forward pass (one read of the weights and gathers; ``kernels.fixed_fanin_fwd_grad``), and the backward
pass finishes them for the row gradient that actually arrives.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megaclass.ops import Impl, resolve_impl

__all__ = [
    "FaninLoss",
    "FixedFaninFunction",
    "FixedFaninOptions",
    "fixed_fanin",
    "fixed_fanin_rows",
    "fixed_fanin_rows_positive",
    "positive_values",
]


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
    # Triton, BCE / hinge: gradients in the forward pass (off: the backward pass recomputes the logits)
    fuse_gradient: bool = True
    # the gradient each row value is expected to get, a speed hint of the fused pass (any row gradient is
    # exact; the expected one costs nothing more); None: 1 / B, the mean over samples
    row_grad: float | None = None
    # Triton: label tiles per program; 0: one in the passes that write gradients, by size in the others
    tiles_per_program: int = 0


def _launchers(impl: Impl, tiles_per_program: int = 0) -> tuple[Any, Any]:
    if impl is Impl.TRITON:
        from megaclass.ops.fixed_fanin.kernels import fixed_fanin_bwd, fixed_fanin_fwd

        tiles = {"tiles_per_program": tiles_per_program}
        return functools.partial(fixed_fanin_fwd, **tiles), functools.partial(fixed_fanin_bwd, **tiles)
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
def _(x, weight, index, bias, group, loss, impl):  # the op's arguments; their types are the op's
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
def _(x, weight, index, bias, grad, lse, group, loss, impl):  # the op's arguments; their types are the op's
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else weight.new_empty(0),
    )


def positive_values(
    x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, samples: Tensor, labels: Tensor, group: int
) -> Tensor:
    """``(L,)`` fp32 logits ``z[samples[l], labels[l]]`` from ``L`` gathers of ``K`` inputs."""
    cols = index[labels // group].long()  # (L, K)
    z = (x[samples[:, None], cols].float() * weight[labels].float()).sum(1)  # (L, K) -> (L,)
    return z if bias is None else z + bias[labels].float()


def _add_positive_grads(
    grad_pos: Tensor,
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    samples: Tensor,
    labels: Tensor,
    group: int,
    grads: tuple[Tensor, Tensor, Tensor | None],
) -> None:
    """Add the gradients of ``positive_values`` (``L`` sparse entries) into the layer's ``grads`` in place."""
    grad_x, grad_w, grad_b = grads
    cols = index[labels // group].long()  # (L, K)
    g = grad_pos.float()[:, None]  # (L, 1)
    grad_w.index_add_(0, labels, (g * x[samples[:, None], cols].float()).to(grad_w.dtype))
    rows = samples[:, None].expand_as(cols)  # (L, K)
    grad_x.index_put_((rows, cols), (g * weight[labels].float()).to(grad_x.dtype), accumulate=True)
    if grad_b is not None:
        grad_b.index_add_(0, labels, grad_pos.to(grad_b.dtype))


def _layer_forward(
    x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, options: FixedFaninOptions
) -> Tensor:
    """The launchers directly in eager mode (no dispatcher round trip); the custom op under torch.compile."""
    if torch.compiler.is_compiling():
        loss, impl = options.loss.value, options.impl.value
        return _fixed_fanin_fwd_op(x, weight, index, bias, options.group, loss, impl)
    forward_launcher, _ = _launchers(options.impl, options.tiles_per_program)
    return forward_launcher(x, weight, index, bias, group=options.group, loss=options.loss.value)


def _fuses_gradient(options: FixedFaninOptions, needs_grad: bool) -> bool:
    """Gradients in the forward pass: Triton BCE / hinge row values that need them, in eager mode."""
    fusable = options.loss in (FaninLoss.BCE, FaninLoss.HINGE) and options.impl is Impl.TRITON
    return fusable and options.fuse_gradient and needs_grad and not torch.compiler.is_compiling()


def _layer_backward(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    bias: Tensor | None,
    grad: Tensor,
    lse: Tensor | None,
    options: FixedFaninOptions,
) -> tuple[Tensor, Tensor, Tensor | None]:
    if torch.compiler.is_compiling():
        grad_x, grad_w, grad_b = _fixed_fanin_bwd_op(
            x, weight, index, bias, grad, lse, options.group, options.loss.value, options.impl.value
        )
        return grad_x, grad_w, grad_b if bias is not None else None
    _, backward_launcher = _launchers(options.impl, options.tiles_per_program)
    return backward_launcher(
        x, weight, index, bias, group=options.group, loss=options.loss.value, grad=grad, lse=lse
    )


class FixedFaninFunction(torch.autograd.Function):
    """``(x, weight, index, bias, samples, labels, options, grad_enabled) -> (out, positive)``: logits
    ``(B, C)`` or fused row values ``(B,)``, and the ``(L,)`` fp32 logits at ``(samples, labels)`` (empty
    ``samples`` give an empty tensor); ``grad_enabled``: the caller's grad mode (no gradients are computed in
    the forward pass without it).

    The positive logits ride along so their gradient is added sparsely into the layer's gradients rather
    than as a dense ``(C, K)`` tensor that autograd would sum with them. The launchers run directly in eager
    mode and through the ``megaclass::fixed_fanin_fwd`` / ``_bwd`` custom ops under ``torch.compile``.
    Fused BCE / hinge (:func:`_fuses_gradient`) computes the gradients in the forward pass at the expected row
    gradient and keeps them until the backward pass finishes them; a second backward pass through the same
    graph recomputes them.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        index: Tensor,
        bias: Tensor | None,
        samples: Tensor,
        labels: Tensor,
        options: FixedFaninOptions,
        grad_enabled: bool,
    ) -> tuple[Tensor, Tensor]:
        ctx.fused = None
        # inside forward grad mode is off and needs_input_grad ignores it: the caller says whether it was on
        if _fuses_gradient(options, grad_enabled and any(ctx.needs_input_grad[:4])):
            from megaclass.ops.fixed_fanin.kernels import fixed_fanin_fwd_grad

            row_grad = options.row_grad if options.row_grad is not None else 1.0 / max(1, x.shape[0])
            out, grads = fixed_fanin_fwd_grad(
                x, weight, index, bias, group=options.group, loss=options.loss.value, row_grad=row_grad,
                tiles_per_program=options.tiles_per_program,
            )  # fmt: skip
            ctx.fused = (row_grad, grads)
        else:
            out = _layer_forward(x, weight, index, bias, options)
        if samples.numel() == 0:
            positive = x.new_empty(0, dtype=torch.float32)
        else:
            positive = positive_values(x, weight, index, bias, samples, labels, options.group)
        lse = out if options.loss is FaninLoss.SOFTMAX else None
        ctx.save_for_backward(x, weight, index, bias, lse, samples, labels)
        ctx.options = options
        ctx.set_materialize_grads(False)
        return out, positive

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, grad_pos: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, index, bias, lse, samples, labels = ctx.saved_tensors
        options: FixedFaninOptions = ctx.options
        if grad is None:  # only the positives are used: the layer's own output contributes nothing
            dense = options.loss is FaninLoss.NONE
            grad = x.new_zeros(x.shape[0], weight.shape[0]) if dense else x.new_zeros(x.shape[0]).float()
        if ctx.fused is not None:
            from megaclass.ops.fixed_fanin.kernels import fixed_fanin_grad_finish

            row_grad, fused = ctx.fused
            ctx.fused = None  # finished in place: a second backward pass recomputes
            grads = fixed_fanin_grad_finish(
                x, weight, index, bias, group=options.group, loss=options.loss.value, grad=grad,
                row_grad=row_grad, grads=fused, tiles_per_program=options.tiles_per_program,
            )  # fmt: skip
        else:
            grads = _layer_backward(x, weight, index, bias, grad.contiguous(), lse, options)
        if grad_pos is not None and samples.numel() > 0:
            _add_positive_grads(grad_pos, x, weight, index, samples, labels, options.group, grads)
        grad_x, grad_w, grad_b = grads
        return grad_x, grad_w, None, grad_b if bias is not None else None, None, None, None, None


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
    none = torch.empty(0, dtype=torch.long, device=x.device)
    weight, index, grad_enabled = weight.contiguous(), index.contiguous(), torch.is_grad_enabled()
    return FixedFaninFunction.apply(x, weight, index, bias, none, none, options, grad_enabled)[0]


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
    none = torch.empty(0, dtype=torch.long, device=x.device)
    return fixed_fanin_rows_positive(x, weight, index, none, none, bias, group=group, loss=loss, impl=impl)[0]


def fixed_fanin_rows_positive(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    samples: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    group: int = 1,
    loss: FaninLoss | str = "bce",
    impl: Impl | str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fused row values ``(B,)`` (see :func:`fixed_fanin_rows`) and the ``(L,)`` fp32 logits
    ``z[samples[l], labels[l]]`` in one autograd node: the positives' gradient goes sparsely into the
    layer's gradients (``L`` rows) instead of a dense ``(C, K)`` tensor summed with them.

    Args:
        samples: ``(L,)`` int64 sample of each positive entry.
        labels: ``(L,)`` int64 label of each positive entry.
    """
    _check_inputs(x, weight, index, bias, group)
    loss = FaninLoss(loss)
    if loss is FaninLoss.NONE:
        raise ValueError("loss: expected 'bce', 'hinge' or 'softmax' for fused row values, got 'none'")
    if samples.shape != labels.shape or samples.dim() != 1:
        raise ValueError(
            f"samples, labels: expected two (L,) tensors, got shapes {tuple(samples.shape)} and "
            f"{tuple(labels.shape)}"
        )
    options = FixedFaninOptions(group=group, loss=loss, impl=resolve_impl(impl, x, weight, index))
    weight, index, samples, labels = weight.contiguous(), index.contiguous(), samples.long(), labels.long()
    return FixedFaninFunction.apply(x, weight, index, bias, samples, labels, options, torch.is_grad_enabled())
