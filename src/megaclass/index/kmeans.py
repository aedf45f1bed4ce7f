"""A GPU class index: balanced clusters of the weight rows, queried by scoring centroids then members.

Structure (all on the index's device):

- ``rows (C, D)``: a low-precision snapshot of the (normalised) class rows, taken at each build; the index
  answers from it, so queries never touch the live weights (which may sit in host memory);
- ``norms (C,)``: the rows' lengths, for the ``dot`` metric; ``scales (C,)``: the int8 snapshot's row scales
  (ones for float snapshots);
- ``assignment (C,)`` and ``members (K, W)``: the cluster of each row and each cluster's rows, padded with -1
  (``K`` clusters of at most ``W`` rows);
- ``sums (K, D)``: float32 sums of each cluster's snapshot rows; ``centroids (K, D)``: them normalised;
- ``near (K, m)``: each cluster's ``m = neighbours`` nearest clusters (itself first).

The first build clusters with the hierarchical balanced 2-means tree (leaves of at most ``leaf_size`` rows;
the padded width ``W`` keeps 1/8 slack for later moves). Later builds are warm and touch only the rows updated
since the previous build (``changed``, the rows a sparse step touched): their snapshot is refreshed, the
cluster sums swap their old rows for the new ones, and each moves to its best cluster among those near its
own where a seat is free (at most ``W`` rows per cluster; else it stays; ``refine_iters`` rounds). A warm
build thus costs ``O(changed)``, not ``O(C)``: milliseconds at 10^6 and 10^7 classes on a GPU.

A query scores the centroids ``(B, K)``, keeps the ``probes`` best clusters per sample, scores their members
``(B, probes * W)`` from the snapshot and returns the top ``n``. Where scores are computed in bfloat16 (on a
GPU), a shortlist of ``max(4n, n + 16)`` is ranked again with float32 scores of the same rows: bfloat16
scores of near neighbours tie or swap, and the re-rank keeps recall at what float32 search finds.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from megaclass.index.base import ClassSelector, Metric
from megaclass.index.clustering import hierarchical_balanced_2means

__all__ = ["DEFAULT_LEAF_SIZE", "DEFAULT_PROBES", "ClusterIndex"]

# Leaves of at most 16 rows searched 32 at a time find more of the exact neighbours than these for as many
# rows scored (benchmarks/index_recall.py), but a selected head trained with them on deb-files scores 1.5
# points of top-1 lower: their neighbour lists overlap more, so a batch's active set holds fewer hard classes.
DEFAULT_LEAF_SIZE = 64
DEFAULT_PROBES = 8

_STATE_KEYS = ("rows", "norms", "scales", "assignment", "members", "sums", "centroids", "near")


class ClusterIndex(ClassSelector):
    """Balanced-cluster index over class rows (see the module docstring).

    Args:
        metric: ``cosine`` ranks by angle; ``dot`` by the logit ``feature . row``.
        leaf_size: most rows per cluster at the first build (the padded width ``W``).
        probes: clusters searched per query (raised automatically when ``n`` needs more).
        neighbours: clusters a row may move to in a warm build.
        refine_iters: re-assignment rounds per warm build (0: only refresh snapshot and centroids).
        row_dtype: dtype of the row snapshot (``bfloat16`` on a GPU, ``float32`` on CPU when None;
            ``int8`` (symmetric, one scale per row) halves it again for host-store runs where GPU memory is
            tight, at a small recall cost).
        compute_dtype: dtype of the centroid and member scoring matmuls (``bfloat16`` on a GPU, ``float32``
            on CPU when None); the final ranking is float32 either way.
        device: where the index lives (the features' device); None: the weights' device.
        chunk_rows: rows moved and scored at once during a build.
        seed: seeds the first build's tree.
    """

    def __init__(
        self,
        *,
        metric: Metric | str = Metric.COSINE,
        leaf_size: int = DEFAULT_LEAF_SIZE,
        probes: int = DEFAULT_PROBES,
        neighbours: int = 16,
        refine_iters: int = 1,
        row_dtype: torch.dtype | str | None = None,
        compute_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        chunk_rows: int = 1 << 18,
        seed: int = 0,
    ) -> None:
        if leaf_size < 1 or probes < 1 or neighbours < 1 or refine_iters < 0:
            raise ValueError(
                f"leaf_size, probes, neighbours must be >= 1 and refine_iters >= 0, got "
                f"{leaf_size}, {probes}, {neighbours}, {refine_iters}"
            )
        self.metric = Metric(metric)
        self.leaf_size, self.probes, self.neighbours, self.refine_iters = (
            leaf_size,
            probes,
            neighbours,
            refine_iters,
        )
        self.row_dtype, self.compute_dtype = (
            getattr(torch, dtype) if isinstance(dtype, str) else dtype for dtype in (row_dtype, compute_dtype)
        )
        self.device = None if device is None else torch.device(device)
        self.chunk_rows, self.seed = chunk_rows, seed
        self._state: dict[str, Tensor] | None = None
        self._build_ms = 0.0
        self._builds = 0

    # ---------------------------------------------------------------- build
    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    @staticmethod
    def _encode(chunk: Tensor, storage: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``(n, D)`` as normalised rows in ``storage``, their norms and int8 scales ``(n,)``."""
        chunk = chunk.float()
        norms = chunk.norm(dim=1)
        unit = chunk / norms.clamp_min(1e-12)[:, None]
        scales = torch.ones_like(norms)
        if storage == torch.int8:  # symmetric quantisation, one scale per row
            scales = unit.abs().amax(1).clamp_min(1e-12) / 127
            unit = torch.round(unit / scales[:, None])
        return unit.to(storage), norms, scales

    @torch.no_grad()
    def _snapshot(self, weight: Tensor, device: torch.device) -> dict[str, Tensor]:
        """``rows`` (normalised, storage dtype), ``norms`` and ``scales`` of all the rows of ``weight``."""
        storage = self.row_dtype or self._compute_dtype(device)
        rows = torch.empty(weight.shape, dtype=storage, device=device)
        norms = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
        scales = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
        for start in range(0, weight.shape[0], self.chunk_rows):
            chunk = weight[start : start + self.chunk_rows].to(device, non_blocking=True)
            stop = start + chunk.shape[0]
            rows[start:stop], norms[start:stop], scales[start:stop] = self._encode(chunk, storage)
        return {"rows": rows, "norms": norms, "scales": scales}

    @torch.no_grad()
    def _refresh_rows(self, state: dict[str, Tensor], weight: Tensor, changed: Tensor) -> None:
        """Write rows ``changed (n,)`` of ``weight`` into the snapshot (only they cross the PCIe bus)."""
        storage = state["rows"].dtype
        for start in range(0, changed.numel(), self.chunk_rows):
            ids = changed[start : start + self.chunk_rows]
            chunk = weight[ids.to(weight.device)].to(ids.device, non_blocking=True)
            state["rows"][ids], state["norms"][ids], state["scales"][ids] = self._encode(chunk, storage)

    @staticmethod
    def _gather(state: dict[str, Tensor], ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Snapshot rows ``ids (...)`` as ``(..., D)`` in ``dtype`` (dequantised)."""
        rows = state["rows"][ids].to(dtype)
        if state["rows"].dtype == torch.int8:
            rows = rows * state["scales"][ids].to(dtype)[..., None]
        return rows

    @staticmethod
    def _members(assignment: Tensor, k: int, width: int | None = None) -> Tensor:
        """``(K, W)`` row ids of each cluster, padded with -1."""
        order = torch.argsort(assignment, stable=True)
        sorted_clusters = assignment[order]
        counts = torch.bincount(assignment, minlength=k)
        width = int(counts.max()) if width is None else width  # host sync: the padded width sizes a tensor
        rank = (
            torch.arange(order.numel(), device=order.device)
            - (torch.cumsum(counts, 0) - counts)[sorted_clusters]
        )
        members = torch.full((k, width), -1, dtype=torch.int64, device=assignment.device)
        members[sorted_clusters, rank] = order
        return members

    def _near_clusters(self, centroids: Tensor) -> Tensor:
        """``(K, m)`` each cluster's ``m = neighbours`` nearest clusters (itself first), in blocks of K."""
        k = centroids.shape[0]
        m = min(self.neighbours, k)
        low = centroids.to(self._compute_dtype(centroids.device))
        near = torch.empty(k, m, dtype=torch.int64, device=centroids.device)
        block = max(1, (1 << 26) // k)  # (block, K) similarities at a time: 2^26 scores
        for start in range(0, k, block):
            near[start : start + block] = (low[start : start + block] @ low.T).topk(m, dim=1).indices
        return near

    def _cold(self, state: dict[str, Tensor]) -> None:
        """First build: the balanced 2-means tree, padded members, sums, centroids, cluster graph."""
        # the tree normalises every row, so an int8 snapshot clusters like its dequantised rows
        assignment = hierarchical_balanced_2means(state["rows"], max_leaf=self.leaf_size, seed=self.seed)
        k = int(assignment.max()) + 1  # host sync: the cluster count sizes the structure
        largest = int(torch.bincount(assignment, minlength=k).max())  # host sync: sizes the padding
        members = self._members(assignment, k, largest + max(1, largest // 8))  # slack for warm moves
        sums = self._sums(state, torch.arange(assignment.numel(), device=assignment.device), assignment, k)
        centroids = torch.nn.functional.normalize(sums, dim=1)
        state.update(assignment=assignment, members=members, sums=sums, near=self._near_clusters(centroids))

    def _sums(self, state: dict[str, Tensor], ids: Tensor, clusters: Tensor, k: int) -> Tensor:
        """``(K, D)`` float32 sums of the snapshot rows ``ids (n,)`` by their ``clusters (n,)``."""
        sums = torch.zeros(k, state["rows"].shape[1], dtype=torch.float32, device=ids.device)
        for start in range(0, ids.numel(), self.chunk_rows):
            part = ids[start : start + self.chunk_rows]
            sums.index_add_(
                0, clusters[start : start + self.chunk_rows], self._gather(state, part, torch.float32)
            )
        return sums

    def _proposals(self, state: dict[str, Tensor], ids: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``ids (n,)`` score the clusters near their own: best ``(clusters, scores)``, ``(n, r)``."""
        compute = self._compute_dtype(ids.device)
        near = state["near"]
        proposals = 1  # the best nearby cluster (itself included)
        block = max(1, (1 << 27) // (near.shape[1] * centroids.shape[1]))  # (block, m, D) gathered at once
        clusters, scores = [], []
        for start in range(0, ids.numel(), block):
            part = ids[start : start + block]
            nearby = near[state["assignment"][part]]  # (n, m)
            rows = self._gather(state, part, compute)  # (n, D)
            score = torch.bmm(centroids[nearby].to(compute), rows[:, :, None]).squeeze(2).float()  # (n, m)
            top = score.topk(proposals, dim=1)
            clusters.append(nearby.gather(1, top.indices))
            scores.append(top.values)
        return torch.cat(clusters), torch.cat(scores)

    def _move(self, state: dict[str, Tensor], ids: Tensor, centroids: Tensor, width: int) -> None:
        """Move rows ``ids (n,)`` to their best nearby cluster where it has a free seat (best scores first);
        a row finding no seat stays where it is, so no row is ever placed far from its direction."""
        assignment = state["assignment"]
        k = centroids.shape[0]
        clusters, scores = self._proposals(state, ids, centroids)
        target, score = clusters[:, 0], scores[:, 0]  # (n,) each row's best cluster
        movers = target != assignment[ids]
        room = width - torch.bincount(assignment, minlength=k)  # (K,) free seats now
        # rank the movers of each target cluster by score (two stable sorts), seat the first room[c]
        order = torch.argsort(torch.where(movers, score, -math.inf), descending=True, stable=True)
        order = order[torch.argsort(torch.where(movers, target, k)[order], stable=True)]
        sorted_target = torch.where(movers, target, k)[order]
        counts = torch.bincount(sorted_target, minlength=k + 1)
        rank = (
            torch.arange(order.numel(), device=ids.device) - (torch.cumsum(counts, 0) - counts)[sorted_target]
        )
        seated = (sorted_target < k) & (rank < torch.cat([room, room.new_zeros(1)])[sorted_target])
        moved = ids[order[seated]]
        assignment[moved] = sorted_target[seated]

    def _warm(self, state: dict[str, Tensor], weight: Tensor, changed: Tensor) -> None:
        """Refresh the ``changed (n,)`` rows and move them among nearby clusters: ``O(n)`` work, not ``O(C)``.

        Cluster sums lose the rows' old snapshot and gain the new one; each changed row then moves to the best
        cluster near its own that has a free seat (:meth:`_move`); unchanged rows stay.
        """
        members, assignment, sums = state["members"], state["assignment"], state["sums"]
        k, width = members.shape
        centroids = torch.nn.functional.normalize(sums, dim=1)  # scores use the centroids before the moves
        sums.sub_(self._sums(state, changed, assignment[changed], k))
        self._refresh_rows(state, weight, changed)
        for _ in range(self.refine_iters):
            self._move(state, changed, centroids, width)
        sums.add_(self._sums(state, changed, assignment[changed], k))
        state["members"] = self._members(assignment, k, width)

    @torch.no_grad()
    def build(self, weight: Tensor, *, changed: Tensor | None = None) -> None:
        """Snapshot and cluster the rows (cold), or refresh and move only ``changed`` ones (warm, O(n)).

        A warm build needs a previous build over the same ``(C, D)``; ``changed`` None means every row.
        """
        if weight.dim() != 2 or weight.shape[0] == 0:
            raise ValueError(f"weight: expected a non-empty (C, D) matrix, got {tuple(weight.shape)}")
        begin = time.perf_counter()
        device = self.device or weight.device
        previous = self._state
        if previous is None or previous["rows"].shape != weight.shape:
            state = self._snapshot(weight, device)
            self._cold(state)
        else:
            state = previous
            every = torch.arange(weight.shape[0], device=device)
            self._warm(state, weight, every if changed is None else changed.to(device))
        state["centroids"] = torch.nn.functional.normalize(state["sums"], dim=1).to(
            self._compute_dtype(device)
        )
        self._state = state
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host sync: build time is measured to completion
        self._build_ms = (time.perf_counter() - begin) * 1e3
        self._builds += 1

    # ---------------------------------------------------------------- query
    @property
    def is_built(self) -> bool:
        return self._state is not None

    @torch.no_grad()
    def query(self, features: Tensor, n: int) -> Tensor:
        if self._state is None:
            raise RuntimeError("ClusterIndex.query before build")
        state = self._state
        members, centroids = state["members"], state["centroids"]
        k, width = members.shape
        num_classes = state["rows"].shape[0]
        if n > num_classes:
            found = self.query(features, num_classes)
            return torch.nn.functional.pad(found, (0, n - num_classes), value=-1)
        compute = centroids.dtype
        exact = torch.nn.functional.normalize(features.to(device=members.device, dtype=torch.float32), dim=1)
        queries = exact.to(compute)
        # enough clusters to hold n rows even when clusters are half full
        probes = min(k, max(self.probes, math.ceil(2 * n / max(1, width)) + 1))
        best = (queries @ centroids.T).topk(probes, dim=1).indices  # (B, P)
        candidates = members[best].flatten(1)  # (B, P * W)
        scores = self._member_scores(state, candidates, queries)  # (B, P * W)
        if compute != torch.float32:
            # bf16 scores carry 8 significant bits: near neighbours' scores tie or swap. Keep a shortlist by
            # them, then rank it by float32 scores of the same rows.
            shortlist = scores.topk(min(max(4 * n, n + 16), scores.shape[1]), dim=1)
            candidates = candidates.gather(1, shortlist.indices)
            candidates = candidates.masked_fill(torch.isinf(shortlist.values), -1)
            scores = self._member_scores(state, candidates, exact)
        top = scores.topk(min(n, scores.shape[1]), dim=1)
        ids = candidates.gather(1, top.indices).masked_fill(torch.isinf(top.values), -1)
        if ids.shape[1] < n:
            ids = torch.nn.functional.pad(ids, (0, n - ids.shape[1]), value=-1)
        return ids.to(features.device)

    def _member_scores(self, state: dict[str, Tensor], candidates: Tensor, queries: Tensor) -> Tensor:
        """``(B, M)`` float32 scores of the snapshot rows ``candidates (B, M)`` (-1: none, scored -inf) for
        the unit ``queries (B, D)``, computed in the queries' dtype."""
        valid = candidates >= 0
        ids = candidates.clamp_min(0)
        gathered = self._gather(state, ids, queries.dtype)  # (B, M, D)
        scores = torch.bmm(gathered, queries[:, :, None]).squeeze(2).float()
        if self.metric is Metric.DOT:
            scores = scores * state["norms"][ids]
        return scores.masked_fill(~valid, float("-inf"))

    # ---------------------------------------------------------------- bookkeeping
    def metrics(self) -> dict[str, float]:
        if self._state is None:
            return {}
        sizes = (self._state["members"] >= 0).sum(1)
        return {
            "index_build_ms": self._build_ms,
            "index_clusters": float(self._state["members"].shape[0]),
            "index_largest_cluster": float(sizes.max()),
            "index_cluster_width": float(self._state["members"].shape[1]),  # padded: rows scored per probe
        }

    def state_dict(self) -> dict[str, Tensor]:
        return (
            {}
            if self._state is None
            else {key: value.to("cpu", copy=True) for key, value in self._state.items()}
        )

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            self._state = None
            return
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"ClusterIndex state: missing {missing}")
        device = self.device or torch.device("cpu")
        self._state = {
            key: state[key].to(device, copy=True) for key in _STATE_KEYS
        }  # warm builds write in place
