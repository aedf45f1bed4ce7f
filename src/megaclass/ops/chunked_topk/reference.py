"""Plain-PyTorch reference of the fused score top-k: the executable spec and the CPU path."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["reference_merge_topk_scores_"]


@torch.no_grad()
def reference_merge_topk_scores_(
    x: Tensor,
    y: Tensor,
    values: Tensor,
    ids: Tensor,
    *,
    rows: Tensor | None = None,
    id_offset: int = 0,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """Rows ``rows[b, m]`` of ``(values, ids)`` := the best ``k`` of themselves and the float32 scores
    ``x[b, m] . y[b, p] (* scale[p]) (+ bias[p])`` with ids ``id_offset + b P + p``, descending; ids ``-1``
    where fewer than ``k`` are finite. ``rows`` None: ``b M + m``."""
    batch, m, _ = x.shape
    p, k = y.shape[1], values.shape[1]
    if batch == 0 or m == 0 or p == 0:
        return
    flat = (torch.arange(batch * m, device=x.device) if rows is None else rows).reshape(-1)
    scores = torch.bmm(x.float(), y.float().transpose(1, 2))  # (Bt, M, P)
    if scale is not None:
        scores = scores * scale.float()
    if bias is not None:
        scores = scores + bias.float()
    top = scores.topk(min(k, p), dim=2)
    found = top.indices + (id_offset + torch.arange(batch, device=x.device) * p)[:, None, None]
    merged = torch.cat([values[flat], top.values.flatten(0, 1)], 1).topk(k, dim=1)
    merged_ids = torch.cat([ids[flat], found.flatten(0, 1).to(ids.dtype)], 1).gather(1, merged.indices)
    values[flat] = merged.values
    ids[flat] = merged_ids.masked_fill_(merged.values == -torch.inf, -1)
