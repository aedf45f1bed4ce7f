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

__all__ = ["chunked_topk", "scoring_chunk"]

_GROUP = 64  # columns a maximum is taken over before the top-k of a wide chunk
_GROUP_MIN_COLUMNS = 1 << 16  # narrower chunks take their top-k directly (on a GPU, fewer launches win)
_GPU_VALUES = 1 << 26  # on a GPU a chunk may hold this many scores, and as many float32 row values


def scoring_chunk(chunk_size: int, batch: int, dim: int, device_type: str) -> int:
    """Classes :func:`chunked_topk` scores at once for ``(batch, dim)`` features: ``chunk_size``, and on a
    GPU more while the ``(B, chunk)`` scores and the chunk's ``(chunk, D)`` float32 rows hold at most 2^26
    values each. Narrow chunks leave a GPU waiting on launches: over 10^8 rows of D 32 at B 512, 3.5 s a
    batch at 8,192 classes a chunk and 0.66 s at 131,072 (benchmarks/RESULTS.md).

    >>> scoring_chunk(8192, 512, 32, "cuda"), scoring_chunk(8192, 512, 32, "cpu")
    (131072, 8192)
    """
    if device_type != "cuda":
        return chunk_size
    return max(chunk_size, _GPU_VALUES // max(1, batch, dim))


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
        chunk_size: classes scored at once (on a GPU, :func:`scoring_chunk`'s more where it says so).
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
    chunk_size = scoring_chunk(chunk_size, x.shape[0], x.shape[1], x.device.type)
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
        if cosine:  # the (c, D) rows scaled, not the (B, c) scores: one pass over the scores fewer
            rows = rows.float()
            rows = rows * (scale / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        scores = (x @ rows.to(x.dtype).T).float()  # (B, c)
        if bias is not None and not cosine:
            scores = scores + bias[start : start + chunk_size].float()
        top_scores, top_ids = _chunk_topk(scores, min(k, scores.shape[1]))  # (B, <=k)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)  # (B, <=2k)
        merged_ids = torch.cat([best_ids, top_ids + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)  # (B, <=k)
        best_ids = merged_ids.gather(1, order)
    return best_scores, best_ids


def _chunk_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``scores.topk(k, dim=1)`` through the maxima of groups of ``_GROUP`` columns: the ``k`` best groups
    by maximum hold the ``k`` best scores (ties aside), so one reduction and a top-``k`` over ``c / _GROUP``
    maxima replace a top-``k`` over all ``c`` columns, which is slow for wide chunks."""
    batch, width = scores.shape
    groups = width // _GROUP
    if width < _GROUP_MIN_COLUMNS or groups < k:
        return scores.topk(k, dim=1)
    whole = groups * _GROUP
    maxima = scores[:, :whole].view(batch, groups, _GROUP).amax(dim=2)  # (B, groups)
    best = maxima.topk(k, dim=1).indices  # (B, k)
    columns = (best[:, :, None] * _GROUP + torch.arange(_GROUP, device=scores.device)).view(batch, -1)
    if whole < width:  # the tail that fills no group is a candidate as it is
        tail = torch.arange(whole, width, device=scores.device).expand(batch, -1)
        columns = torch.cat([columns, tail], dim=1)
    top = scores.gather(1, columns).topk(k, dim=1)  # (B, k) of the k groups' and the tail's columns
    return top.values, columns.gather(1, top.indices)
