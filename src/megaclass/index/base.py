"""The class-selector interface: an index over the ``(C, D)`` weight rows answering nearest-class queries."""

from __future__ import annotations

import abc
import enum
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["THOROUGH_FACTOR", "ClassSelector", "Metric", "RowReader"]

# a thorough query (evaluation: one a batch, not one a step) searches this many times what a training query
# does: the cluster index's rows gathered, an Annoy forest's nodes, a parameter server's probes
THOROUGH_FACTOR = 16


class Metric(str, enum.Enum):
    """How a feature is compared with a class row: cosine of the angle, or the raw dot product (the logit)."""

    COSINE = "cosine"
    DOT = "dot"


class RowReader(Protocol):
    """Rows that live elsewhere (the parameter servers), read when asked: ``shape``, ``dim()``,
    ``reader[a:b]`` for rows ``[a, b)`` and :meth:`take` for the rows of some ids, as CPU tensors."""

    shape: torch.Size

    def dim(self) -> int: ...

    def __getitem__(self, rows: slice) -> Tensor: ...

    def take(self, ids: Tensor) -> Tensor:
        """Rows ``ids (n,)``, ``(n, D)``."""
        ...


class ClassSelector(abc.ABC):
    """Finds, for each feature, the classes whose weight rows score highest against it.

    :meth:`build` takes a snapshot of the rows (it may finish in the background: the previous index, or none,
    keeps answering until the new one is swapped in whole); :meth:`query` answers from the latest finished
    build;
    :meth:`search` scores its answers exactly against given rows (approximate top-k for evaluation).
    """

    metric: Metric  # how features are compared with rows
    ranks_by: tuple[Metric, ...] = (Metric.COSINE, Metric.DOT)  # what :meth:`query` can rank its answers by

    @abc.abstractmethod
    def build(self, weight: Tensor, *, changed: Tensor | None = None) -> None:
        """(Re)build over ``weight (C, D)``; the rows may live on any device (chunks are moved as needed),
        and for :class:`~megaclass.index.kmeans.ClusterIndex` in a :class:`RowReader`.

        ``changed``: ids of the rows updated since the previous build (None: any may have), so an index that
        keeps a snapshot refreshes only those.
        """

    @abc.abstractmethod
    def query(
        self, features: Tensor, n: int, *, metric: Metric | str | None = None, thorough: bool = False
    ) -> Tensor:
        """``(B, n)`` int64 class ids on ``features``' device, best first, for ``features (B, D)``, ranked by
        ``metric`` (one of :attr:`ranks_by`; None: :attr:`metric`). ``thorough``: search wider, as
        evaluation may (a query a batch, not a step's): for a higher recall at a higher cost.

        An entry is ``-1`` where the index found fewer than ``n`` classes.
        """

    @torch.no_grad()
    def search(
        self, queries: Tensor, k: int, *, weight: Tensor, candidates: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Approximate top-``k`` ``(scores, ids)``, each ``(B, k)`` on ``queries``' device, of
        ``queries (B, D)`` against ``weight (C, D)``: the index's ``candidates`` (default ``k``) best classes
        by a thorough query, scored exactly (float32, by :attr:`metric`) from ``weight`` and ranked. Ids
        ``-1`` (score ``-inf``) where the index found fewer than ``k``.

        ``weight`` is normally the rows the index was built on (it may live on another device); only the
        candidate rows are read, in blocks of queries.

        >>> from megaclass.index.exact import ExactSelector
        >>> index = ExactSelector(metric="dot")
        >>> index.build(torch.eye(3))
        >>> index.search(torch.tensor([[0.0, 2.0, 1.0]]), 2, weight=torch.eye(3))[1].tolist()
        [[1, 2]]
        """
        if queries.dim() != 2 or weight.dim() != 2 or queries.shape[1] != weight.shape[1]:
            raise ValueError(
                f"queries (B, D) and weight (C, D) expected, "
                f"got {tuple(queries.shape)} and {tuple(weight.shape)}"
            )
        count = k if candidates is None else candidates
        if not 1 <= k <= count:
            raise ValueError(f"k: expected 1 <= k <= candidates={count}, got {k}")
        ids = self.query(queries, count, thorough=True).to(queries.device)  # (B, n)
        unit = self.metric is Metric.COSINE
        features = torch.nn.functional.normalize(queries.float(), dim=1) if unit else queries.float()
        scores = torch.empty(ids.shape, dtype=torch.float32, device=queries.device)
        block = max(1, (1 << 26) // (count * weight.shape[1]))  # (block, n, D) rows gathered at once
        for start in range(0, ids.shape[0], block):
            part = ids[start : start + block].clamp_min(0)
            rows = weight[part.to(weight.device)].to(queries.device).float()  # (b, n, D)
            if unit:
                rows = torch.nn.functional.normalize(rows, dim=2)
            scores[start : start + block] = torch.bmm(rows, features[start : start + block, :, None]).squeeze(
                2
            )
        top = scores.masked_fill(ids < 0, float("-inf")).topk(k, dim=1)
        return top.values, ids.gather(1, top.indices)

    @property
    @abc.abstractmethod
    def is_built(self) -> bool:
        """Whether :meth:`build` was called (or a state loaded): :meth:`query` answers from then on, with no
        classes (``-1``) while a first build runs in the background (see :attr:`is_ready`)."""

    @property
    def is_ready(self) -> bool:
        """Whether a finished index answers :meth:`query` (False while a first background build runs)."""
        return self.is_built

    def wait(self) -> None:  # noqa: B027 - optional hook
        """Block until a pending background build has been swapped in."""

    def metrics(self) -> dict[str, float]:
        """Numbers about the index (last build time in ms, ...)."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that restore the served index exactly (empty when it is rebuilt from the weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work."""
