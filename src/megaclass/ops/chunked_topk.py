"""Top-``k`` classes of ``x @ weight.T (+ bias)`` over all ``C`` classes, class chunk by class chunk.

Each chunk's ``(B, chunk)`` scores are reduced to their own top-``k`` and merged with the running top-``k``,
so memory is ``O(B x (chunk + k))``, never ``O(B x C)``. Every head's ``topk`` goes through here. Given a
:class:`~megaclass.ops.collectives.ClassShard` it is the collective form: each rank's top-``k`` of its own
classes, merged over the shard's ranks (:func:`~megaclass.ops.collectives.merge_topk`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megaclass.ops.collectives import ClassShard, merge_topk

__all__ = ["chunked_topk"]


@torch.no_grad()
def chunked_topk(
    x: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    cosine: bool = False,
    scale: float = 1.0,
    chunk_size: int = 8192,
    shard: ClassShard | None = None,
) -> tuple[Tensor, Tensor]:
    """``(scores, ids)``, each ``(B, k)``, scores descending, of ``x @ weight.T (+ bias)``.

    Args:
        x: ``(B, D)`` features; the matmul runs in ``x.dtype`` (weight chunks cast to it), scores in float32.
        weight: ``(C, D)`` class rows (with a ``shard``: this rank's ``(stop - start, D)``). bias: the
            matching ``(C,)`` or None.
        k: how many classes per row, ``1 <= k <= C`` (``C`` over all ranks with a shard).
        cosine: score ``scale * cos(x, w)`` instead (rows of both normalised; no bias).
        chunk_size: classes scored at once.
        shard: the classes this rank holds; every rank of its group passes the same ``x`` and gets the same
            global top-``k`` (ids in ``[0, C)``). None (or a whole shard): all classes, no collective.

    >>> x, w = torch.randn(2, 4), torch.randn(10, 4)
    >>> scores, ids = chunked_topk(x, w, 3, chunk_size=4)
    >>> torch.equal(ids, (x @ w.T).topk(3).indices)
    True
    """
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"x must be (B, D) and weight (C, D): got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    classes = weight.shape[0]
    if shard is not None and classes != shard.size:
        raise ValueError(
            f"weight must hold the shard's rows [{shard.start}, {shard.stop}): ({shard.size}, D), "
            f"got shape {tuple(weight.shape)}"
        )
    total = classes if shard is None else shard.num_classes
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, C={total}], got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if shard is not None and not shard.is_whole:
        scores, ids = _local_topk(x, weight, min(k, classes), bias, cosine, scale, chunk_size)
        return merge_topk(scores, ids + shard.start, k, group=shard.group)
    return _local_topk(x, weight, k, bias, cosine, scale, chunk_size)


def _local_topk(
    x: Tensor, weight: Tensor, k: int, bias: Tensor | None, cosine: bool, scale: float, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``(B, k)`` scores and ids over the rows of ``weight`` (checked arguments)."""
    classes = weight.shape[0]
    if cosine:
        x = torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)
    best_scores = torch.full((x.shape[0], 0), -torch.inf, dtype=torch.float32, device=x.device)
    best_ids = torch.zeros((x.shape[0], 0), dtype=torch.int64, device=x.device)
    for start in range(0, classes, chunk_size):
        rows = weight[start : start + chunk_size]  # (c, D)
        scores = (x @ rows.to(x.dtype).T).float()  # (B, c)
        if cosine:
            scores = scores * (scale / rows.float().norm(dim=-1).clamp_min(1e-12))
        elif bias is not None:
            scores = scores + bias[start : start + chunk_size].float()
        top_scores, top_ids = scores.topk(min(k, scores.shape[1]), dim=1)  # (B, <=k)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)  # (B, <=2k)
        merged_ids = torch.cat([best_ids, top_ids + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)  # (B, <=k)
        best_ids = merged_ids.gather(1, order)
    return best_scores, best_ids
