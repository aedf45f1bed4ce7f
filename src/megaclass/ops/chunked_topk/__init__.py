"""Top-``k`` classes of ``x @ weight.T (+ bias)`` over all ``C`` classes, class chunk by class chunk.

On a GPU the scores go through a fused kernel that keeps each row's best ``k`` in registers (``kernels.py``):
no score reaches memory. Elsewhere each chunk's ``(B, chunk)`` scores are reduced to their own top-``k`` and
merged with the running top-``k``, so memory is ``O(B x (chunk + k))``, never ``O(B x C)``. Every head's
``topk`` and every exact scan of the class indexes goes through here. Given a
:class:`~megaclass.ops.collectives.ClassShard` it is the collective form: each rank's top-``k`` of its own
classes, merged over the shard's ranks (:func:`~megaclass.ops.collectives.merge_topk`).

:func:`merge_topk_scores_` is the batched building block: the top-``k`` of ``x @ y.T`` merged into a running
table, fused on a GPU (``kernels.py``: the scores never reach memory), the reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megaclass.ops import Impl, resolve_impl
from megaclass.ops.chunked_topk.reference import reference_merge_topk_scores_
from megaclass.ops.collectives import ClassShard, merge_topk
from megaclass.staging import blocks_to_device

__all__ = ["chunked_topk", "merge_topk_scores_", "reference_merge_topk_scores_", "scoring_chunk"]

_GROUP = 64  # columns a maximum is taken over before the top-k of a wide chunk
_GROUP_MIN_COLUMNS = 1 << 16  # narrower chunks take their top-k directly (on a GPU, fewer launches win)
_GPU_VALUES = 1 << 26  # on a GPU a chunk may hold this many scores, and as many float32 row values
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # features the fused kernel scores
_FUSED_MAX_K = 64  # the fused kernel keeps k values a row in registers; a larger k takes the chunk loop


def scoring_chunk(chunk_size: int, batch: int, dim: int, device_type: str) -> int:
    """Classes the chunk loop of :func:`chunked_topk` scores at once for ``(batch, dim)`` features (the
    fused kernel holds no scores): ``chunk_size``, and on a GPU more while the ``(B, chunk)`` scores and the
    chunk's ``(chunk, D)`` float32 rows hold at most 2^26 values each. Narrow chunks leave a GPU waiting on
    launches: over 10^8 rows of D 32 at B 512, 3.5 s a batch at 8,192 classes a chunk and 0.66 s at 131,072
    (benchmarks/RESULTS.md).

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
    column_scale: Tensor | None = None,
    chunk_size: int = 8192,
    shard: ClassShard | None = None,
    impl: Impl | str = Impl.AUTO,
) -> tuple[Tensor, Tensor]:
    """``(scores, ids)``, each ``(B, k)``, scores descending, of ``x @ weight.T (+ bias)``.

    Args:
        x: ``(B, D)`` features; the matmul runs in ``x.dtype`` (weight chunks cast to it), scores in float32.
        weight: ``(C, D)`` class rows (with a ``shard``: this rank's ``(stop - start, D)``), on ``x``'s
            device or in another memory (host rows: moved a chunk at a time). bias: the matching
            ``(C,)`` or None.
        k: how many classes per row, ``1 <= k <= C`` (``C`` over all ranks with a shard).
        cosine: score ``scale * cos(x, w)`` instead (rows of both normalised; no bias).
        column_scale: ``(C,)`` factors each class's score is multiplied by (after ``cosine``, before
            ``bias``), or None.
        chunk_size: classes scored at once (on a GPU, :func:`scoring_chunk`'s more where it says so).
        shard: the classes this rank holds; every rank of its group passes the same ``x`` and gets the same
            global top-``k`` (ids in ``[0, C)``). None (or a whole shard): all classes, no collective.
        impl: ``auto`` scores float32, bf16 and fp16 features on a GPU with the fused kernel for ``k`` up to
            64 (the ``(B, C)`` scores never reach memory; ties may then rank in another order); ``reference``
            is the chunk loop.

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
    if column_scale is not None and column_scale.shape != (classes,):
        raise ValueError(f"column_scale must be ({classes},), got {tuple(column_scale.shape)}")
    chunk_size = scoring_chunk(chunk_size, x.shape[0], x.shape[1], x.device.type)
    local = min(k, classes)
    if cosine:
        x = torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)
    scoring = _Scoring(None if cosine else bias, cosine, scale, column_scale)
    fused = x.dtype in _FUSED_DTYPES and local <= _FUSED_MAX_K
    if fused and resolve_impl(impl, x) is Impl.TRITON:
        scores, ids = _fused_topk(x, weight, local, scoring)
    else:
        scores, ids = _local_topk(x, weight, local, scoring, chunk_size)
    if shard is not None and not shard.is_whole:
        return merge_topk(scores, ids + shard.start, k, group=shard.group)
    return scores, ids


@dataclass(frozen=True)
class _Scoring:
    """How a class's score is made from ``x . w``: times ``scale / |w|`` (``cosine``), times
    ``column_scale[c]``, plus ``bias[c]`` (None where cosine)."""

    bias: Tensor | None
    cosine: bool
    scale: float
    column_scale: Tensor | None

    def factors(self, rows: Tensor, start: int) -> Tensor | None:
        """``(c,)`` float32 factors of the scores of ``rows``, the classes from ``start``; None: none."""
        factors = self.scale / rows.float().norm(dim=-1).clamp_min(1e-12) if self.cosine else None
        if self.column_scale is None:
            return factors
        given = self.column_scale[start : start + rows.shape[0]].to(rows.device).float()
        return given.contiguous() if factors is None else factors * given

    def offsets(self, start: int, stop: int, device: torch.device) -> Tensor | None:
        """``(c,)`` float32 biases of the classes ``[start, stop)`` on ``device``; None: none."""
        return None if self.bias is None else self.bias[start:stop].to(device).float().contiguous()


def _fused_topk(x: Tensor, weight: Tensor, k: int, scoring: _Scoring) -> tuple[Tensor, Tensor]:
    """``(B, k)`` scores and ids through the fused kernel: a ``(B * splits, k)`` table, one entry per feature
    and span of columns, filled chunk by chunk (a chunk holds 2^26 row values, cast to ``x``'s dtype where
    the rows' differs) and reduced to each feature's top-``k`` at the end."""
    from megaclass.ops.chunked_topk.kernels import column_splits, merge_topk_scores_triton_

    batch, classes = x.shape[0], weight.shape[0]
    chunk = max(1, _GPU_VALUES // x.shape[1])
    splits = column_splits(1, batch, min(classes, chunk))
    values = torch.full((batch * splits, k), -torch.inf, device=x.device)
    ids = torch.full((batch * splits, k), -1, dtype=torch.int64, device=x.device)
    blocks = blocks_to_device(weight, x.device, chunk)  # host rows: through page-locked buffers
    for start, rows in zip(range(0, classes, chunk), blocks, strict=True):
        merge_topk_scores_triton_(
            x[None],
            rows.to(x.dtype)[None],
            values,
            ids,
            None,
            start,
            scale=scoring.factors(rows, start),
            bias=scoring.offsets(start, start + rows.shape[0], x.device),
            splits=splits,
        )
    top = values.view(batch, splits * k).topk(k, dim=1)
    return top.values, ids.view(batch, splits * k).gather(1, top.indices)


def _local_topk(
    x: Tensor, weight: Tensor, k: int, scoring: _Scoring, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``(B, k)`` scores and ids over the rows of ``weight`` by the chunk loop (checked arguments; cosine:
    ``x`` normalised)."""
    classes = weight.shape[0]
    best_scores = torch.full((x.shape[0], 0), -torch.inf, dtype=torch.float32, device=x.device)
    best_ids = torch.zeros((x.shape[0], 0), dtype=torch.int64, device=x.device)
    blocks = blocks_to_device(weight, x.device, chunk_size)  # (c, D) each
    for start, rows in zip(range(0, classes, chunk_size), blocks, strict=True):
        factors = scoring.factors(rows, start)
        if factors is not None:  # the (c, D) rows scaled, not the (B, c) scores: one pass over them fewer
            rows = rows.float() * factors[:, None]
        scores = (x @ rows.to(x.dtype).T).float()  # (B, c)
        offsets = scoring.offsets(start, start + rows.shape[0], x.device)
        if offsets is not None:
            scores = scores + offsets
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


@torch.no_grad()
def merge_topk_scores_(
    x: Tensor,
    y: Tensor,
    values: Tensor,
    ids: Tensor,
    *,
    rows: Tensor | None = None,
    id_offset: int = 0,
    impl: Impl | str = Impl.AUTO,
) -> None:
    """Merge each row's top-``k`` scores into a running table, in place.

    Row ``rows[b, m]`` of ``(values, ids)`` becomes the best ``k`` of itself and the float32 scores
    ``x[b, m] . y[b, p]`` over ``p`` (ids ``id_offset + b P + p``), descending; ids are ``-1`` where fewer
    than ``k`` values are finite (start a table at ``-inf``). Ties rank in no fixed order.

    Args:
        x: ``(Bt, M, D)`` rows; y: ``(Bt, P, D)`` columns, the same dtype (bf16 products, fp32 sums).
        values: ``(N, k)`` float32 and ids: ``(N, k)`` int64 or int32, contiguous: the running table.
        rows: ``(Bt, M)`` int64 table rows, distinct (a repeated row's entries are undefined); None:
            ``b M + m`` (then ``N = Bt M``).
        impl: ``auto`` fuses on a GPU (``triton``) for ``k`` up to 64, ``reference`` is plain PyTorch.

    >>> values, ids = torch.full((1, 2), -torch.inf), torch.full((1, 2), -1)
    >>> merge_topk_scores_(torch.tensor([[[1.0, 0.0]]]), torch.eye(2)[None] * 2, values, ids)
    >>> values.tolist(), ids.tolist()
    ([[2.0, 0.0]], [[0, 1]])
    """
    _check_table(x, y, values, ids, rows)
    if values.shape[1] <= _FUSED_MAX_K and resolve_impl(impl, x, y, values) is Impl.TRITON:
        from megaclass.ops.chunked_topk.kernels import merge_topk_scores_triton_

        merge_topk_scores_triton_(x, y, values, ids, rows, id_offset)
    else:
        reference_merge_topk_scores_(x, y, values, ids, rows=rows, id_offset=id_offset)


def _check_table(x: Tensor, y: Tensor, values: Tensor, ids: Tensor, rows: Tensor | None) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x must be (Bt, M, D) and y (Bt, P, D): got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise ValueError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
    if values.dim() != 2 or ids.shape != values.shape or values.shape[1] < 1:
        raise ValueError(
            f"values and ids must be one (N, k) shape, got {tuple(values.shape)}, {tuple(ids.shape)}"
        )
    if values.dtype != torch.float32 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"values must be float32 and ids int64 or int32, got {values.dtype}, {ids.dtype}")
    if not (values.is_contiguous() and ids.is_contiguous()):
        raise ValueError("values and ids must be contiguous")
    needed = x.shape[0] * x.shape[1]
    if rows is not None and (rows.shape != x.shape[:2] or rows.dtype != torch.int64):
        raise ValueError(
            f"rows must be int64 of shape {tuple(x.shape[:2])}, got {rows.dtype} {tuple(rows.shape)}"
        )
    if rows is None and values.shape[0] != needed:
        raise ValueError(f"without rows the table must have Bt M = {needed} rows, got {values.shape[0]}")
