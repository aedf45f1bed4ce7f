"""The Triton backend: the launchers registered as ``torch.library`` custom ops (with fake implementations, so
the op traces under ``torch.compile``), and the backend object :class:`LinearLossFunction` calls.

In eager mode the backend calls the op bodies directly: the dispatcher's round trip (its output aliasing check
and redispatch) is host time that an eager step, bound by the host at B 128, waits for (2 to 8% of a forward
and backward at C 670,091 on an H100). Under ``torch.compile`` it calls the custom ops. Triton itself is
imported inside the op bodies, when a kernel first runs. (No postponed annotations here: ``custom_op`` reads
the signature's types at registration.)
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from megaclass.ops.linear_cross_entropy.common import DenseOperands, LinearLossOptions, LossKind

__all__ = ["TritonBackend", "gated_scale_", "linear_loss_bwd", "linear_loss_fwd", "linear_loss_fwd_grads"]


def _fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, exclude: Tensor | None, loss: str, scale: float
) -> Tensor:
    """``(B,)`` float32 per-row reduction over all classes: logsumexp (softmax), sum softplus, sum hinge^2."""
    from megaclass.ops.linear_cross_entropy import kernels

    maxima, sums = kernels.linear_loss_fwd(x, weight, bias, exclude, loss=loss, scale=scale)  # (B, splits)
    if loss != LossKind.SOFTMAX.value:
        return sums.sum(dim=1)
    return torch.logsumexp(maxima + torch.log(sums), dim=1)  # combine the splits' (m, s): m + log s


linear_loss_fwd = torch.library.custom_op("megaclass::linear_loss_fwd", _fwd, mutates_args=())


@linear_loss_fwd.register_fake
def _(x, weight, bias, exclude, loss, scale):  # the op's arguments; their types are the op's
    return x.new_empty(x.shape[0], dtype=torch.float32)


def _bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    exclude: Tensor | None,
    lse: Tensor,
    coef: Tensor,
    loss: str,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``(dx (B, D), dW (C, D), dbias (C,) or (0,) without bias)`` of the dense part."""
    from megaclass.ops.linear_cross_entropy import kernels

    grad_x, grad_weight, grad_bias = kernels.linear_loss_bwd(
        x, weight, bias, exclude, lse, coef, loss=loss, scale=scale
    )
    if grad_bias is None:
        grad_bias = x.new_empty(0, dtype=torch.float32)
    return grad_x, grad_weight, grad_bias


linear_loss_bwd = torch.library.custom_op("megaclass::linear_loss_bwd", _bwd, mutates_args=())


@linear_loss_bwd.register_fake
def _(x, weight, bias, exclude, lse, coef, loss, scale):  # the op's arguments; their types are the op's
    classes = weight.shape[0] if bias is not None else 0
    return (
        x.new_empty(x.shape, dtype=torch.float32),
        weight.new_empty(weight.shape, dtype=torch.float32),
        x.new_empty(classes, dtype=torch.float32),
    )


def _fwd_grads(
    x: Tensor, weight: Tensor, bias: Tensor | None, coef: Tensor, loss: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bce / squared hinge: ``(reduced (B,), dx, dW, dbias or (0,))`` float32 in one pass over ``W``, the
    gradients at the row weights ``coef``."""
    from megaclass.ops.linear_cross_entropy import kernels

    reduced, grad_x, grad_weight, grad_bias = kernels.linear_loss_fwd_grads(x, weight, bias, coef, loss=loss)
    if grad_bias is None:
        grad_bias = x.new_empty(0, dtype=torch.float32)
    return reduced, grad_x, grad_weight, grad_bias


linear_loss_fwd_grads = torch.library.custom_op(
    "megaclass::linear_loss_fwd_grads", _fwd_grads, mutates_args=()
)


@linear_loss_fwd_grads.register_fake
def _(x, weight, bias, coef, loss):  # the op's arguments; their types are the op's
    classes = weight.shape[0] if bias is not None else 0
    return (
        x.new_empty(x.shape[0], dtype=torch.float32),
        x.new_empty(x.shape, dtype=torch.float32),
        weight.new_empty(weight.shape, dtype=torch.float32),
        x.new_empty(classes, dtype=torch.float32),
    )


def _gated_scale(values: Tensor, factor: Tensor) -> None:
    """``values *= factor`` in place (contiguous float32), skipped on the device when ``factor == 1``."""
    from megaclass.ops.linear_cross_entropy import kernels

    kernels.gated_scale_(values, factor)


gated_scale_ = torch.library.custom_op("megaclass::gated_scale_", _gated_scale, mutates_args=("values",))


@gated_scale_.register_fake
def _(values, factor):
    return None


@dataclass(frozen=True)
class TritonBackend:
    """Dense part over all classes in the Triton kernels of :mod:`.kernels`.

    Args:
        fuse_gradient: bce / squared hinge compute their gradients in the forward pass (one pass over ``W``
            for both; fp32 and bf16 features); False recomputes the logits in backward as softmax does (the
            slower schedule, kept to measure against: ``benchmarks/heads.py``).
    """

    fuse_gradient: bool = True

    def fuses_gradient(self, dense: DenseOperands) -> bool:
        # fp16 keeps G at the row weights (1/B) until backward scales it: values that an AMP loss scale
        # would keep above fp16's smallest subnormal could round to 0 there; bf16 has fp32's exponent range
        return (
            self.fuse_gradient
            and dense.options.loss is not LossKind.SOFTMAX
            and dense.x.dtype != torch.float16
        )

    def reduce_and_grads(
        self, dense: DenseOperands, coef: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
        x, weight, bias, _, options = dense
        reduced, grad_x, grad_weight, grad_bias = _eager_or_op(_fwd_grads, linear_loss_fwd_grads)(
            x, weight, bias, coef.contiguous(), options.loss.value
        )
        return reduced, (grad_x, grad_weight, grad_bias if bias is not None else None)

    def scale_grads(self, grads: tuple[Tensor, Tensor, Tensor | None], factor: Tensor) -> None:
        grad_x, grad_weight, grad_bias = grads
        factor = factor.float().reshape(1)
        grad_x.mul_(factor)  # (B, D): small, scaled unconditionally
        scale = _eager_or_op(_gated_scale, gated_scale_)
        scale(grad_weight, factor)
        if grad_bias is not None:
            scale(grad_bias, factor)

    def reduce(self, dense: DenseOperands) -> Tensor:
        x, weight, bias, exclude, options = dense
        return _eager_or_op(_fwd, linear_loss_fwd)(
            x, weight, bias, exclude, options.loss.value, _scale(options)
        )

    def grads(self, dense: DenseOperands, lse: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x, weight, bias, exclude, options = dense
        grad_x, grad_weight, grad_bias = _eager_or_op(_bwd, linear_loss_bwd)(
            x, weight, bias, exclude, lse, coef.contiguous(), options.loss.value, _scale(options)
        )
        return grad_x, grad_weight, grad_bias if bias is not None else None


def _eager_or_op(body: Callable, op: Callable) -> Callable:
    """``body`` in eager mode (no dispatcher round trip), its registered custom ``op`` under torch.compile."""
    return op if torch.compiler.is_compiling() else body


def _scale(options: LinearLossOptions) -> float:
    """The kernels' cosine flag: ``scale > 0`` means logits are ``scale * cos``."""
    return float(options.margin.scale) if options.cosine else 0.0
