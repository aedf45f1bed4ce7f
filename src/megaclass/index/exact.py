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

    :func:`~megaclass.ops.chunked_topk.chunked_topk` in float32: ``chunk_size`` classes scored at a time (on
    a GPU, fused: no scores held). Rows may live on another device than the features (host memory):
    they are moved to the features' device a chunk at a time. Ids are offset by ``start``.

    >>> w = torch.eye(4)
    >>> exact_topk(torch.tensor([[0.0, 2.0, 1.0, 0.0]]), w, 2)[1].tolist()
    [[1, 2]]
    """
    cosine = Metric(metric) is Metric.COSINE  # shapes and k are checked there
    scores, ids = chunked_topk(features.float(), weight, k, cosine=cosine, chunk_size=chunk_size)
    return scores, ids + start


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
