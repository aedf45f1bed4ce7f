"""Memory-bounded plain-PyTorch launchers of the fixed fan-in layer: the CPU path of the fused losses.

Same contract as the Triton launchers in ``kernels.py``: labels are processed in chunks, and the backward
pass recomputes each chunk's logits instead of keeping ``B x C`` of them. Computation is in fp32; results come
back in the inputs' dtypes.

On the CPU a chunk of labels is a CSR matrix ``(n, H)`` with each label's ``K`` weights at its input columns:
its logits are one sparse-dense product, its weight gradient a sampled dense product at the same pattern
(``torch.sparse.sampled_addmm``) and its input gradient the transposed product (read from the topology's
cached column order), ``B * n * K`` multiply-adds each with no ``(B, n, K)`` copy of the inputs: for labels
with their own columns (``G = 1``) gathering that copy made the step 9 to 16x slower (benchmarks/RESULTS.md).
Elsewhere (the plain path on a GPU) the chunk's inputs are gathered, ``(B, n_g, K)`` once per index row, and
contracted with the weights.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from megaclass.ops.fixed_fanin.columns import ColumnOrder, column_order

__all__ = ["chunked_bwd", "chunked_fwd"]

_GATHER_BUDGET = 1 << 22  # elements a chunk holds: gathered inputs (B, n_g, K), or logits (B, n) on the CPU


def _chunk_size(x: Tensor, fan_in: int, group: int) -> int:
    """Labels per chunk: ``(B, n)`` logits on the CPU, ``(B, n_g, K)`` gathered inputs elsewhere."""
    batch = x.shape[0]
    if x.device.type == "cpu":
        return max(1, _GATHER_BUDGET // max(1, batch))
    groups = max(1, _GATHER_BUDGET // max(1, batch * fan_in))  # index rows gathered at once
    return groups * group  # chunk boundaries on group boundaries


def _chunks(classes: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, classes)) for start in range(0, classes, size)]


def _csr(row_starts: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings(), torch.sparse.check_sparse_tensor_invariants(enable=False):
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR support is in beta
        return torch.sparse_csr_tensor(row_starts, columns, values, shape, check_invariants=False)


def _label_rows(index: Tensor, weight: Tensor, start: int, stop: int, group: int, dim: int) -> Tensor:
    """Labels ``[start, stop)`` as a CSR matrix ``(n, dim)`` of their fp32 weights at their columns."""
    fan_in = index.shape[1]
    first = start // group
    columns = index[first : -(-stop // group)].long()  # (n_g, K) the chunk's index rows
    if group > 1:
        columns = columns.repeat_interleave(group, 0)[start - first * group : stop - first * group]
    row_starts = torch.arange(0, (stop - start) * fan_in + 1, fan_in, device=index.device)
    values = weight[start:stop].float().reshape(-1)
    return _csr(row_starts, columns.reshape(-1), values, (stop - start, dim))


def _transposed_rows(
    weight: Tensor, order: ColumnOrder, chunk: int, start: int, stop: int, dim: int
) -> Tensor:
    """The chunk's weights transposed, a CSR matrix ``(dim, n)``, from the topology's cached column order."""
    fan_in = weight.shape[1]
    pointers = order.colptr[chunk * dim : (chunk + 1) * dim + 1]
    connections = order.perm[pointers[0] : pointers[-1]].long()  # (n * K,) in column order
    values = weight.reshape(-1)[connections].float()
    return _csr(pointers - pointers[0], connections // fan_in - start, values, (dim, stop - start))


def _csr_logits(
    x_t: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, start: int, stop: int, group: int
) -> tuple[Tensor, Tensor]:
    """Labels ``[start, stop)`` on the CPU from ``x_t (H, B)`` fp32: ``z (B, n)`` and the CSR weights."""
    rows = _label_rows(index, weight, start, stop, group, x_t.shape[0])
    with torch.autocast("cpu", enabled=False):  # fp32, as the sparse products take no bf16
        z = torch.sparse.mm(rows, x_t).t()  # (B, n)
    if bias is not None:
        z = z + bias[start:stop].float()
    return z, rows


def _chunk_logits(
    x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, start: int, stop: int, group: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Labels ``[start, stop)`` off the CPU: ``z (B, n)``, ``gathered (B, n_g, K)`` once per index row,
    ``cols (n_g, K)`` and the weights ``(n_g, G, K)`` zero-padded to whole groups; fp32."""
    batch, fan_in = x.shape[0], weight.shape[1]
    first, last = start // group, -(-stop // group)
    cols = index[first:last].long()  # (n_g, K)
    gathered = x[:, cols].float()  # (B, n_g, K)
    w = weight[start:stop].float()
    pad = (last - first) * group - (stop - start)
    if pad:  # the last, partial group
        w = torch.cat([w, w.new_zeros(pad, fan_in)])
    w = w.view(last - first, group, fan_in)  # (n_g, G, K)
    z = torch.einsum("bnk,ngk->bng", gathered, w).reshape(batch, w.shape[0] * group)  # (B, n_g * G)
    z = z[:, : stop - start]  # (B, n)
    if bias is not None:
        z = z + bias[start:stop].float()
    return z, gathered, cols, w


