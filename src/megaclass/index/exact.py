"""Brute-force class selection: the exact top-k of every class row's score, through
:func:`~megaclass.ops.chunked_topk.chunked_topk` (fused on a GPU)."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from megaclass.index.base import ClassSelector, Metric
from megaclass.ops.chunked_topk import chunked_topk

__all__ = ["ExactSelector", "exact_topk"]


@torch.no_grad()
def exact_topk(
    features: Tensor,
    weight: Tensor,
    k: int,
    *,
    metric: Metric | str = Metric.DOT,
    chunk_size: int = 65536,
    start: int = 0,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` ``(scores, ids)``, each ``(B, k)``, of ``features (B, D)`` against ``weight (C, D)``.

    Scores ``chunk_size`` classes at a time (on a GPU, fused: no scores held). Rows may live on another
    device than the features (pinned host memory): ``chunk_size`` rows at a time are moved to the features'
    device. Ids are offset by ``start``.

    >>> w = torch.eye(4)
    >>> exact_topk(torch.tensor([[0.0, 2.0, 1.0, 0.0]]), w, 2)[1].tolist()
    [[1, 2]]
    """
    metric = Metric(metric)
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features (B, D) and weight (C, D) expected, "
            f"got {tuple(features.shape)} and {tuple(weight.shape)}"
        )
    num_classes = weight.shape[0]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k: expected 1 <= k <= C={num_classes}, got {k}")
    queries, cosine = features.float(), metric is Metric.COSINE
    if weight.device == features.device:
        scores, ids = chunked_topk(queries, weight, k, cosine=cosine, chunk_size=chunk_size)
        return scores, ids + start
    # rows in another memory (pinned host): a block at a time moved to the features' device and scanned
    best_scores = torch.empty(features.shape[0], 0, device=features.device)
    best_ids = torch.empty(features.shape[0], 0, dtype=torch.int64, device=features.device)
    for begin in range(0, num_classes, chunk_size):
        rows = weight[begin : begin + chunk_size].to(features.device, non_blocking=True)
        scores, ids = chunked_topk(queries, rows, min(k, rows.shape[0]), cosine=cosine, chunk_size=chunk_size)
        top = torch.cat([best_scores, scores], 1).topk(min(k, best_scores.shape[1] + scores.shape[1]), dim=1)
        best_ids = torch.cat([best_ids, ids + begin + start], 1).gather(1, top.indices)
        best_scores = top.values
    return best_scores, best_ids


class ExactSelector(ClassSelector):
    """Exact nearest classes by brute force: the recall reference for the approximate selectors.

    It keeps a reference to the weight tensor it was built on, so queries always see the current rows.

    Args:
        metric: ``cosine`` or ``dot``.
        chunk_size: classes scored at once.
    """

    def __init__(self, *, metric: Metric | str = Metric.COSINE, chunk_size: int = 65536) -> None:
        self.metric = Metric(metric)
        self.chunk_size = chunk_size
        self._weight: Tensor | None = None
        self._build_ms = 0.0

    def build(self, weight: Tensor, *, changed: Tensor | None = None) -> None:
        begin = time.perf_counter()
        self._weight = weight.detach()
        self._build_ms = (time.perf_counter() - begin) * 1e3

    @property
    def is_built(self) -> bool:
        return self._weight is not None

    def query(
        self, features: Tensor, n: int, *, metric: Metric | str | None = None, thorough: bool = False
    ) -> Tensor:
        if self._weight is None:
            raise RuntimeError("ExactSelector.query before build")
        n_found = min(n, self._weight.shape[0])
        metric = self.metric if metric is None else Metric(metric)
        ids = exact_topk(features, self._weight, n_found, metric=metric, chunk_size=self.chunk_size)[1]
        if n_found < n:
            ids = torch.nn.functional.pad(ids, (0, n - n_found), value=-1)
        return ids

    def metrics(self) -> dict[str, float]:
        return {"index_build_ms": self._build_ms}
