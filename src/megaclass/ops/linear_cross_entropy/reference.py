"""Plain-PyTorch chunked backend: the executable spec, the CPU path and the benchmark baseline.

Memory is ``O(B x chunk_size)``: each class chunk's logits are built, reduced and dropped; softmax's backward
rebuilds them, while bce and squared hinge write their gradients from the forward pass's logits (as the Triton
backend does) when an input needs one. Softmax does so too where the batch's whole ``(B, C)`` float32 logits
fit :data:`HELD_LOGITS_BYTES` (:func:`holds_softmax_logits`): it holds them until the rows' lse is known,
three matmuls a chunk instead of four.
Inputs are rounded to ``x.dtype`` (each weight chunk is cast to it) and multiplied with float32 accumulation
and output, as the kernels do; every reduction is float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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

__all__ = ["HELD_LOGITS_BYTES", "ReferenceBackend", "holds_softmax_logits", "reference_linear_loss"]

HELD_LOGITS_BYTES = 1 << 28  # softmax's forward pass holds a batch's float32 logits up to 256 MiB


def holds_softmax_logits(options: LinearLossOptions, batch: int, classes: int) -> bool:
    """Whether the reference backend's forward pass holds the ``(batch, classes)`` float32 logits to write
    the gradients there (when one is wanted) rather than rebuild them in backward: softmax without a cosine
    margin (whose lse takes the target's logit, computed apart), where they fit :data:`HELD_LOGITS_BYTES`."""
    softmax = options.loss is LossKind.SOFTMAX and not options.cosine
    return softmax and batch * classes * 4 <= HELD_LOGITS_BYTES


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


@dataclass(frozen=True)
class ReferenceBackend:
    """Dense part over class chunks of ``options.chunk_size`` in plain PyTorch.

    Args:
        fuse_gradient: bce / squared hinge compute their gradients in the forward pass from the logits it
            builds anyway (three matmuls a chunk, not four; fp32 and bf16 features, as the Triton backend),
            and so does softmax where :func:`holds_softmax_logits`; False recomputes the logits in
            backward.
    """

    fuse_gradient: bool = True

    def fuses_gradient(self, dense: DenseOperands) -> bool:
        # fp16 keeps G at the row weights (1/B) until backward scales it: see TritonBackend.fuses_gradient
        if not self.fuse_gradient or dense.x.dtype == torch.float16:
            return False
        batch, classes = dense.x.shape[0], dense.weight.shape[0]
        return dense.options.loss is not LossKind.SOFTMAX or holds_softmax_logits(
            dense.options, batch, classes
        )

    def reduce(self, dense: DenseOperands) -> Tensor:
        if dense.options.loss is LossKind.SOFTMAX:
            return _rows_lse(dense, _chunks(dense))
        total = torch.zeros(dense.x.shape[0], dtype=torch.float32, device=dense.x.device)
        for _, _, logits, _ in _chunks(dense):
            total += _per_logit_loss(logits, dense.options.loss).sum(1)
        return total

    def grads(self, dense: DenseOperands, lse: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        grads = _empty_grads(dense)
        for start, stop, logits, norms in _chunks(dense):
            _add_chunk_grads(dense, start, stop, logits, norms, lse, coef, grads)
        return grads

    def reduce_and_grads(
        self, dense: DenseOperands, coef: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
        grads = _empty_grads(dense)
        if dense.options.loss is LossKind.SOFTMAX:  # every chunk's logits held until the rows' lse is known
            held = list(_chunks(dense))
            lse = _rows_lse(dense, held)
            for start, stop, logits, norms in held:
                _add_chunk_grads(dense, start, stop, logits, norms, lse, coef, grads)
            return lse, grads
        total = torch.zeros(dense.x.shape[0], dtype=torch.float32, device=dense.x.device)
        for start, stop, logits, norms in _chunks(dense):
            total += _per_logit_loss(logits, dense.options.loss).sum(1)
            _add_chunk_grads(dense, start, stop, logits, norms, None, coef, grads)
        return total, grads

    def scale_grads(self, grads: tuple[Tensor, Tensor, Tensor | None], factor: Tensor) -> None:
        factor = factor.float().reshape(())
        if factor.device.type == "cpu" and factor.item() == 1.0:
            return  # the usual upstream gradient: no pass over the (C, D) buffer (a GPU would sync to know)
        for grad in grads:
            if grad is not None:
                grad.mul_(factor)


def _rows_lse(dense: DenseOperands, chunks: Iterable[tuple[int, int, Tensor, Tensor | None]]) -> Tensor:
    """``(B,)`` float32 logsumexp of each row over the classes of ``chunks`` (:func:`_chunks`), each row's
    excluded class (a margin's target) left out."""
    lse = torch.full((dense.x.shape[0],), -torch.inf, dtype=torch.float32, device=dense.x.device)
    for start, _, logits, _ in chunks:
        logits = _mask_excluded(logits, dense.exclude, start, -torch.inf)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
    return lse


def _per_logit_loss(logits: Tensor, loss: LossKind) -> Tensor:
    """softplus(z) (bce) or relu(1 + z)^2 (squared hinge): each logit's loss were its class a negative (the
    positives are corrected apart)."""
    return F.softplus(logits) if loss is LossKind.BCE else F.relu(1 + logits).square()


def _chunks(dense: DenseOperands) -> Iterator[tuple[int, int, Tensor, Tensor | None]]:
    """``(start, stop, logits (B, stop - start), row norms or None)`` of each class chunk in turn."""
    x, weight, bias, _, options = dense
    for start in range(0, weight.shape[0], options.chunk_size):
        stop = min(start + options.chunk_size, weight.shape[0])
        yield start, stop, *_chunk_logits(x, weight, bias, start, stop, options)


def _empty_grads(dense: DenseOperands) -> tuple[Tensor, Tensor, Tensor | None]:
    """fp32 ``(dx, dW, dbias)``: ``dx`` zeroed (summed over chunks), the others written chunk by chunk."""
    x, weight, bias, _, _ = dense
    return (
        torch.zeros(x.shape, dtype=torch.float32, device=x.device),
        torch.empty(weight.shape, dtype=torch.float32, device=x.device),
        None if bias is None else torch.empty(weight.shape[0], dtype=torch.float32, device=x.device),
    )


def _add_chunk_grads(
    dense: DenseOperands,
    start: int,
    stop: int,
    logits: Tensor,
    norms: Tensor | None,
    lse: Tensor | None,
    coef: Tensor,
    grads: tuple[Tensor, Tensor, Tensor | None],
) -> None:
    """Write classes ``[start, stop)``'s ``dW`` and ``dbias`` rows and add their part of ``dx``, from the
    chunk's ``logits (B, c)`` (softmax reads each row's ``lse``; bce and squared hinge need none)."""
    x, weight, _, exclude, options = dense
    grad_x, grad_weight, grad_bias = grads
    if options.loss is LossKind.SOFTMAX:
        assert lse is not None
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
    torch.mm(g_low.T, x.float(), out=grad_weight[start:stop])  # written in place: no (c, D) temporary
    if norms is not None:
        grad_weight[start:stop] -= radial[:, None] * rows.float()
    grad_x += g_low @ rows.to(x.dtype).float()


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
