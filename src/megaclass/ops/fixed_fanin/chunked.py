"""Memory-bounded plain-PyTorch launchers of the fixed fan-in layer: the CPU path of the fused losses.

Same contract as the Triton launchers in ``kernels.py``: labels are processed in chunks so at most
``(B, chunk, K)`` gathered inputs exist at once, and the backward pass recomputes each chunk's logits instead
of keeping ``B x C`` of them. Computation is in fp32; results come back in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chunked_bwd", "chunked_fwd"]

_GATHER_BUDGET = 1 << 22  # gathered input elements per chunk, (B, chunk, K)


def _chunks(batch: int, classes: int, fan_in: int, group: int) -> list[tuple[int, int]]:
    groups = max(1, _GATHER_BUDGET // max(1, batch * fan_in))  # index rows gathered at once
    size = groups * group  # chunk boundaries on group boundaries
    return [(start, min(start + size, classes)) for start in range(0, classes, size)]


def _chunk_logits(
    x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None, start: int, stop: int, group: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Labels ``[start, stop)``: ``z (B, n)``, ``gathered (B, n_g, K)`` once per index row, ``cols (n_g, K)``
    and the weights ``(n_g, G, K)`` zero-padded to whole groups; fp32."""
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
    if loss == "none":
        y = torch.empty(batch, classes, dtype=x.dtype, device=x.device)
    rows = []
    for start, stop in _chunks(batch, classes, weight.shape[1], group):
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
    for start, stop in _chunks(batch, classes, fan_in, group):
        z, gathered, cols, w = _chunk_logits(x, weight, index, bias, start, stop, group)
        dz = grad[:, start:stop] if loss == "none" else _dz(z, loss, grad, lse)  # (B, n)
        if grad_b is not None:
            grad_b[start:stop] = dz.sum(0)
        pad = w.shape[0] * group - (stop - start)
        dz = F.pad(dz, (0, pad)).view(batch, w.shape[0], group)  # (B, n_g, G)
        grad_w[start:stop] = torch.einsum("bng,bnk->ngk", dz, gathered).reshape(-1, fan_in)[: stop - start]
        contrib = torch.einsum("bng,ngk->bnk", dz, w)  # (B, n_g, K)
        grad_x.index_add_(1, cols.reshape(-1), contrib.reshape(batch, cols.numel()))
    grad_b = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b
