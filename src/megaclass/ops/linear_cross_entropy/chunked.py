"""Fast plain-PyTorch backend: native low-precision matmuls (cuBLAS on CUDA) over large class chunks.

Per chunk of classes the fp32 master rows are cast to the compute dtype ``x.dtype`` once per pass (in
backward the one copy feeds both the logits and the ``dx`` matmul); every matmul accumulates and writes
float32 (``torch.mm(..., out_dtype=torch.float32)`` on CUDA, where cuBLAS supports it). ``dW`` of a chunk is
written straight into its rows of the fp32 gradient. Memory is ``O(chunk x D + B x chunk)``: the chunk's
low-precision rows and its logits.

The maths is the reference backend's (see :mod:`.reference`); only the execution differs: bigger chunks,
in-place elementwise passes and no fp32 copies of low-precision operands on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from megaclass.ops.linear_cross_entropy.common import NORM_EPS, DenseOperands, LinearLossOptions, LossKind

__all__ = ["TorchChunkedBackend", "chunk_size_for"]

CHUNK_BYTES = 2**27  # the low-precision weight chunk (chunk x D) and the logits (B x chunk): 128 MiB each
MIN_CHUNK, MAX_CHUNK = 2**10, 2**17
_MIXED_MM: dict[str, bool] = {}  # "mm" / "mm_out" -> whether torch.mm(..., out_dtype=float32) runs here


def chunk_size_for(batch: int, dim: int, itemsize: int) -> int:
    """Classes per chunk: a power of two in ``[MIN_CHUNK, MAX_CHUNK]`` whose ``(chunk, D)`` rows in the
    compute dtype and ``(B, chunk)`` fp32 logits each fit :data:`CHUNK_BYTES` (65,536 at ``B = 128``,
    ``D = 768``, bf16)."""
    fits = min(CHUNK_BYTES // max(1, dim * itemsize), CHUNK_BYTES // max(1, batch * 4))
    return max(MIN_CHUNK, min(MAX_CHUNK, 1 << max(0, fits.bit_length() - 1)))


def mm_fp32(a: Tensor, b: Tensor, *, out: Tensor | None = None) -> Tensor:
    """float32 ``a @ b`` of two operands of one dtype: products of the operands as they are, fp32 sums.

    fp32 operands: a plain ``mm``. Low precision on CUDA: cuBLAS with a float32 output (``out_dtype``), or a
    low-precision output upcast where this PyTorch lacks it. Elsewhere the operands are upcast first (exact
    products of the rounded values, as the Triton interpreter and the reference compute)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        if out is not None:
            done = _mixed_mm("mm_out", lambda: torch.mm(a, b, out_dtype=torch.float32, out=out))
            if done is not None:
                return done
        product = _mixed_mm("mm", lambda: torch.mm(a, b, out_dtype=torch.float32))
        if product is None:
            product = torch.mm(a, b)  # no mixed-dtype mm in this build: low-precision output
    else:
        product = torch.mm(a.float(), b.float())
    return product.float() if out is None else out.copy_(product)


def _mixed_mm(variant: str, run: Callable[[], Tensor]) -> Tensor | None:
    """``run()`` unless ``variant`` failed before; None (and remembered) when this build cannot run it."""
    if not _MIXED_MM.get(variant, True):
        return None
    try:
        return run()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, NotImplementedError):
        _MIXED_MM[variant] = False  # a real error resurfaces from the plain mm that follows
        return None