def _row_values(z: Tensor, loss: str) -> Tensor:
    if loss == "bce":
        return F.softplus(z).sum(1)
    if loss == "hinge":
        return F.relu(1 + z).square().sum(1)
    return torch.logsumexp(z, 1)


def chunked_fwd(
    x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, *, group: int, loss: str
) -> Tensor:
    """Logits ``(B, C)`` (``loss="none"``) or fp32 row values ``(B,)``; see ``kernels.fixed_fanin_fwd``."""
    batch, classes = x.shape[0], weight.shape[0]
    on_cpu = x.device.type == "cpu"
    x_t = x.float().t().contiguous() if on_cpu else None  # (H, B)
    if loss == "none":
        y = torch.empty(batch, classes, dtype=x.dtype, device=x.device)
    rows = []
    for start, stop in _chunks(classes, _chunk_size(x, weight.shape[1], group)):
        if on_cpu:
            z = _csr_logits(x_t, weight, index, bias, start, stop, group)[0]
        else:
            z = _chunk_logits(x, weight, index, bias, start, stop, group)[0]
        if loss == "none":
            y[:, start:stop] = z
        else:
            rows.append(_row_values(z, loss))
    if loss == "none":
        return y
    stacked = torch.stack(rows)  # (chunks, B)
    return torch.logsumexp(stacked, 0) if loss == "softmax" else stacked.sum(0)


def _dz(z: Tensor, loss: str, grad: Tensor, lse: Tensor | None) -> Tensor:
    if loss == "bce":
        return torch.sigmoid(z) * grad[:, None]
    if loss == "hinge":
        return 2 * F.relu(1 + z) * grad[:, None]
    assert lse is not None
    return torch.exp(z - lse[:, None]) * grad[:, None]


def chunked_bwd(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    bias: Tensor | None,
    *,
    group: int,
    loss: str,
    grad: Tensor,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(dx, dweight, dbias)``; see ``kernels.fixed_fanin_bwd``."""
    batch, (classes, fan_in) = x.shape[0], weight.shape
    grad_x = torch.zeros(batch, x.shape[1], dtype=torch.float32, device=x.device)
    grad_w = torch.empty(classes, fan_in, dtype=torch.float32, device=x.device)
    grad_b = torch.empty(classes, dtype=torch.float32, device=x.device) if bias is not None else None
    grad = grad.float()
    on_cpu, dim, size = x.device.type == "cpu", x.shape[1], _chunk_size(x, fan_in, group)
    if on_cpu:
        x_f = x.float()
        x_t = x_f.t().contiguous()  # (H, B)
        order = column_order(
            index, classes=classes, group=group, dim=dim, per_label=True, rows_per_chunk=size
        )
    for chunk, (start, stop) in enumerate(_chunks(classes, size)):
        if on_cpu:
            z, rows = _csr_logits(x_t, weight, index, bias, start, stop, group)
        else:
            z, gathered, cols, w = _chunk_logits(x, weight, index, bias, start, stop, group)
        dz = grad[:, start:stop] if loss == "none" else _dz(z, loss, grad, lse)  # (B, n)
        if grad_b is not None:
            grad_b[start:stop] = dz.sum(0)
        if on_cpu:
            dz_t = dz.t().contiguous()  # (n, B)
            # dweight[c, k] = sum_b dz[b, c] x[b, column k of c]: (dz^T x) at the layer's pattern only
            pattern = _csr(
                rows.crow_indices(), rows.col_indices(), torch.zeros_like(rows.values()), rows.shape
            )
            transposed = _transposed_rows(weight, order, chunk, start, stop, dim)
            with torch.autocast("cpu", enabled=False):
                sampled = torch.sparse.sampled_addmm(pattern, dz_t, x_f, beta=0.0)
                grad_x += torch.sparse.mm(transposed, dz_t).t()  # (B, H) = dz W
            grad_w[start:stop] = sampled.values().view(stop - start, fan_in)
            continue
        pad = w.shape[0] * group - (stop - start)
        dz = F.pad(dz, (0, pad)).view(batch, w.shape[0], group)  # (B, n_g, G)
        grad_w[start:stop] = torch.einsum("bng,bnk->ngk", dz, gathered).reshape(-1, fan_in)[: stop - start]
        contrib = torch.einsum("bng,ngk->bnk", dz, w)  # (B, n_g, K)
        grad_x.index_add_(1, cols.reshape(-1), contrib.reshape(batch, cols.numel()))
    grad_b = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b
