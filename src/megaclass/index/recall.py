"""How much of the exact top-k an index's search finds: recall@k against a chunked exact scan on a sample."""

from __future__ import annotations

import torch
from torch import Tensor

from megaclass.index.base import ClassSelector
from megaclass.index.exact import exact_topk

__all__ = ["recall_at_k"]


@torch.no_grad()
def recall_at_k(
    selector: ClassSelector,
    queries: Tensor,
    k: int,
    *,
    weight: Tensor,
    sample: int = 1024,
    candidates: int | None = None,
    chunk_size: int = 65536,
    seed: int = 0,
) -> float:
    """Share of the exact top-``k`` classes of ``queries (B, D)`` against ``weight (C, D)`` that
    :meth:`ClassSelector.search` finds, on ``sample`` of the queries drawn at random (all when
    ``B <= sample``).

    The truth is :func:`~megaclass.index.exact.exact_topk` by the selector's metric, ``chunk_size`` classes at
    a time; ``candidates`` is passed to the search.

    >>> from megaclass.index.exact import ExactSelector
    >>> index, rows = ExactSelector(), torch.randn(50, 8)
    >>> index.build(rows)
    >>> recall_at_k(index, torch.randn(20, 8), 5, weight=rows)
    1.0
    """
    if sample < 1:
        raise ValueError(f"sample: expected >= 1, got {sample}")
    k = min(k, weight.shape[0])
    if queries.shape[0] > sample:
        generator = torch.Generator().manual_seed(seed)
        queries = queries[torch.randperm(queries.shape[0], generator=generator)[:sample].to(queries.device)]
    truth = exact_topk(queries, weight, k, metric=selector.metric, chunk_size=chunk_size)[1]  # (b, k)
    found = selector.search(queries, k, weight=weight, candidates=candidates)[1]  # (b, k)
    hits = (found[:, :, None] == truth[:, None, :]).any(2)  # (b, k) each found id is a true one
    return float(hits.sum()) / truth.numel()
