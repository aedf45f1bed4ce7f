"""Plain-PyTorch chunked backend: the executable spec, the CPU path and the benchmark baseline.

Memory is ``O(B x chunk_size)``: each class chunk's logits are built, reduced and dropped; backward rebuilds
them.
Inputs are rounded to ``x.dtype`` (each weight chunk is cast to it) and multiplied with float32
accumulation and
output, as the kernels do; every reduction is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megaclass.ops.linear_cross_entropy.common import (
    NORM_EPS,
    DenseOperands,
    LinearLossOptions,
    LossKind,
    linear_loss_apply,
)
from megaclass.targets import Targets

__all__ = ["ReferenceBackend", "reference_linear_loss"]


def _chunk_logits(
    x: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int, options: LinearLossOptions
) -> tuple[Tensor, Tensor | None]:
    """``(B, stop - start)`` float32 logits of one class chunk and, with a margin, the chunk's row norms."""
    rows = weight[start:stop]  # (c, D)
    logits = x.float() @ rows.to(x.dtype).float().T  # (B, c)
    if options.cosine:
        norms = rows.float().norm(dim=-1).clamp_min(NORM_EPS)  # (c,)
        return logits * (options.margin.scale / norms), norms
    if bias is not None:
        logits = logits + bias[start:stop].float()
    return logits, None


def _mask_excluded(values: Tensor, exclude: Tensor | None, start: int, fill: float) -> Tensor:
    """Set ``values[b, exclude[b] - start]`` to ``fill`` where that class lies in the chunk."""
    if exclude is None:
        return values
    columns = torch.arange(start, start + values.shape[1], device=values.device)
    return values.masked_fill(columns[None, :] == exclude[:, None], fill)


class ReferenceBackend:
    """Dense part over class chunks of ``options.chunk_size`` in plain PyTorch."""

    def fuses_gradient(self, dense: DenseOperands) -> bool:
        return False  # the plain schedule: every backward pass recomputes the logits

    def reduce(self, dense: DenseOperands) -> Tensor:
        x, weight, bias, exclude, options = dense
        classes = weight.shape[0]
        if options.loss is LossKind.SOFTMAX:
            lse = torch.full((x.shape[0],), -torch.inf, dtype=torch.float32, device=x.device)
        else:
            total = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, classes, options.chunk_size):
            stop = min(start + options.chunk_size, classes)
            logits, _ = _chunk_logits(x, weight, bias, start, stop, options)
            if options.loss is LossKind.SOFTMAX:
                logits = _mask_excluded(logits, exclude, start, -torch.inf)
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            elif options.loss is LossKind.BCE:
                total += F.softplus(logits).sum(1)
            else:
                total += F.relu(1 + logits).square().sum(1)
        return lse if options.loss is LossKind.SOFTMAX else total

    def grads(self, dense: DenseOperands, lse: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x, weight, bias, exclude, options = dense
        classes = weight.shape[0]
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=x.device)
        grad_bias = None if bias is None else torch.empty(classes, dtype=torch.float32, device=x.device)
        for start in range(0, classes, options.chunk_size):
            stop = min(start + options.chunk_size, classes)
            logits, norms = _chunk_logits(x, weight, bias, start, stop, options)
            if options.loss is LossKind.SOFTMAX:
                slope = torch.exp(logits - lse[:, None])
            elif options.loss is LossKind.BCE:
                slope = torch.sigmoid(logits)
            else:
                slope = 2 * F.relu(1 + logits)
            g = _mask_excluded(slope * coef[:, None], exclude, start, 0.0)  # (B, c) d loss / d z
            rows = weight[start:stop]
            if grad_bias is not None:
                grad_bias[start:stop] = g.sum(0)
            if norms is not None:
                # z = s * u / n with u = x . w: dz/du = s / n, dz/dw = (s / n) (x - (u / n^2) w)
                g = g * (options.margin.scale / norms)
                cosine = logits / options.margin.scale
                radial = (g * cosine).sum(0) / norms  # (c,)
            g_low = g.to(x.dtype).float()  # rounded like the kernels' tl.dot operands
            grad_weight[start:stop] = g_low.T @ x.float()
            if norms is not None:
                grad_weight[start:stop] -= radial[:, None] * rows.float()
            grad_x += g_low @ rows.to(x.dtype).float()
        return grad_x, grad_weight, grad_bias


def reference_linear_loss(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    *,
    bias: Tensor | None = None,
    options: LinearLossOptions | None = None,
) -> Tensor:
    """Scalar loss of ``x @ weight.T (+ bias)`` in plain PyTorch, class chunk by class chunk."""
    return linear_loss_apply(x, weight, targets, bias, options or LinearLossOptions(), ReferenceBackend())
