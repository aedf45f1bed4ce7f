"""Balanced clustering of row vectors: flat balanced k-means and the hierarchical balanced 2-means label tree.

Both are spherical (cosine) by default: rows and centroids are L2-normalised and a row's affinity to a
centroid is their dot product. Everything is vectorised over all rows (and, in the tree, over all nodes of a
level), so it runs on the GPU in a handful of sorts and matmuls; on the CPU it is the same code.

Balance comes from :func:`capacity_assign`: each row proposes to its best clusters in order and every cluster
keeps its best-scoring proposers up to a capacity (a vectorised deferred-acceptance, Gale-Shapley 1962), the
remainder fill the clusters with room left.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "balanced_kmeans",
    "balanced_kmeans_fit",
    "capacity_assign",
    "cluster_centroids",
    "hierarchical_balanced_2means",
    "nearest_centroids",
]

_CHUNK_ROWS = 1 << 16  # rows per matmul chunk: keeps the (chunk, k) score block small


def _check_points(x: Tensor, name: str = "x") -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, E) matrix, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype == torch.int8):  # int8: quantised rows, clustered by direction
        raise ValueError(f"{name}: expected a floating-point (or int8) matrix, got dtype {x.dtype}")


def _normalise(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def cluster_centroids(x: Tensor, ids: Tensor, k: int, *, spherical: bool = True) -> Tensor:
    """``(k, E)`` float32 centroid of each cluster (normalised when ``spherical``); an empty cluster gets 0.

    Args:
        x: ``(N, E)`` points.
        ids: ``(N,)`` cluster of each point, in ``[0, k)``.
    """
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        chunk = x[start : start + _CHUNK_ROWS].float()
        sums.index_add_(0, ids[start : start + _CHUNK_ROWS], _normalise(chunk) if spherical else chunk)
    if spherical:
        return torch.nn.functional.normalize(sums, dim=1)
    counts = torch.bincount(ids, minlength=k).clamp_min(1).to(torch.float32)
    return sums / counts[:, None]


def nearest_centroids(
    x: Tensor, centroids: Tensor, r: int, *, spherical: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Each row's ``r`` best centroids: ``(scores, ids)``, each ``(N, r)``, scores descending (float32).

    Scores are computed in ``dtype``, in chunks whose ``(chunk, k)`` score block stays near 2^26 entries.
    """
    chunk_rows = max(1024, min(_CHUNK_ROWS, (1 << 26) // centroids.shape[0]))
    low = centroids.to(dtype)
    if not spherical:
        squares = (centroids * centroids).sum(1)[None, :]
    scores_out, ids_out = [], []
    for start in range(0, x.shape[0], chunk_rows):
        chunk = x[start : start + chunk_rows].float()
        if spherical:
            scores = _normalise(chunk).to(dtype) @ low.T  # (chunk, k)
        else:  # negative squared distance, up to the row's own norm
            scores = 2 * (chunk.to(dtype) @ low.T).float() - squares
        top = scores.topk(r, dim=1)
        scores_out.append(top.values.float())
        ids_out.append(top.indices)
    return torch.cat(scores_out), torch.cat(ids_out)


def capacity_assign(candidates: Tensor, scores: Tensor, k: int, capacity: int | Tensor) -> Tensor:
    """Assign each row to one cluster so that no cluster gets more than ``capacity`` rows.

    Rows propose to their candidates in column order; a cluster keeps its ``capacity`` best-scoring proposers
    and rejects the rest, who propose to their next candidate. Rows rejected by all their candidates go to the
    clusters with room left, in cluster order.

    Args:
        candidates: ``(N, r)`` cluster ids in ``[0, k)``, best first.
        scores: ``(N, r)`` each candidate's score (higher is better).
        k: number of clusters.
        capacity: most rows per cluster, one number or ``(k,)`` per cluster; the total must be ``>= N``.

    Returns:
        ``(N,)`` int64 cluster of each row.
    """
    n, r = candidates.shape
    device = candidates.device
    capacity = torch.as_tensor(capacity, dtype=torch.int64, device=device).expand(k)
    if int(capacity.sum()) < n:  # host sync: a user error must stop here
        raise ValueError(
            f"capacity: {k} clusters of total capacity {int(capacity.sum())} cannot hold {n} rows"
        )
    assigned = torch.full((n,), -1, dtype=torch.int64, device=device)
    held = torch.zeros(n, dtype=scores.dtype, device=device)
    for column in range(r):
        proposing = assigned < 0
        if not bool(proposing.any()):  # host sync: every row is seated
            break
        # the rows holding a seat, then those proposing (ids ascending in each): the order ties keep
        points = torch.argsort(proposing, stable=True)
        clusters = torch.where(proposing, candidates[:, column], assigned)[points]
        point_scores = torch.where(proposing, scores[:, column], held)[points]
        # sort by cluster, best score first within a cluster (two stable sorts)
        order = torch.argsort(point_scores, descending=True, stable=True)
        order = order[torch.argsort(clusters[order], stable=True)]
        sorted_clusters = clusters[order]
        del clusters
        counts = torch.bincount(sorted_clusters, minlength=k)
        rank = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_clusters]
        rejected = rank >= capacity[sorted_clusters]
        del rank
        rows = points[order]
        assigned[rows] = sorted_clusters.masked_fill_(rejected, -1)
        held[rows] = point_scores[order]
    free = (assigned < 0).nonzero().squeeze(1)
    if free.numel():
        room = capacity - torch.bincount(assigned[assigned >= 0], minlength=k)
        slots = torch.repeat_interleave(torch.arange(k, device=device), room)  # one entry per free seat
        assigned[free] = slots[: free.numel()]
    return assigned


def balanced_kmeans_fit(
    x: Tensor,
    k: int,
    *,
    iters: int = 10,
    seed: int = 0,
    spherical: bool = True,
    init: Tensor | None = None,
    candidates: int = 8,
    slack: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Balanced k-means: ``(centroids (k, E) float32, ids (N,) int64)``.

    Args:
        x: ``(N, E)`` points (any float dtype, any device).
        k: number of clusters, ``1 <= k <= N``.
        iters: Lloyd iterations (assign with capacity, then recompute centroids).
        seed: picks the initial centroids among the points when ``init`` is None.
        spherical: cosine affinity on normalised points (else squared Euclidean distance).
        init: ``(k, E)`` starting centroids (a warm start from a previous fit).
        candidates: how many nearest centroids each point may propose to.
        slack: capacity is ``ceil(N / k * (1 + slack))``; 0 gives sizes ``floor(N/k)`` or ``ceil(N/k)``
            (the first ``N % k`` clusters hold the larger size).
        dtype: dtype of the point-centroid score matmuls (bfloat16 halves a GPU fit's time).
    """
    _check_points(x)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= N={n}, got {k}")
    if iters < 1:
        raise ValueError(f"iters: expected >= 1, got {iters}")
    if init is not None:
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init: expected shape {(k, x.shape[1])}, got {tuple(init.shape)}")
        centroids = init.to(device=x.device, dtype=torch.float32)
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        picks = torch.randperm(n, generator=generator)[:k].to(x.device)
        centroids = x[picks].float()
    if spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    if slack > 0:
        capacity: int | Tensor = math.ceil(n / k * (1 + slack))
    else:
        capacity = n // k + (torch.arange(k, device=x.device) < n % k).long()  # (k,) sums to N exactly
    r = min(candidates, k)
    ids = torch.zeros(n, dtype=torch.int64, device=x.device)
    for _ in range(iters):
        scores, top = nearest_centroids(x, centroids, r, spherical=spherical, dtype=dtype)
        ids = capacity_assign(top, scores, k, capacity)
        centroids = cluster_centroids(x, ids, k, spherical=spherical)
    return centroids, ids


def balanced_kmeans(x: Tensor, k: int, *, iters: int = 10, seed: int = 0, spherical: bool = True) -> Tensor:
    """Cluster ids ``(N,)`` int64 of balanced k-means: each cluster gets ``floor(N/k)`` or ``ceil(N/k)`` rows.

    >>> x = torch.randn(100, 8)
    >>> torch.bincount(balanced_kmeans(x, 4)).tolist()
    [25, 25, 25, 25]
    """
    return balanced_kmeans_fit(x, k, iters=iters, seed=seed, spherical=spherical)[1]


def _balanced_split(node: Tensor, score: Tensor, sizes: Tensor) -> Tensor:
    """``(N,)`` bool, True for the rows going left: within each node, the ``ceil(size/2)`` highest scores."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(node[order], stable=True)]
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[node[order]]
    return rank < (sizes[node] + 1) // 2


def _projection_scores(x: Tensor, node: Tensor, direction: Tensor, *, spherical: bool) -> Tensor:
    """``(N,)`` dot product of each (normalised) row with its node's direction ``(nodes, E)``."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        chunk = x[start : start + _CHUNK_ROWS].float()
        chunk = _normalise(chunk) if spherical else chunk
        out[start : start + _CHUNK_ROWS] = (chunk * direction[node[start : start + _CHUNK_ROWS]]).sum(1)
    return out


def hierarchical_balanced_2means(
    x: Tensor, *, max_leaf: int = 100, seed: int = 0, iters: int = 5, spherical: bool = True
) -> Tensor:
    """Leaf id ``(N,)`` int64 of each row in a balanced binary tree built by recursive 2-means.

    Every node splits its rows into halves of ``ceil(n/2)`` and ``floor(n/2)`` by 2-means with a balance
    constraint (the PECOS / Parabel label-tree clustering, arXiv 2010.05878), until nodes hold at most
    ``max_leaf`` rows. All nodes of a level split at once. Leaf ids are numbered left to right, so the leaves
    of a subtree are contiguous; sizes differ by at most one within a level.

    Args:
        x: ``(N, E)`` rows (label vectors, classifier rows).
        max_leaf: most rows per leaf.
        seed: seeds the random initial split of every node.
        iters: 2-means iterations per level.
        spherical: cosine affinity on normalised rows.

    >>> leaves = hierarchical_balanced_2means(torch.randn(1000, 16), max_leaf=100)
    >>> int(leaves.max()) + 1, int(torch.bincount(leaves).max())
    (16, 63)
    """
    _check_points(x)
    if max_leaf < 1:
        raise ValueError(f"max_leaf: expected >= 1, got {max_leaf}")
    n, device = x.shape[0], x.device
    depth = max(0, math.ceil(math.log2(n / max_leaf))) if n > max_leaf else 0
    generator = torch.Generator(device="cpu").manual_seed(seed)
    node = torch.zeros(n, dtype=torch.int64, device=device)
    for level in range(depth):
        nodes = 1 << level
        sizes = torch.bincount(node, minlength=nodes)
        score = torch.rand(n, generator=generator).to(device)  # random balanced split to start from
        left = _balanced_split(node, score, sizes)
        for _ in range(iters):
            child = node * 2 + (~left).long()
            centroids = cluster_centroids(x, child, 2 * nodes, spherical=spherical).view(nodes, 2, -1)
            direction = centroids[:, 0] - centroids[:, 1]  # (nodes, E): left minus right
            if not spherical:  # nearer to the left centroid <=> x . (c0 - c1) > (|c0|^2 - |c1|^2) / 2
                offset = ((centroids[:, 0] ** 2).sum(1) - (centroids[:, 1] ** 2).sum(1)) / 2
                score = _projection_scores(x, node, direction, spherical=False) - offset[node]
            else:
                score = _projection_scores(x, node, direction, spherical=True)
            left = _balanced_split(node, score, sizes)
        node = node * 2 + (~left).long()
    return torch.unique(node, return_inverse=True)[1]  # compact ids when max_leaf = 1 left some leaves empty
