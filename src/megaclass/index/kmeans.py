"""A GPU class index: balanced clusters of the weight rows, queried by scoring centroids then members.

Structure (all on the index's device):

- ``rows (C, D)``: a low-precision snapshot of the (normalised) class rows, taken at each build; the index
  answers from it, so queries never touch the live weights (which may sit in host memory);
- ``norms (C,)``: the rows' lengths, for the ``dot`` metric; ``scales (C,)``: the int8 snapshot's row scales
  (ones for float snapshots);
- ``assignment (C,)`` and ``members (K, W)``: the cluster of each row and each cluster's rows, padded with -1
  (``K`` clusters of at most ``W`` rows);
- ``sums (K, D)``: float32 sums of each cluster's snapshot rows; ``centroids (K, D)``: them normalised;
- ``group_centroids (G, D)``: the normalised sums of each group's clusters (cluster ``c`` is in group
  ``c // (K / G)``);
- ``near (K, m)``: each cluster's ``m = neighbours`` nearest clusters (itself first);
- ``probes``, ``group_probes``: the search's counts; ``stale``: rows whose snapshot predates their last
  update (refreshed by the next build).

The first (cold) build is a two-level balanced k-means: ``G ~ sqrt(K)`` groups fitted on a sample of the
rows and every row seated in one (equal sizes), then ``K / G`` clusters inside every group at once, each row
scored against the clusters of its 3 nearest groups (a boundary between groups cuts no tight set of rows
apart) and seated by capacity (at most ``W = 1.25 C / K`` rows per cluster). It costs ``O(C sqrt(K) D)`` in
a few batched matmuls (on a GPU fused with each row's top-8 clusters: the scores never reach memory) and
sorts: no pass is ``O(C K D)``. The build then picks the search's counts: over
sampled rows used as queries, the cheapest pair (``group_probes`` groups, ``probes`` clusters among theirs)
whose clusters hold ``recall_target`` of each one's 10 nearest other rows (itself left out: it is found
wherever it sits, and a feature is no class row), within a budget of ``4 sqrt(C)`` rows gathered per
query (rows that carry no cluster structure yet, such as a fresh initialisation, would otherwise ask for
most of the matrix: then the budget's best recall is taken). Later builds are warm and touch only the rows
updated since the previous build (``changed``, the rows a sparse step touched): their snapshot is
refreshed, the cluster sums swap their old rows for the new ones, and each moves to its best cluster among
those near its own where a seat is free (else it stays; ``refine_iters`` rounds). A warm build thus costs
``O(changed)``, not ``O(C)``; an empty ``changed`` leaves the index as it is. The search's counts are
chosen again at warm builds 1, 2, 4, 8, ... (as the rows train, their structure changes); where the budget's
search then falls short of ``recall_target``, the clusters were fitted to younger rows and a cold build
fits them again. Both costs are amortised to little over a run.

A cold build may run in a background thread (by default on the CPU from ``2^15`` rows, where it takes
seconds to minutes): the snapshot is taken in the caller, the clustering runs in the thread (on a CUDA side
stream on a GPU), and the finished index is swapped in whole at the next query or build; rows updated
meanwhile are refreshed by the first warm build after the swap. Until the first index is in, a query finds
no classes (``-1``), so a step's active set is its positives and random classes.

A query scores the ``G`` group centroids, keeps the ``group_probes`` best groups, scores their clusters'
centroids and keeps the ``probes`` best clusters (with every group probed: all ``K`` centroids in one
matmul), then scores their members ``(B, probes * W)`` from the snapshot and returns the top ``n``. Where
scores are computed in bfloat16 (on a GPU), a shortlist of ``max(4n, n + 16)`` is ranked again with float32
scores of the same rows: bfloat16 scores of near neighbours tie or swap, and the re-rank keeps recall at
what float32 search finds.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megaclass.host_allocator import release_free_memory
from megaclass.index.base import THOROUGH_FACTOR, ClassSelector, Metric, RowReader
from megaclass.index.clustering import balanced_kmeans_fit, capacity_assign, nearest_centroids
from megaclass.ops.chunked_topk import chunked_topk, merge_topk_scores_
from megaclass.staging import blocks_to_device

__all__ = [
    "DEFAULT_PROBES",
    "ClusterIndex",
    "auto_leaf_size",
    "cluster_layout",
    "cold_build_scratch_bytes",
    "query_scratch_bytes",
    "search_cost",
]

DEFAULT_PROBES = 8  # clusters a shard searches when a caller names no count (parameter-server queries)

# A query scores all K centroids in one matmul shared by the batch, then gathers probes * W member rows per
# sample: small clusters (sqrt(C) / 16 rows, at least 32) keep the gathered part small (at recall 0.92:
# 80 rows per query at 10^5, about 1000 at 10^6; benchmarks/index_recall.py).
_LEAF_PER_SQRT_C = 1 / 16
_MIN_LEAF = 32
_SLACK = 0.25  # a cluster holds at most (1 + slack) C / K rows: its padded width W
_SAMPLE_PER_CLUSTER = 32  # rows per centroid in the sample the centroids are fitted on
_ASSIGN_CANDIDATES = 8  # nearest centroids a row may be seated in when its best are full
_GROUP_COPIES = 3  # groups a row is scored in at a cold build's second level
# entries of a cold build's largest scratch tensors (gathered rows, their scores): large blocks feed a GPU's
# batched matmuls; the CPU gains nothing from them and would hold their hundreds of MB in host memory
_SCRATCH_ENTRIES = {"cuda": 1 << 27, "cpu": 1 << 24}
# a build's blocks hold at most this share of the rows' entries (and at least _MIN_BUILD_ENTRIES): a
# re-clustering build holds them beside the whole run's state, which at 10^6 classes they would outweigh
_BUILD_SHARE = 8
_MIN_BUILD_ENTRIES = 1 << 20
_SCAN_ENTRIES = 1 << 24  # scores (and rows) of the calibration's exact scan at once
_SORT_BYTES_PER_ROW = 104  # what capacity_assign holds a row while it sorts (measured: 98 bytes)
_CALIBRATION_QUERIES = 256  # rows used as queries to pick the probe count
_CALIBRATION_K = 10  # the recall@k the probe count is chosen for
# rows a calibrated search may gather per query: this many sqrt(C) (trained rows need about 1 sqrt(C) at
# 10^6 for recall 0.92; untrained rows would ask for most of C)
_GATHER_BUDGET_PER_SQRT_C = 4
# what a thorough query's search is calibrated for, within THOROUGH_FACTOR times the training search's rows
_EVAL_RECALL_TARGET = 0.97
_REFIT_MARGIN = 0.05  # a warm search this far below its cold build's recall (and the target) refits
# a centroid scored in the matmul the batch shares costs this share of a row gathered for one query (the
# CPU measures ~1/20, a GPU's tensor cores less): the calibration's exchange rate between the two searches
_SHARED_ROW_COST = 1 / 16
# a scan reads each row once and scores it against the whole batch in a matmul: (a row read, a row scored for
# one query) each cost about these shares of a row gathered for one query's search, by device (measured
# against both, RESULTS.md: a CPU's matmul is cheaper still beside its gathers than a GPU's)
_SCAN_COSTS = {"cuda": (1.0, 1 / 32), "cpu": (1 / 4, 1 / 100)}
_PERMUTED_ROWS = 1 << 20  # rows samples are drawn from by a permutation; above, by random draws
_BACKGROUND_MIN_ROWS = 1 << 15  # CPU cold builds from this many rows run in a thread (~1 s at 2^15, D 64)

# the calibrated searches: a training query's, then a thorough one's
_SEARCH_KEYS = ("probes", "group_probes", "recall", "eval_probes", "eval_group_probes", "eval_recall")
_STATE_KEYS = (
    "rows",
    "norms",
    "scales",
    "assignment",
    "members",
    "sums",
    "centroids",
    "group_centroids",
    "near",
    "probes",
    "group_probes",
    "stale",
)


class _Cancelled(Exception):
    """A background build stopped because its result is no longer wanted."""


_RUNNING: set[_ColdBuild] = set()  # builds whose thread still runs


@atexit.register
def _stop_running_builds() -> None:
    """At interpreter exit, stop the builds still running: a thread killed inside a torch op aborts the
    process."""
    for job in list(_RUNNING):
        job.cancel.set()
        job.thread.join()


@dataclass(eq=False)  # hashed by identity: held in _RUNNING
class _ColdBuild:
    """A cold build running in a thread on its own snapshot ``state``; read by the caller once finished."""

    state: dict[str, Tensor]
    started: float  # perf_counter at the build call
    stream: torch.cuda.Stream | None  # the CUDA side stream it runs on
    stale: Tensor  # (n,) ids of rows updated since the snapshot, noted by the caller
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None
    elapsed_ms: float = 0.0


def _take(table: Tensor, ids: Tensor) -> Tensor:
    """``table[ids]`` as ``(*ids.shape, D)`` through ``index_select`` (a few times faster on the CPU)."""
    return table.index_select(0, ids.flatten()).view(*ids.shape, table.shape[1])


def _rows_at(weight: Tensor | RowReader, ids: Tensor) -> Tensor:
    """Rows ``ids (n,)`` of ``weight``, on its device (a :class:`RowReader`'s: on the CPU)."""
    if isinstance(weight, Tensor):
        return weight[ids.to(weight.device)]
    return weight.take(ids)


def _random_rows(num_rows: int, count: int, generator: torch.Generator) -> Tensor:
    """Up to ``count`` distinct row ids at random: a permutation's head up to ``2^20`` rows; above, random
    draws with their rare repeats dropped (a permutation of ``10^8`` ids takes seconds on the host)."""
    if num_rows <= _PERMUTED_ROWS:
        return torch.randperm(num_rows, generator=generator)[:count]
    return torch.randint(num_rows, (count,), generator=generator).unique()


def auto_leaf_size(num_classes: int) -> int:
    """Mean rows per cluster for ``num_classes`` rows: ``sqrt(C) / 16``, at least 32.

    >>> auto_leaf_size(10**7), auto_leaf_size(10**6), auto_leaf_size(10**4)
    (198, 62, 32)
    """
    return max(_MIN_LEAF, round(_LEAF_PER_SQRT_C * math.sqrt(num_classes)))


def search_cost(clusters: int, groups: int, width: int, probes: int, group_probes: int) -> tuple[int, int]:
    """``(shared, gathered)``: centroids a query batch scores in one matmul, and centroids plus member rows
    gathered and scored for each query, searching ``group_probes`` of ``groups`` then ``probes`` clusters.

    >>> search_cost(10000, 100, 80, 10, 100), search_cost(10000, 100, 80, 10, 4)
    ((10000, 800), (100, 1200))
    """
    if group_probes >= groups:
        return clusters, probes * width
    return groups, group_probes * (clusters // groups) + probes * width


def scan_is_cheaper(batch: int, gathered: int, num_classes: int, device_type: str = "cuda") -> bool:
    """Whether an exact scan of ``num_classes`` rows answers ``batch`` queries for less than a search that
    gathers ``gathered`` rows a query, on a device of ``device_type``: the scan reads each row once and
    scores it against every query, ``C (1 + B / 32)`` gathered rows' worth on a GPU and ``C (1/4 + B / 100)``
    on a CPU, against the search's ``B g``.

    >>> scan_is_cheaper(128, 1000, 5000), scan_is_cheaper(512, 4000, 1_000_000)
    (True, False)
    >>> scan_is_cheaper(256, 480, 16760), scan_is_cheaper(256, 480, 16760, "cpu")
    (False, True)
    """
    read, score = _SCAN_COSTS["cuda" if device_type == "cuda" else "cpu"]
    return num_classes * (read + batch * score) <= batch * gathered


def _scratch_entries(device: torch.device | str) -> int:
    """Entries of the largest scratch tensors on ``device`` (a device or its type, as ``"cuda"``)."""
    kind = device if isinstance(device, str) else device.type
    return _SCRATCH_ENTRIES["cuda" if kind == "cuda" else "cpu"]


def _build_entries(device: torch.device | str, num_classes: int, dim: int) -> int:
    """Entries of a build's scratch blocks over ``num_classes`` rows of ``dim``: :func:`_scratch_entries`,
    or less where that is more than ``1 / _BUILD_SHARE`` of the rows."""
    share = max(_MIN_BUILD_ENTRIES, num_classes * dim // _BUILD_SHARE)
    return min(_scratch_entries(device), share)


def cold_build_scratch_bytes(num_classes: int, dim: int, *, row_bytes: int, device_type: str) -> int:
    """Bytes a cold build holds at its peak on top of the index it replaces (which serves until the new one
    is published): the new snapshot (rows of ``row_bytes`` a value) and, a row, the larger of its two levels:

    - groups: its nearest groups (float32 scores, int64 ids), then the capacity assignment's sort;
    - clusters: int64 bookkeeping (its group and assignment, its group's rows, its place in each copy slot's
      order) and its best candidates (float32 scores, int32 ids), then the sort or, while rows are scored,
      three scratch blocks (gathered rows, their scores, the best candidates), no larger than the rows;

    or, at the end, the new index's members and the search calibration's exact scan of sampled rows.
    """
    snapshot = num_classes * (dim * row_bytes + 4 + 4 + 8)  # rows, norms, scales, assignment
    groups = _ASSIGN_CANDIDATES * (4 + 8) + _SORT_BYTES_PER_ROW
    clusters = 8 * (3 + 2 * _GROUP_COPIES) + _ASSIGN_CANDIDATES * (4 + 4)
    per_group = cluster_layout(num_classes)[1]
    blocks = 3 * 4 * min(_build_entries(device_type, num_classes, dim), num_classes * max(dim, per_group))
    on_top = max(num_classes * _SORT_BYTES_PER_ROW, blocks)
    members = num_classes * 8 * (1 + _SLACK)  # int64, padded
    scan = 2 * 4 * min(_SCAN_ENTRIES, num_classes * max(_CALIBRATION_QUERIES, dim))  # scores, gathered rows
    return snapshot + max(num_classes * groups, num_classes * clusters + on_top, round(members) + scan)


def query_scratch_bytes(num_classes: int, dim: int, batch: int, *, device_type: str) -> int:
    """Bytes a query of ``batch`` features holds beside its answer: the member rows it gathers and scores (up
    to the calibrated budget of ``4 sqrt(C)`` a feature), a scratch block of them at a time, in float32."""
    rows = batch * math.ceil(_GATHER_BUDGET_PER_SQRT_C * math.sqrt(num_classes)) * dim
    return 4 * min(_scratch_entries(device_type), rows)


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
        probes: clusters searched per query, in every group (raised automatically when ``n`` needs more);
            None: chosen at each cold build with the groups probed first, as the search gathering the fewest
            rows that finds ``recall_target`` of the 10 nearest other rows of sampled rows.
        recall_target: recall@10 the chosen search reaches on the build's sample of rows, each query's
            own row left out (0.92 measures >= 0.9 on features near trained-like rows).
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
        background: run cold builds in a thread (on a GPU: on a side stream) while the previous index, or
            none, answers; None: on the CPU from ``2^15`` rows, synchronous on a GPU (a cold build there
            takes seconds at ``10^7`` rows). A finished build equals a synchronous one.
        scan_when_cheaper: answer a batch by an exact scan of the snapshot where it costs less than the
            search (:func:`scan_is_cheaper`: a few thousand classes, large batches); False: always search.
    """

    def __init__(
        self,
        *,
        metric: Metric | str = Metric.COSINE,
        leaf_size: int | None = None,
        probes: int | None = None,
        recall_target: float = 0.92,
        neighbours: int = 16,
        refine_iters: int = 1,
        kmeans_iters: int = 4,
        row_dtype: torch.dtype | str | None = None,
        compute_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        chunk_rows: int = 1 << 18,
        seed: int = 0,
        background: bool | None = None,
        scan_when_cheaper: bool = True,
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
        self.chunk_rows, self.seed, self.background = chunk_rows, seed, background
        self.scan_when_cheaper = scan_when_cheaper
        self._state: dict[str, Tensor] | None = None  # the served index, touched by the caller's thread only
        self._search = (0, 0)  # the served index's (probes, group_probes), kept on the host
        self._thorough = (0, 0)  # the same, of its thorough (evaluation) search
        self._job: _ColdBuild | None = None  # a cold build under way in a thread
        self._build_ms = 0.0
        self._warm_builds = 0  # over rows of this shape: the search is chosen again at 1, 2, 4, 8, ...

    @property
    def leaf_size(self) -> int | None:
        """Mean rows per cluster: of the served index once built, else as configured or (automatic) as
        planned for a first build under way; None: automatic and nothing built yet."""
        self._adopt()
        if self._state is None:
            if self._leaf_size is None and self._job is not None:
                return auto_leaf_size(self._job.state["rows"].shape[0])
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
    def _snapshot(self, weight: Tensor | RowReader, device: torch.device) -> dict[str, Tensor]:
        """``rows`` (normalised, storage dtype), ``norms`` and ``scales`` of all the rows of ``weight``."""
        storage = self.row_dtype or self._compute_dtype(device)
        rows = torch.empty(weight.shape, dtype=storage, device=device)
        norms = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
        scales = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
        entries = _build_entries(device, *weight.shape)
        step = max(1, min(self.chunk_rows, entries // weight.shape[1]))  # a block of rows
        starts = range(0, weight.shape[0], step)
        for start, chunk in zip(starts, blocks_to_device(weight, device, step), strict=True):
            stop = start + chunk.shape[0]
            rows[start:stop], norms[start:stop], scales[start:stop] = self._encode(chunk, storage)
        return {"rows": rows, "norms": norms, "scales": scales}

    @torch.no_grad()
    def _refresh_rows(self, state: dict[str, Tensor], weight: Tensor | RowReader, changed: Tensor) -> None:
        """Write rows ``changed (n,)`` of ``weight`` into the snapshot (only they cross the PCIe bus)."""
        storage = state["rows"].dtype
        for start in range(0, changed.numel(), self.chunk_rows):
            ids = changed[start : start + self.chunk_rows]
            chunk = _rows_at(weight, ids).to(ids.device, non_blocking=True)
            state["rows"][ids], state["norms"][ids], state["scales"][ids] = self._encode(chunk, storage)

    @staticmethod
    def _gather(state: dict[str, Tensor], ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Snapshot rows ``ids (...)`` as ``(..., D)`` in ``dtype`` (dequantised)."""
        rows = _take(state["rows"], ids).to(dtype)
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

    def _set_centroids(self, state: dict[str, Tensor], groups: int) -> None:
        """``centroids (K, D)`` and ``group_centroids (G, D)`` from the cluster sums, in the compute dtype."""
        sums = state["sums"]
        compute = self._compute_dtype(sums.device)
        group_sums = sums.view(groups, -1, sums.shape[1]).sum(1)  # (G, D): cluster c is in group c // (K / G)
        state["centroids"] = torch.nn.functional.normalize(sums, dim=1).to(compute)
        state["group_centroids"] = torch.nn.functional.normalize(group_sums, dim=1).to(compute)

    def _near_clusters(self, centroids: Tensor) -> Tensor:
        """``(K, m)`` each cluster's ``m = neighbours`` nearest clusters (itself first), exact, in blocks of
        rows of the ``(K, K)`` similarities (``2^27`` at a time on a GPU: at ``K = 5 10^4``, D 512, a few ms
        of tensor-core work; ``2^24`` on the CPU)."""
        k = centroids.shape[0]
        m = min(self.neighbours, k)
        low = centroids.to(self._compute_dtype(centroids.device))
        near = torch.empty(k, m, dtype=torch.int64, device=centroids.device)
        block = max(1, _scratch_entries(centroids.device) // k)  # (block, K) similarities at a time
        for start in range(0, k, block):
            scores = low[start : start + block] @ low.T  # (b, K)
            scores.diagonal(offset=start).fill_(math.inf)  # itself first, even empty or duplicate
            near[start : start + block] = scores.topk(m, dim=1).indices
        return near

    @staticmethod
    def _check_cancel(cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise _Cancelled

    def _cold(self, state: dict[str, Tensor], cancel: threading.Event | None = None) -> None:
        """First build: two-level balanced k-means (groups, then clusters within each group), padded members,
        sums, centroids, cluster graph and the search's counts. ``cancel`` set: stop between rounds."""
        self._check_cancel(cancel)
        rows = state["rows"]
        num_classes, device = rows.shape[0], rows.device
        compute = self._compute_dtype(device)
        groups, per_group, width = cluster_layout(num_classes, self._leaf_size)
        generator = torch.Generator().manual_seed(self.seed)
        sample = _random_rows(num_classes, _SAMPLE_PER_CLUSTER * groups, generator).to(device)
        # the fits normalise every row, so an int8 snapshot clusters like its dequantised rows
        coarse = balanced_kmeans_fit(
            rows[sample], groups, iters=self.kmeans_iters, seed=self.seed, dtype=compute
        )
        self._check_cancel(cancel)
        scores, candidates = nearest_centroids(
            rows, coarse[0], min(_ASSIGN_CANDIDATES, groups), dtype=compute
        )
        even = num_classes // groups + (torch.arange(groups, device=device) < num_classes % groups).long()
        group = capacity_assign(candidates, scores, groups, even)  # (C,) sizes floor or ceil of C / groups
        # (C, copies) the groups each row is scored in; the candidates' other columns are freed here
        nearby = candidates[:, : min(_GROUP_COPIES, groups)].clone()
        del scores, candidates
        assignment = self._split_groups(state, group, nearby, (groups, per_group, width), generator, cancel)
        k = groups * per_group
        state.update(
            assignment=assignment,
            members=self._members(assignment, k, width),
            sums=self._sums(state, torch.arange(num_classes, device=device), assignment, k),
            stale=torch.empty(0, dtype=torch.int64, device=device),
        )
        self._set_centroids(state, groups)
        self._check_cancel(cancel)
        state["near"] = self._near_clusters(state["centroids"])
        state.update(self._calibrated_search(state))
        state["cold_recall"] = state["recall"]  # what clusters fitted to these rows reach: a refit's bar

    def _split_groups(
        self,
        state: dict[str, Tensor],
        group: Tensor,
        nearby: Tensor,
        layout: tuple[int, int, int],
        generator: torch.Generator,
        cancel: threading.Event | None,
    ) -> Tensor:
        """Balanced k-means inside every group at once: ``assignment (C,)``, cluster ``g * per_group + j``
        being the ``j``-th of group ``g``, at most ``width`` rows each (``layout``: groups, per group, width).

        Each round scores every row against its own group's centroids (groups in blocks, one batched matmul)
        and seats it by :func:`capacity_assign` over all clusters.
        """
        rows = state["rows"]
        num_classes, dim, device = rows.shape[0], rows.shape[1], rows.device
        groups, per_group, width = layout
        compute = self._compute_dtype(device)
        primary = self._members(group, groups, -(-num_classes // groups))  # (G, n) each group's own rows
        starts = torch.randperm(num_classes // groups, generator=generator)[:per_group].to(device)
        centroids = self._gather(state, primary[:, starts], torch.float32)  # (G, per_group, D) random rows
        # a row is scored in its `copies` best groups: a group boundary that cuts a tight set of rows costs
        # little when those rows may still join the clusters on the other side. One copy slot at a time, so
        # that every row is in one group of the slot and its running best candidates merge without conflicts;
        # a slot's rows are held sorted by group and padded to the widest group a block of groups at a time (a
        # padded (G, n) table would hold the widest group's count for every group: several times the rows
        # where second choices crowd a group)
        slots = []
        widest = 1
        for in_group in nearby.unbind(1):  # (C,) each row's group in this slot
            counts = torch.bincount(in_group, minlength=groups)
            first = torch.cumsum(counts, 0) - counts  # (G,) each group's first position in by_group
            by_group = torch.argsort(in_group, stable=True)  # (C,) the rows, group after group
            slots.append((in_group, by_group, first, [*first.tolist(), num_classes]))  # host sync, once
            widest = max(widest, int(counts.max()))
        r = min(_ASSIGN_CANDIDATES, per_group)
        entries = _build_entries(device, num_classes, dim)
        block = max(1, entries // (widest * max(dim, per_group)))  # (b, n, D) rows
        assignment = group * per_group
        for _ in range(self.kmeans_iters):
            self._check_cancel(cancel)
            # each row's r best clusters so far (int32 ids: a third less of what a build holds a row); the
            # spare last row takes what the padding scores, so that no step waits for a count of real rows
            best = torch.full((num_classes + 1, r), -math.inf, device=device)
            picked = torch.full((num_classes + 1, r), -1, dtype=torch.int32, device=device)
            for in_group, by_group, first, bounds in slots:
                for start in range(0, groups, block):
                    stop = min(groups, start + block)
                    part = by_group[bounds[start] : bounds[stop]]  # the rows of groups [start, stop)
                    group_of = in_group[part]
                    rank = torch.arange(part.numel(), device=device) - (first[group_of] - bounds[start])
                    ids = torch.full((stop - start, widest), num_classes, dtype=torch.int64, device=device)
                    ids[group_of - start, rank] = part  # (b, n) each once, padded with the spare row
                    x = self._gather(state, ids.clamp_max(num_classes - 1), compute)  # (b, n, D)
                    low = torch.nn.functional.normalize(centroids[start:stop], dim=2).to(compute)
                    # cluster j of group g is g * per_group + j; on a GPU the scores never reach memory
                    merge_topk_scores_(x, low, best, picked, rows=ids, id_offset=start * per_group)
            assignment = capacity_assign(picked[:num_classes], best[:num_classes], groups * per_group, width)
            del picked, best
            sums = self._sums(state, torch.arange(num_classes, device=device), assignment, groups * per_group)
            centroids = sums.view(groups, per_group, dim)
        return assignment

    @torch.no_grad()
    def _calibrated_search(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Two searches, as ``()`` tensors: ``probes``, ``group_probes`` and their ``recall`` for training
        queries, ``eval_probes``, ``eval_group_probes`` and ``eval_recall`` for :meth:`query`'s thorough
        form. Each is, of the searches within its budget of rows gathered per query (``4 sqrt(C)``, and
        ``THOROUGH_FACTOR`` times that) whose clusters hold its target of the 10 nearest other rows of sampled
        rows used as queries (``recall_target``, and the larger of it and 0.97), the one scoring the fewest
        rows per query; where none reaches it, the one of best recall. ``probes`` set: it, every group
        searched, for both (recall not measured: nan).

        For ``g`` groups probed (1, 2, 4, ... and all), the clusters of the query's ``g`` best groups are
        ranked by centroid score; the rank of a true neighbour's cluster among them is the probe count that
        finds it (never, outside those groups), so ``P(g)`` is a quantile of those ranks. The search scores
        ``G`` centroids in a matmul shared by the batch and gathers ``g K / G`` centroids and ``P(g) W`` rows
        per query; with every group, ``K`` shared centroids and ``P W`` rows (:func:`search_cost`).
        """
        centroids, group_centroids = state["centroids"], state["group_centroids"]
        (k, width), groups = state["members"].shape, group_centroids.shape[0]
        device = centroids.device

        def found(choice: tuple[int, int, float]) -> tuple[Tensor, Tensor, Tensor]:
            return tuple(torch.tensor(value, device=device) for value in choice)  # type: ignore[return-value]

        if self.probes is not None:
            return dict(zip(_SEARCH_KEYS, found((self.probes, groups, math.nan)) * 2, strict=True))
        num_classes, per_group = state["rows"].shape[0], k // groups
        generator = torch.Generator().manual_seed(self.seed + 1)
        picks = _random_rows(num_classes, _CALIBRATION_QUERIES, generator).to(device)
        queries = self._gather(state, picks, torch.float32)  # (q, D) unit rows
        truth = self._true_neighbours(state, queries, picks)  # (q, t)
        if truth.shape[1] == 0:  # one class: every search finds it
            return dict(zip(_SEARCH_KEYS, found((1, groups, 1.0)) * 2, strict=True))
        low = queries.to(centroids.dtype)
        order = (low @ centroids.T).float().argsort(dim=1, descending=True)  # (q, K) clusters, best first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=device).expand_as(order))
        group_order = (low @ group_centroids.T).float().argsort(dim=1, descending=True)  # (q, G)
        group_rank = torch.empty_like(group_order).scatter_(
            1, group_order, torch.arange(groups, device=device).expand_as(group_order)
        )
        clusters = state["assignment"][truth]  # (q, t) the true neighbours' clusters
        budget = _GATHER_BUDGET_PER_SQRT_C * math.sqrt(num_classes)
        wanted = [
            (self.recall_target, budget),
            (max(self.recall_target, _EVAL_RECALL_TARGET), THOROUGH_FACTOR * budget),
        ]
        # per search wanted: (-recall up to the target, cost, probes, group probes, recall), the target at
        # least cost, else the best recall within the budget
        best: list[tuple[float, float, int, int, float] | None] = [None, None]
        for group_probes in sorted({min(groups, 1 << i) for i in range(groups.bit_length() + 1)}):
            probed = group_rank.repeat_interleave(per_group, dim=1) < group_probes  # (q, K) searched clusters
            reached = torch.cumsum(probed.gather(1, order), dim=1)  # (q, K) searched among the j + 1 best
            needed = reached.gather(1, rank.gather(1, clusters))  # (q, t) probes that reach each one
            needed = torch.where(probed.gather(1, clusters), needed, k + 1).flatten().sort().values
            group_part = search_cost(k, groups, width, 1, group_probes)[1] - width
            for which, (target, budget) in enumerate(wanted):
                probes = int(needed[math.ceil(target * needed.numel()) - 1])  # host sync: a count
                probes = max(1, min(probes, k, math.floor((budget - group_part) / width)))
                recall = float((needed <= probes).float().mean())  # host sync, once per search considered
                shared, gathered = search_cost(k, groups, width, probes, group_probes)
                cost = _SHARED_ROW_COST * shared + gathered
                option = (-min(recall, target), cost, probes, group_probes, recall)
                if best[which] is None or option[:2] < best[which][:2]:
                    best[which] = option
        chosen = [found(option[2:]) for option in best if option is not None]
        return dict(zip(_SEARCH_KEYS, (*chosen[0], *chosen[1]), strict=True))

    def _true_neighbours(self, state: dict[str, Tensor], queries: Tensor, picks: Tensor) -> Tensor:
        """``(q, t)`` ids of the exact top ``t = min(10, C - 1)`` rows for the rows ``picks (q,)`` used as
        ``queries``, each without its own row: a query row is found wherever it sits (and ranks first by
        cosine), so counting it would overstate the recall that features, which are no class row, get."""
        found = self._scan(state, queries, min(_CALIBRATION_K + 1, state["rows"].shape[0]))  # (q, t + 1)
        others = found != picks[:, None]
        others[:, -1] &= ~others.all(dim=1)  # a row outside its own top t + 1 drops the last instead
        return found[others].view(found.shape[0], found.shape[1] - 1)

    def _scan(
        self, state: dict[str, Tensor], queries: Tensor, n: int, metric: Metric | None = None
    ) -> Tensor:
        """``(q, n)`` ids of the exact top ``n`` snapshot rows for unit ``queries (q, D)``, by ``metric``
        (None: the index's)."""
        metric = self.metric if metric is None else metric
        # the snapshot's rows are unit rows (int8: over their scales): scored as a search scores its members,
        # times the rows' lengths for dot scores
        chunk = max(1024, _SCAN_ENTRIES // max(queries.shape))  # (q, chunk) scores, (chunk, D) rows
        factors = state["scales"] if state["rows"].dtype == torch.int8 else None
        if metric is Metric.DOT:
            factors = state["norms"] if factors is None else factors * state["norms"]
        return chunked_topk(queries, state["rows"], n, column_scale=factors, chunk_size=chunk)[1]

    def _sums(self, state: dict[str, Tensor], ids: Tensor, clusters: Tensor, k: int) -> Tensor:
        """``(K, D)`` float32 sums of the snapshot rows ``ids (n,)`` by their ``clusters (n,)``."""
        dim = state["rows"].shape[1]
        sums = torch.zeros(k, dim, dtype=torch.float32, device=ids.device)
        entries = _build_entries(ids.device, *state["rows"].shape)
        step = max(1, min(self.chunk_rows, entries // dim))  # a scratch block of rows
        for start in range(0, ids.numel(), step):
            part = ids[start : start + step]
            sums.index_add_(0, clusters[start : start + step], self._gather(state, part, torch.float32))
        return sums

    def _proposals(self, state: dict[str, Tensor], ids: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``ids (n,)`` score the clusters near their own: best ``(clusters, scores)``, ``(n, r)``."""
        compute = self._compute_dtype(ids.device)
        near = state["near"]
        proposals = 1  # the best nearby cluster (itself included)
        entries = _build_entries(ids.device, *state["rows"].shape)
        block = max(1, entries // (near.shape[1] * centroids.shape[1]))  # (b, m, D) rows
        clusters, scores = [], []
        for start in range(0, ids.numel(), block):
            part = ids[start : start + block]
            nearby = near[state["assignment"][part]]  # (n, m)
            rows = self._gather(state, part, compute)  # (n, D)
            score = torch.bmm(_take(centroids, nearby).to(compute), rows[:, :, None]).squeeze(2)  # (n, m)
            score = score.float()
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

    def _warm(self, state: dict[str, Tensor], weight: Tensor | RowReader, changed: Tensor) -> None:
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
        self._set_centroids(state, state["group_centroids"].shape[0])

    @torch.no_grad()
    def build(self, weight: Tensor | RowReader, *, changed: Tensor | None = None) -> None:
        """Snapshot and cluster the rows (cold), or refresh and move only ``changed`` ones (warm, O(n)).

        A warm build needs a previous build over the same ``(C, D)``; ``changed`` None means every row. A
        cold build in the background returns at once; while it runs, ``changed`` rows are noted and refreshed
        by the first warm build after its index is swapped in.
        """
        if weight.dim() != 2 or weight.shape[0] == 0:
            raise ValueError(f"weight: expected a non-empty (C, D) matrix, got {tuple(weight.shape)}")
        begin = time.perf_counter()
        device = self.device or (weight.device if isinstance(weight, Tensor) else torch.device("cpu"))
        self._adopt()
        changed = torch.arange(weight.shape[0], device=device) if changed is None else changed.to(device)
        if self._job is not None:
            if self._job.state["rows"].shape == weight.shape:  # its snapshot predates these rows' updates
                self._job.stale = torch.unique(torch.cat([self._job.stale, changed]))
                return
            self._stop()  # a build over rows of another shape is no longer wanted
        state = self._state
        if state is None or state["rows"].shape != weight.shape:
            self._state = state = None  # an index over other rows says nothing about these: freed first
            self._warm_builds = 0
            self._cold_build(weight, device, begin)
            return
        if state["stale"].numel():  # rows updated while the served index was built
            changed = torch.unique(torch.cat([state["stale"], changed]))
            state["stale"] = state["stale"][:0]
        if changed.numel() == 0:  # no row moved: the index stays as it is
            return
        self._warm(state, weight, changed)
        self._warm_builds += 1
        if self.probes is None and self._warm_builds & (self._warm_builds - 1) == 0:  # a power of two
            state.update(self._calibrated_search(state))
            # host syncs, at builds 1, 2, 4, 8, ...: the clusters no longer fit the rows (they were fitted to
            # younger ones) where the search falls short of the target and of what a cold build reached
            fitted = float(state["cold_recall"]) - _REFIT_MARGIN if "cold_recall" in state else math.inf
            if float(state["recall"]) < min(self.recall_target, fitted):
                if self._in_background(weight.shape[0], device):
                    self._publish(state, begin)  # this index answers while the rows are clustered again
                else:
                    self._state = state = None  # its tensors are freed before the new snapshot is taken
                self._cold_build(weight, device, begin)
                return
        self._publish(state, begin)

    def _cold_build(self, weight: Tensor | RowReader, device: torch.device, begin: float) -> None:
        """Snapshot ``weight`` and cluster it, in the background where :meth:`_in_background` says."""
        snapshot = self._snapshot(weight, device)
        if self._in_background(weight.shape[0], device):
            self._start(snapshot, begin)
            return
        self._cold(snapshot)
        self._publish(snapshot, begin)
        if device.type == "cpu":
            release_free_memory()  # the build's scratch: hundreds of MB at 10^5 rows and more

    def _in_background(self, num_classes: int, device: torch.device) -> bool:
        if self.background is not None:
            return self.background
        return device.type == "cpu" and num_classes >= _BACKGROUND_MIN_ROWS

    def _publish(self, state: dict[str, Tensor], begin: float) -> None:
        """Serve ``state``, built synchronously since ``begin``."""
        if state["rows"].device.type == "cuda":
            torch.cuda.synchronize(state["rows"].device)  # host sync: build time is measured to completion
        self._serve(state, (time.perf_counter() - begin) * 1e3)

    def _serve(self, state: dict[str, Tensor], build_ms: float) -> None:
        self._state = state
        self._search = (int(state["probes"]), int(state["group_probes"]))  # host sync, once per build
        # an index saved before thorough searches were calibrated searches as it trains
        thorough = ("eval_probes", "eval_group_probes")
        self._thorough = tuple(int(state[key]) for key in thorough) if thorough[0] in state else self._search
        self._build_ms = build_ms

    def _start(self, snapshot: dict[str, Tensor], begin: float) -> None:
        """Cluster ``snapshot`` in a thread (on a side stream on a GPU); :meth:`_adopt` swaps it in."""
        device = snapshot["rows"].device
        stream = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the snapshot is written on this stream
        job = _ColdBuild(snapshot, begin, stream, stale=torch.empty(0, dtype=torch.int64, device=device))
        job.thread = threading.Thread(target=self._run, args=(job,), name="cluster-index-build", daemon=True)
        self._job = job
        _RUNNING.add(job)
        job.thread.start()

    def _run(self, job: _ColdBuild) -> None:
        """The build thread: the cold build of ``job.state``; an error is raised by the caller's next call."""
        try:
            on_stream = torch.cuda.stream(job.stream) if job.stream is not None else contextlib.nullcontext()
            with torch.no_grad(), on_stream:  # grad mode and the current stream are per thread
                self._cold(job.state, job.cancel)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            job.error = error
        finally:
            if job.stream is not None:  # this thread waits for the GPU, the trainer does not; a cancelled
                job.stream.synchronize()  # build too, before its snapshot's memory can be freed
            else:
                release_free_memory()  # the build's scratch
            job.elapsed_ms = (time.perf_counter() - job.started) * 1e3
            _RUNNING.discard(job)

    def _adopt(self) -> None:
        """Swap in a finished background build whole (raising its error); a running one keeps running."""
        job = self._job
        if job is None or job.thread.is_alive():
            return
        job.thread.join()
        self._job = None
        if job.error is not None:
            raise RuntimeError("background ClusterIndex build failed") from job.error
        if job.stream is not None:
            current = torch.cuda.current_stream(job.stream.device)
            for tensor in job.state.values():
                tensor.record_stream(current)  # its memory is reused only after this stream's reads
        job.state["stale"] = job.stale
        self._serve(job.state, job.elapsed_ms)

    def _stop(self) -> None:
        """Cancel a background build and wait for its thread (it stops at its next round)."""
        job, self._job = self._job, None
        if job is not None:
            job.cancel.set()
            job.thread.join()

    def wait(self) -> None:
        """Block until a background build is swapped in (raising its error)."""
        if self._job is not None:
            self._job.thread.join()
        self._adopt()

    def close(self) -> None:
        self._stop()

    # ---------------------------------------------------------------- query
    @property
    def is_built(self) -> bool:
        return self._state is not None or self._job is not None

    @property
    def is_ready(self) -> bool:
        self._adopt()
        return self._state is not None

    @torch.no_grad()
    def query(
        self, features: Tensor, n: int, *, metric: Metric | str | None = None, thorough: bool = False
    ) -> Tensor:
        """``(B, n)`` ids (see :class:`ClassSelector`); all ``-1`` while the first build is running. The
        clusters searched are the nearest by angle whatever ``metric``; their rows are ranked by it.
        ``thorough``: the search calibrated for evaluation (``THOROUGH_FACTOR`` times the rows, for recall
        0.97), the features a block at a time so that the rows gathered at once stay those of a training
        query's batch.
        """
        metric = self.metric if metric is None else Metric(metric)
        self._adopt()
        state = self._state
        if state is None:
            if self._job is None:
                raise RuntimeError("ClusterIndex.query before build")
            return torch.full((features.shape[0], n), -1, dtype=torch.int64, device=features.device)
        num_classes = state["rows"].shape[0]
        if n > num_classes:
            found = self.query(features, num_classes, metric=metric, thorough=thorough)
            return torch.nn.functional.pad(found, (0, n - num_classes), value=-1)
        probes, group_probes = self._searched(state, n, thorough)
        (k, width), groups = state["members"].shape, state["group_centroids"].shape[0]
        gathered = search_cost(k, groups, width, probes, group_probes)[1]
        exact = torch.nn.functional.normalize(
            features.to(device=state["members"].device, dtype=torch.float32), dim=1
        )
        device_type = state["members"].device.type
        if self.scan_when_cheaper and scan_is_cheaper(features.shape[0], gathered, num_classes, device_type):
            return self._scan(state, exact, n, metric).to(features.device)
        block = features.shape[0]
        if thorough:  # as many rows gathered at once as a training query's batch gathers (at its budget)
            training = search_cost(k, groups, width, *self._searched(state, n, False))[1]
            block = max(1, features.shape[0] * training // gathered)
        found = [
            self._search_block(state, exact[start : start + block], n, metric, probes, group_probes)
            for start in range(0, features.shape[0], block)
        ]
        return (found[0] if len(found) == 1 else torch.cat(found)).to(features.device)

    def _searched(self, state: dict[str, Tensor], n: int, thorough: bool) -> tuple[int, int]:
        """``(probes, group_probes)`` a query of ``n`` rows searches: the calibrated (or set) counts, raised
        where ``n`` needs more."""
        (k, width), groups = state["members"].shape, state["group_centroids"].shape[0]
        probes, group_probes = self._thorough if thorough else self._search
        if self.probes is not None:  # set after the build (a parameter server's query names its probes)
            probes, group_probes = self.probes, groups
        # enough clusters to hold n rows even when clusters are half full, in enough groups to hold them
        probes = min(k, max(probes, math.ceil(2 * n / max(1, width)) + 1))
        group_probes = min(groups, max(group_probes, math.ceil(probes / (k // groups))))
        return probes, group_probes

    def _search_block(
        self,
        state: dict[str, Tensor],
        exact: Tensor,
        n: int,
        metric: Metric,
        probes: int,
        group_probes: int,
    ) -> Tensor:
        """``(b, n)`` ids on the index's device for the unit features ``exact (b, D)``, searching
        ``group_probes`` groups then ``probes`` clusters."""
        members, centroids, group_centroids = state["members"], state["centroids"], state["group_centroids"]
        k, groups = members.shape[0], group_centroids.shape[0]
        per_group = k // groups
        compute = centroids.dtype
        queries = exact.to(compute)
        if group_probes == groups:
            best = (queries @ centroids.T).topk(probes, dim=1).indices  # (B, P)
        else:
            near_groups = (queries @ group_centroids.T).topk(group_probes, dim=1).indices  # (B, g)
            offsets = torch.arange(per_group, device=members.device)
            clusters = (near_groups[:, :, None] * per_group + offsets).flatten(1)  # (B, g * K / G)
            scores = torch.bmm(_take(centroids, clusters), queries[:, :, None]).squeeze(2)  # (B, g * K / G)
            best = clusters.gather(1, scores.topk(probes, dim=1).indices)  # (B, P)
        candidates = members[best].flatten(1)  # (B, P * W)
        scores = self._member_scores(state, candidates, queries, metric)  # (B, P * W)
        if compute != torch.float32:
            # bf16 scores carry 8 significant bits: near neighbours' scores tie or swap. Keep a shortlist by
            # them, then rank it by float32 scores of the same rows.
            shortlist = scores.topk(min(max(4 * n, n + 16), scores.shape[1]), dim=1)
            candidates = candidates.gather(1, shortlist.indices)
            candidates = candidates.masked_fill(torch.isinf(shortlist.values), -1)
            scores = self._member_scores(state, candidates, exact, metric)
        top = scores.topk(min(n, scores.shape[1]), dim=1)
        ids = candidates.gather(1, top.indices).masked_fill(torch.isinf(top.values), -1)
        if ids.shape[1] < n:
            ids = torch.nn.functional.pad(ids, (0, n - ids.shape[1]), value=-1)
        return ids

    def _member_scores(
        self, state: dict[str, Tensor], candidates: Tensor, queries: Tensor, metric: Metric
    ) -> Tensor:
        """``(B, M)`` float32 ``metric`` scores of the snapshot rows ``candidates (B, M)`` (-1: none, scored
        -inf) for the unit ``queries (B, D)``, computed in the queries' dtype."""
        valid = candidates >= 0
        ids = candidates.clamp_min(0)
        (batch, count), dim = ids.shape, queries.shape[1]
        scores = torch.empty(batch, count, dtype=torch.float32, device=ids.device)
        block = max(1, _scratch_entries(ids.device) // max(1, count * dim))  # (b, M, D) rows at once
        for start in range(0, batch, block):
            gathered = self._gather(state, ids[start : start + block], queries.dtype)  # (b, M, D)
            part = torch.bmm(gathered, queries[start : start + block, :, None]).squeeze(2)
            scores[start : start + block] = part
        if metric is Metric.DOT:
            scores = scores * state["norms"][ids]
        return scores.masked_fill(~valid, float("-inf"))

    # ---------------------------------------------------------------- bookkeeping
    def metrics(self) -> dict[str, float]:
        """Last build time, whether a build runs in the background, clusters and rows scored per query."""
        self._adopt()
        metrics = {"index_building": float(self._job is not None)}
        if self._state is None:
            return metrics
        members, groups = self._state["members"], self._state["group_centroids"].shape[0]
        (k, width), (probes, group_probes) = members.shape, self._search
        shared, gathered = search_cost(k, groups, width, probes, group_probes)
        metrics.update(
            {
                "index_build_ms": self._build_ms,
                "index_clusters": float(k),
                "index_largest_cluster": float((members >= 0).sum(1).max()),
                "index_cluster_width": float(width),  # padded: rows scored per probe
                "index_probes": float(probes),
                "index_group_probes": float(group_probes),
                "index_shared_centroids": float(shared),  # scored in one matmul for the whole batch
                "index_gathered_rows": float(gathered),  # centroids and member rows gathered per query
            }
        )
        recall = float(self._state["recall"]) if "recall" in self._state else math.nan
        if math.isfinite(recall):  # the search's recall@10 on the calibration's sample (not with set probes)
            metrics["index_calibrated_recall"] = recall
        thorough = float(self._state["eval_recall"]) if "eval_recall" in self._state else math.nan
        if math.isfinite(thorough):  # the thorough (evaluation) search's
            metrics["index_eval_gathered_rows"] = float(search_cost(k, groups, width, *self._thorough)[1])
            metrics["index_eval_calibrated_recall"] = thorough
        return metrics

    def state_dict(self) -> dict[str, Tensor]:
        """The served index, whole (empty while the first build runs): never a build under way.

        Its tensors are the served ones, not copies (a checkpoint streams them from where they live; at 10^8
        rows a copy would be gigabytes of host memory): the next warm build changes them in place.
        """
        self._adopt()
        if self._state is None:
            return {}
        # a resumed run recalibrates alike
        return {**self._state, "warm_builds": torch.tensor(self._warm_builds)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Serve ``state`` (a build under way is cancelled: its snapshot is of other rows)."""
        self._stop()
        if not state:
            self._state = None
            return
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"ClusterIndex state: missing {missing}")
        device = self.device or torch.device("cpu")
        # warm builds write in place; the calibration's recall is kept where saved
        optional = ("recall", "cold_recall", "eval_probes", "eval_group_probes", "eval_recall")
        loaded = {key: state[key].to(device, copy=True) for key in (*_STATE_KEYS, *optional) if key in state}
        self._warm_builds = int(state.get("warm_builds", 0))
        self._serve(loaded, self._build_ms)
