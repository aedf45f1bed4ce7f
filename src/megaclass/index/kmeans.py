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

The first (cold) build is a two-level balanced k-means: ``G ~ sqrt(K)`` groups fitted on a sample of the
rows and every row seated in one (equal sizes), then ``K / G`` clusters inside every group at once, each row
scored against the clusters of its 3 nearest groups (a boundary between groups cuts no tight set of rows
apart) and seated by capacity (at most ``W = 1.25 C / K`` rows per cluster). It costs ``O(C sqrt(K) D)`` in
a few batched matmuls and sorts: no pass is ``O(C K D)``. The build then picks the probe count: the fewest
clusters per query whose members hold ``recall_target`` of the exact top 10 of sampled rows. Later builds are
warm and touch only the rows updated since the previous build (``changed``, the rows a sparse step touched):
their snapshot is refreshed, the cluster sums swap their old rows for the new ones, and each moves to its best
cluster among those near its own where a seat is free (else it stays; ``refine_iters`` rounds). A warm build
thus costs ``O(changed)``, not ``O(C)``; an empty ``changed`` leaves the index as it is.

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
from megaclass.index.clustering import balanced_kmeans_fit, capacity_assign, nearest_centroids

__all__ = ["DEFAULT_PROBES", "ClusterIndex", "auto_leaf_size", "cluster_layout"]

DEFAULT_PROBES = 8  # clusters a shard searches when a caller names no count (parameter-server queries)

# A query scores all K centroids in one matmul shared by the batch, then gathers probes * W member rows per
# sample: small clusters (sqrt(C) / 16 rows, at least 32) keep the gathered part small; the calibrated probe
# count stays at a handful from 10^4 to 10^6 rows (benchmarks/index_recall.py).
_LEAF_PER_SQRT_C = 1 / 16
_MIN_LEAF = 32
_SLACK = 0.25  # a cluster holds at most (1 + slack) C / K rows: its padded width W
_SAMPLE_PER_CLUSTER = 32  # rows per centroid in the sample the centroids are fitted on
_ASSIGN_CANDIDATES = 8  # nearest centroids a row may be seated in when its best are full
_GROUP_COPIES = 3  # groups a row is scored in at a cold build's second level
_CALIBRATION_QUERIES = 256  # rows used as queries to pick the probe count
_CALIBRATION_K = 10  # the recall@k the probe count is chosen for

_STATE_KEYS = ("rows", "norms", "scales", "assignment", "members", "sums", "centroids", "near", "probes")


def auto_leaf_size(num_classes: int) -> int:
    """Mean rows per cluster for ``num_classes`` rows: ``sqrt(C) / 16``, at least 32.

    >>> auto_leaf_size(10**7), auto_leaf_size(10**6), auto_leaf_size(10**4)
    (198, 62, 32)
    """
    return max(_MIN_LEAF, round(_LEAF_PER_SQRT_C * math.sqrt(num_classes)))