class TorchChunkedBackend:
    """Dense part over large class chunks with native low-precision matmuls (``impl="torch"``).

    Args:
        chunk_size: classes per chunk; None picks :func:`chunk_size_for` from ``B``, ``D`` and the dtype.
    """

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def fuses_gradient(self, dense: DenseOperands) -> bool:
        return False  # backward recomputes each chunk's logits

    def _chunk(self, x: Tensor) -> int:
        return self.chunk_size or chunk_size_for(x.shape[0], x.shape[1], x.element_size())

    def reduce(self, dense: DenseOperands) -> Tensor:
        """``(B,)`` float32 lse (softmax) or sum over classes of softplus / relu(1 + z)^2."""
        x, weight, bias, exclude, options = dense
        classes, chunk = weight.shape[0], self._chunk(x)
        total = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        if options.loss is LossKind.SOFTMAX:
            total.fill_(-torch.inf)
        for start in range(0, classes, chunk):
            stop = min(start + chunk, classes)
            rows = weight[start:stop]  # (c, D) master rows
            logits, _ = _logits(x, rows, rows.to(x.dtype), bias, start, options)  # (B, c) float32
            if options.loss is LossKind.SOFTMAX:
                _fill_excluded(logits, exclude, start, -torch.inf)
                total = torch.logaddexp(total, torch.logsumexp(logits, dim=1))
            elif options.loss is LossKind.BCE:
                total += F.softplus(logits).sum(dim=1)
            else:
                total += logits.add_(1).relu_().square_().sum(dim=1)
        return total

    def grads(self, dense: DenseOperands, lse: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """fp32 ``(dx (B, D), dW (C, D), dbias (C,) or None)`` of ``sum_bc G_bc z_bc``."""
        x, weight, bias, exclude, options = dense
        classes, chunk = weight.shape[0], self._chunk(x)
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=x.device)
        grad_bias = None if bias is None else torch.empty(classes, dtype=torch.float32, device=x.device)
        for start in range(0, classes, chunk):
            stop = min(start + chunk, classes)
            rows = weight[start:stop]  # (c, D) master rows
            low = rows.to(x.dtype)  # (c, D) this chunk's one cast, shared by both matmuls
            logits, norms = _logits(x, rows, low, bias, start, options)  # (B, c) float32
            g_low, dbias, radial = _chunk_grad_logits(
                logits, norms, lse, coef, exclude, start, options, dtype=x.dtype, with_bias=bias is not None
            )
            if grad_bias is not None:
                grad_bias[start:stop] = dbias
            mm_fp32(g_low.T, x, out=grad_weight[start:stop])
            if radial is not None:
                grad_weight[start:stop].addcmul_(radial[:, None], rows.float(), value=-1.0)
            grad_x += mm_fp32(g_low, low)
        return grad_x, grad_weight, grad_bias


def _logits(
    x: Tensor, rows: Tensor, low: Tensor, bias: Tensor | None, start: int, options: LinearLossOptions
) -> tuple[Tensor, Tensor | None]:
    """``(B, c)`` float32 logits of one chunk and, with a margin, the fp32 rows' norms ``(c,)``."""
    logits = mm_fp32(x, low.T)  # (B, c)
    if options.cosine:
        norms = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).clamp_min(NORM_EPS)  # (c,)
        return logits.mul_(options.margin.scale / norms), norms
    if bias is not None:
        logits += bias[start : start + rows.shape[0]].float()
    return logits, None


def _chunk_grad_logits(
    logits: Tensor,
    norms: Tensor | None,
    lse: Tensor,
    coef: Tensor,
    exclude: Tensor | None,
    start: int,
    options: LinearLossOptions,
    *,
    dtype: torch.dtype,
    with_bias: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``G = d loss / d z`` of one chunk in the compute ``dtype`` ``(B, c)``, overwriting ``logits``; with a
    bias its fp32 column sums ``(c,)``, with a margin the radial coefficients ``(c,)`` (else None).

    Without bias or margin ``G`` is needed in ``dtype`` only: the row weights are applied by the pass that
    rounds it (one read of the fp32 values, one low-precision write)."""
    cosine = None if norms is None else logits / options.margin.scale  # (B, c) u / n, kept apart
    if options.loss is LossKind.SOFTMAX:
        g = logits.sub_(lse[:, None]).exp_()
    elif options.loss is LossKind.BCE:
        g = logits.sigmoid_()
    else:
        g = logits.add_(1).relu_().mul_(2)
    if norms is None and not with_bias and dtype != torch.float32:
        g_low = torch.empty(g.shape, dtype=dtype, device=g.device)  # (B, c)
        torch.mul(g, coef[:, None], out=g_low)  # fp32 products, rounded once on the write
        _fill_excluded(g_low, exclude, start, 0.0)
        return g_low, None, None
    g.mul_(coef[:, None])
    _fill_excluded(g, exclude, start, 0.0)
    dbias = g.sum(dim=0) if with_bias else None
    radial = None
    if norms is not None:
        # z = s u / n with u = x . w: dz/du = s / n, dz/dw = (s / n) (x - (u / n^2) w)
        g.mul_(options.margin.scale / norms)
        radial = (g * cosine).sum(dim=0) / norms  # (c,)
    return g.to(dtype), dbias, radial


def _fill_excluded(values: Tensor, exclude: Tensor | None, start: int, fill: float) -> None:
    """Set ``values[b, exclude[b] - start] = fill`` in place where that class lies in the chunk (no sync)."""
    if exclude is None:
        return
    rows = torch.arange(values.shape[0], device=values.device)
    columns = exclude - start
    inside = (columns >= 0) & (columns < values.shape[1])
    columns = columns.clamp(0, values.shape[1] - 1)
    current = values[rows, columns]
    values[rows, columns] = torch.where(inside, torch.full_like(current, fill), current)
