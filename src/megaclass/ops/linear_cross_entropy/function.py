"""The Triton backend: the launchers registered as ``torch.library`` custom ops (with fake implementations, so
the op traces under ``torch.compile``), and the backend object :class:`LinearLossFunction` calls.

Triton itself is imported inside the op bodies, when a kernel first runs. (No postponed annotations here:
``custom_op`` reads the signature's types at registration.)
"""

import torch
from torch import Tensor

from megaclass.ops.linear_cross_entropy.common import DenseOperands, LinearLossOptions, LossKind

__all__ = ["TritonBackend", "linear_loss_bwd", "linear_loss_fwd"]


@torch.library.custom_op("megaclass::linear_loss_fwd", mutates_args=())
def linear_loss_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, exclude: Tensor | None, loss: str, scale: float
) -> Tensor:
    """``(B,)`` float32 per-row reduction over all classes: logsumexp (softmax), sum softplus, sum hinge^2."""
    from megaclass.ops.linear_cross_entropy import kernels

    maxima, sums = kernels.linear_loss_fwd(x, weight, bias, exclude, loss=loss, scale=scale)  # (B, splits)
    if loss != LossKind.SOFTMAX.value:
        return sums.sum(dim=1)
    return torch.logsumexp(maxima + torch.log(sums), dim=1)  # combine the splits' (m, s): m + log s


@linear_loss_fwd.register_fake
def _(x, weight, bias, exclude, loss, scale):  # the op's arguments; their types are the op's
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("megaclass::linear_loss_bwd", mutates_args=())
def linear_loss_bwd(
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


@linear_loss_bwd.register_fake
def _(x, weight, bias, exclude, lse, coef, loss, scale):  # the op's arguments; their types are the op's
    classes = weight.shape[0] if bias is not None else 0
    return (
        x.new_empty(x.shape, dtype=torch.float32),
        weight.new_empty(weight.shape, dtype=torch.float32),
        x.new_empty(classes, dtype=torch.float32),
    )


class TritonBackend:
    """Dense part over all classes in the Triton kernels of :mod:`.kernels`."""

    def reduce(self, dense: DenseOperands) -> Tensor:
        x, weight, bias, exclude, options = dense
        return linear_loss_fwd(x, weight, bias, exclude, options.loss.value, _scale(options))

    def grads(self, dense: DenseOperands, lse: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x, weight, bias, exclude, options = dense
        grad_x, grad_weight, grad_bias = linear_loss_bwd(
            x, weight, bias, exclude, lse, coef.contiguous(), options.loss.value, _scale(options)
        )
        return grad_x, grad_weight, grad_bias if bias is not None else None


def _scale(options: LinearLossOptions) -> float:
    """The kernels' cosine flag: ``scale > 0`` means logits are ``scale * cos``."""
    return float(options.margin.scale) if options.cosine else 0.0