def cluster_layout(num_classes: int, leaf_size: int | None = None) -> tuple[int, int, int]:
    """``(G, K / G, W)``: groups, clusters per group and the clusters' padded width for ``num_classes`` rows
    of mean ``leaf_size`` per cluster (None: :func:`auto_leaf_size`); ``K`` clusters in all, ``G ~ sqrt(K)``.

    >>> cluster_layout(10**6, 100)
    (100, 100, 125)
    """
    leaf = auto_leaf_size(num_classes) if leaf_size is None else leaf_size
    wanted = max(1, min(num_classes, math.ceil(num_classes / leaf)))
    groups = max(1, round(math.sqrt(wanted)))
    per_group = max(1, min(math.ceil(wanted / groups), num_classes // groups))
    width = math.ceil(num_classes / (groups * per_group) * (1 + _SLACK))
    return groups, per_group, min(num_classes, width)


class ClusterIndex(ClassSelector):
    """Balanced-cluster index over class rows (see the module docstring).

    Args:
        metric: ``cosine`` ranks by angle; ``dot`` by the logit ``feature . row``.
        leaf_size: mean rows per cluster at a cold build (None: :func:`auto_leaf_size`, ``sqrt(C) / 16``);
            a cluster holds at most ``1.25`` times as many (the padded width ``W``).
        probes: clusters searched per query (raised automatically when ``n`` needs more); None: chosen at
            each cold build as the fewest that find ``recall_target`` of the exact top 10 of sampled rows.
        recall_target: recall@10 the chosen probe count reaches on the build's sample of rows.
        neighbours: clusters a row may move to in a warm build.
        refine_iters: re-assignment rounds per warm build (0: only refresh snapshot and centroids).
        kmeans_iters: balanced k-means iterations of each level of a cold build.
        row_dtype: dtype of the row snapshot (``bfloat16`` on a GPU, ``float32`` on CPU when None;
            ``int8`` (symmetric, one scale per row) halves it again for host-store runs where GPU memory is
            tight, at a small recall cost).
        compute_dtype: dtype of the clustering and scoring matmuls (``bfloat16`` on a GPU, ``float32`` on
            CPU when None); the final ranking is float32 either way.
        device: where the index lives (the features' device); None: the weights' device.
        chunk_rows: rows moved and scored at once during a build.
        seed: seeds the cold build's sample and initial centroids.
    """

    def __init__(
        self,
        *,
        metric: Metric | str = Metric.COSINE,
        leaf_size: int | None = None,
        probes: int | None = None,
        recall_target: float = 0.95,
        neighbours: int = 16,
        refine_iters: int = 1,
        kmeans_iters: int = 4,
        row_dtype: torch.dtype | str | None = None,
        compute_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        chunk_rows: int = 1 << 18,
        seed: int = 0,
    ) -> None:
        if (leaf_size is not None and leaf_size < 1) or (probes is not None and probes < 1):
            raise ValueError(f"leaf_size and probes must be >= 1 (or None), got {leaf_size}, {probes}")
        if neighbours < 1 or refine_iters < 0 or kmeans_iters < 1:
            raise ValueError(
                f"neighbours, kmeans_iters must be >= 1 and refine_iters >= 0, got "
                f"{neighbours}, {kmeans_iters}, {refine_iters}"
            )
        if not 0 < recall_target <= 1:
            raise ValueError(f"recall_target: expected a value in (0, 1], got {recall_target}")
        self.metric = Metric(metric)
        self._leaf_size, self.probes, self.recall_target = leaf_size, probes, recall_target
        self.neighbours, self.refine_iters, self.kmeans_iters = neighbours, refine_iters, kmeans_iters
        self.row_dtype, self.compute_dtype = (
            getattr(torch, dtype) if isinstance(dtype, str) else dtype for dtype in (row_dtype, compute_dtype)
        )
        self.device = None if device is None else torch.device(device)
        self.chunk_rows, self.seed = chunk_rows, seed
        self._state: dict[str, Tensor] | None = None
        self._build_ms = 0.0
        self._builds = 0

    @property
    def leaf_size(self) -> int | None:
        """Mean rows per cluster: of the served index once built, else as configured (None: automatic)."""
        if self._state is None:
            return self._leaf_size
        members = self._state["members"]
        return math.ceil(self._state["rows"].shape[0] / members.shape[0])

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
        """First build: two-level balanced k-means (groups, then clusters within each group), padded members,
        sums, centroids, cluster graph and the probe count."""
        rows = state["rows"]
        num_classes, device = rows.shape[0], rows.device
        compute = self._compute_dtype(device)
        groups, per_group, width = cluster_layout(num_classes, self._leaf_size)
        generator = torch.Generator().manual_seed(self.seed)
        sample = torch.randperm(num_classes, generator=generator)[: _SAMPLE_PER_CLUSTER * groups].to(device)
        # the fits normalise every row, so an int8 snapshot clusters like its dequantised rows
        coarse = balanced_kmeans_fit(
            rows[sample], groups, iters=self.kmeans_iters, seed=self.seed, dtype=compute
        )
        scores, candidates = nearest_centroids(
            rows, coarse[0], min(_ASSIGN_CANDIDATES, groups), dtype=compute
        )
        even = num_classes // groups + (torch.arange(groups, device=device) < num_classes % groups).long()
        group = capacity_assign(candidates, scores, groups, even)  # (C,) sizes floor or ceil of C / groups
        nearby = candidates[:, : min(_GROUP_COPIES, groups)]  # (C, copies) the groups each row is scored in
        assignment, centroids = self._split_groups(state, group, nearby, groups, per_group, width, generator)
        k = groups * per_group
        sums = self._sums(state, torch.arange(num_classes, device=device), assignment, k)
        centroids = torch.nn.functional.normalize(sums, dim=1)
        state.update(
            assignment=assignment,
            members=self._members(assignment, k, width),
            sums=sums,
            near=self._near_clusters(centroids),
        )
        state["probes"] = self._calibrated_probes(state, centroids.to(compute))

    def _split_groups(
        self,
        state: dict[str, Tensor],
        group: Tensor,
        nearby: Tensor,
        groups: int,
        per_group: int,
        width: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """Balanced k-means inside every group at once: ``(assignment (C,), centroids (K, D))``, cluster
        ``g * per_group + j`` being the ``j``-th of group ``g``, at most ``width`` rows each.

        Each round scores every row against its own group's centroids (groups in blocks, one batched matmul)
        and seats it by :func:`capacity_assign` over all clusters.
        """
        rows = state["rows"]
        num_classes, dim, device = rows.shape[0], rows.shape[1], rows.device
        compute = self._compute_dtype(device)
        primary = self._members(group, groups, -(-num_classes // groups))  # (G, n) each group's own rows
        starts = torch.randperm(num_classes // groups, generator=generator)[:per_group].to(device)
        centroids = self._gather(state, primary[:, starts], torch.float32)  # (G, per_group, D) random rows
        # a row is scored in its `copies` best groups: a group boundary that cuts a tight set of rows costs
        # little when those rows may still join the clusters on the other side
        copies = nearby.shape[1]
        entries = self._members(nearby.flatten(), groups)  # (G, E) entry e = row e // copies, -1 padded
        valid = entries >= 0
        r = min(_ASSIGN_CANDIDATES, per_group)
        block = max(1, (1 << 27) // (entries.shape[1] * max(dim, per_group)))  # (block, E, D) rows at once
        offsets = torch.arange(groups, device=device)[:, None, None] * per_group  # (G, 1, 1)
        assignment = group * per_group
        for _ in range(self.kmeans_iters):
            scores = torch.full((num_classes * copies, r), -math.inf, device=device)
            candidates = torch.zeros(num_classes * copies, r, dtype=torch.int64, device=device)
            for start in range(0, groups, block):
                ids, seen = entries[start : start + block], valid[start : start + block]
                x = self._gather(state, ids.clamp_min(0) // copies, compute)  # (b, E, D)
                low = torch.nn.functional.normalize(centroids[start : start + block], dim=2).to(compute)
                top = torch.bmm(x, low.transpose(1, 2)).float().topk(r, dim=2)  # (b, E, r)
                scores[ids[seen]] = top.values[seen]
                candidates[ids[seen]] = (top.indices + offsets[start : start + block])[seen]
            best = scores.view(num_classes, copies * r).topk(r, dim=1)  # (C, r) over the row's copies
            candidates = candidates.view(num_classes, copies * r).gather(1, best.indices)
            assignment = capacity_assign(candidates, best.values, groups * per_group, width)
            sums = self._sums(state, torch.arange(num_classes, device=device), assignment, groups * per_group)
            centroids = sums.view(groups, per_group, dim)
        return assignment, centroids.view(groups * per_group, dim)

    @torch.no_grad()
    def _calibrated_probes(self, state: dict[str, Tensor], centroids: Tensor) -> Tensor:
        """``()`` int64: the fewest probes whose clusters hold ``recall_target`` of the exact top 10 of
        sampled rows used as queries (``probes`` itself when set).

        The rank of each true neighbour's cluster in a query's centroid order is the probe count that finds
        it; candidates are ranked by float32 scores, so the recall at ``P`` probes is the share of ranks < P.
        """
        assignment, num_classes = state["assignment"], state["rows"].shape[0]
        device = assignment.device
        if self.probes is not None:
            return torch.tensor(self.probes, device=device)
        generator = torch.Generator().manual_seed(self.seed + 1)
        picks = torch.randperm(num_classes, generator=generator)[:_CALIBRATION_QUERIES].to(device)
        queries = self._gather(state, picks, torch.float32)  # (q, D) unit rows
        truth = self._scan(state, queries, min(_CALIBRATION_K, num_classes))  # (q, k)
        order = (queries.to(centroids.dtype) @ centroids.T).float().argsort(dim=1, descending=True)  # (q, K)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=device).expand_as(order)
        )
        needed = rank.gather(1, assignment[truth]).flatten().sort().values  # (q * k,) probes each one needs
        return needed[math.ceil(self.recall_target * needed.numel()) - 1] + 1

    def _scan(self, state: dict[str, Tensor], queries: Tensor, n: int) -> Tensor:
        """``(q, n)`` ids of the exact top ``n`` snapshot rows for unit ``queries (q, D)``, by the metric."""
        best_scores = queries.new_empty(queries.shape[0], 0)
        best_ids = torch.empty(queries.shape[0], 0, dtype=torch.int64, device=queries.device)
        num_classes = state["rows"].shape[0]
        chunk = max(1024, (1 << 24) // queries.shape[0])  # (q, chunk) scores of 2^24 entries at a time
        for start in range(0, num_classes, chunk):
            ids = torch.arange(start, min(num_classes, start + chunk), device=queries.device)
            scores = queries @ self._gather(state, ids, torch.float32).T  # (q, chunk)
            if self.metric is Metric.DOT:
                scores = scores * state["norms"][ids]
            top = torch.cat([best_scores, scores], 1).topk(min(n, best_scores.shape[1] + ids.numel()), dim=1)
            best_scores = top.values
            best_ids = torch.cat([best_ids, ids.expand(queries.shape[0], -1)], 1).gather(1, top.indices)
        return best_ids

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
        if changed.numel() == 0:
            return
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
        probes = int(state["probes"]) if self.probes is None else self.probes  # host sync: sizes the search
        probes = min(k, max(probes, math.ceil(2 * n / max(1, width)) + 1))
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
