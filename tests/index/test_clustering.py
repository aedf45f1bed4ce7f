"""Balanced k-means and the hierarchical balanced 2-means tree."""

import pytest
import torch

from megaclass.index.clustering import (
    balanced_kmeans,
    balanced_kmeans_fit,
    capacity_assign,
    cluster_centroids,
    hierarchical_balanced_2means,
)


def _planted(clusters: int, per: int, dim: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim), dim=1)
    labels = torch.arange(clusters).repeat_interleave(per)
    return centres[labels] + noise * torch.randn(clusters * per, dim), labels


def _purity(ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of points whose cluster's majority label is their own."""
    hits = 0
    for cluster in ids.unique():
        members = labels[ids == cluster]
        hits += int(torch.bincount(members).max())
    return hits / labels.numel()


@pytest.mark.parametrize("n,k", [(1, 1), (10, 1), (10, 10), (101, 7), (640, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_balanced_kmeans_sizes(n, k, dtype):
    ids = balanced_kmeans(torch.randn(n, 6).to(dtype), k, iters=3)
    assert ids.dtype == torch.int64 and ids.shape == (n,)
    sizes = torch.bincount(ids, minlength=k)
    assert sizes.numel() == k and int(sizes.min()) >= n // k and int(sizes.max()) <= -(-n // k)


@pytest.mark.parametrize("spherical", [True, False])
def test_balanced_kmeans_recovers_planted_clusters(spherical):
    x, labels = _planted(12, 30, 16)
    centroids, ids = balanced_kmeans_fit(x, 12, iters=10, spherical=spherical)
    assert _purity(ids, labels) == 1.0
    assert centroids.shape == (12, 16)
    torch.testing.assert_close(centroids, cluster_centroids(x, ids, 12, spherical=spherical))


def test_balanced_kmeans_deterministic_and_warm_start():
    x, _ = _planted(8, 25, 10)
    a = balanced_kmeans_fit(x, 8, seed=3)
    b = balanced_kmeans_fit(x, 8, seed=3)
    assert torch.equal(a[1], b[1])
    warm = balanced_kmeans_fit(x, 8, iters=1, init=a[0])  # converged centroids: one step keeps the clusters
    assert torch.equal(warm[1], a[1])


def test_capacity_assign_respects_capacity_and_preference():
    # three rows all prefer cluster 0 (capacity 1): the best-scoring keeps it, the others move on
    candidates = torch.tensor([[0, 1], [0, 1], [0, 2]])
    scores = torch.tensor([[0.5, 0.1], [0.9, 0.2], [0.7, 0.6]])
    assert capacity_assign(candidates, scores, 3, 1).tolist() == [1, 0, 2]
    # every row rejected by all its candidates lands in a cluster with room
    ids = capacity_assign(torch.zeros(5, 1, dtype=torch.long), torch.rand(5, 1), 3, 2)
    assert torch.bincount(ids, minlength=3).tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="capacity"):
        capacity_assign(torch.zeros(5, 1, dtype=torch.long), torch.rand(5, 1), 2, 2)


def _capacity_assign_reference(candidates: list, scores: list, k: int, capacity: list) -> list:
    """Proposals column by column in plain Python: a cluster keeps its best-scoring proposers, a row already
    seated before a new one where their scores tie (then the lower id); the rejected propose next."""
    n = len(candidates)
    assigned, held = [-1] * n, [0.0] * n
    for column in range(len(candidates[0])):
        if all(cluster >= 0 for cluster in assigned):
            break
        proposals = [[] for _ in range(k)]
        for row in range(n):
            seated = assigned[row] >= 0
            cluster = assigned[row] if seated else candidates[row][column]
            score = held[row] if seated else scores[row][column]
            proposals[cluster].append((-score, not seated, row))
        for cluster, rows in enumerate(proposals):
            for place, (score, _, row) in enumerate(sorted(rows)):
                assigned[row], held[row] = (cluster if place < capacity[cluster] else -1), -score
    free = [row for row in range(n) if assigned[row] < 0]
    room = [capacity[c] - assigned.count(c) for c in range(k)]
    seats = [c for c in range(k) for _ in range(room[c])]
    for row, cluster in zip(free, seats, strict=False):
        assigned[row] = cluster
    return assigned


@pytest.mark.parametrize("seed", range(20))
def test_capacity_assign_matches_a_plain_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    n, k = (
        int(torch.randint(1, 60, (1,), generator=generator)),
        int(torch.randint(1, 9, (1,), generator=generator)),
    )
    r = int(torch.randint(1, k + 1, (1,), generator=generator))
    candidates = torch.stack([torch.randperm(k, generator=generator)[:r] for _ in range(n)])
    if seed % 2:
        candidates = candidates.int()  # as a cold build passes them
    # few distinct scores: ties between a seated row and a new proposer are common
    scores = torch.randint(0, 3, (n, r), generator=generator).float().sort(dim=1, descending=True).values
    capacity = torch.randint(0, 2 * (n // k) + 2, (k,), generator=generator)
    capacity[0] += max(0, n - int(capacity.sum()))
    expected = _capacity_assign_reference(candidates.tolist(), scores.tolist(), k, capacity.tolist())
    assert capacity_assign(candidates, scores, k, capacity).tolist() == expected


@pytest.mark.parametrize("n,max_leaf", [(1, 1), (7, 1), (100, 100), (101, 100), (1000, 100), (777, 13)])
def test_hierarchical_leaf_sizes(n, max_leaf):
    leaves = hierarchical_balanced_2means(torch.randn(n, 5), max_leaf=max_leaf, iters=2)
    sizes = torch.bincount(leaves)
    assert int(sizes.min()) >= 1 and int(sizes.max()) <= max_leaf
    assert int(sizes.max()) - int(sizes.min()) <= 1  # balanced splits at every level


@pytest.mark.parametrize("spherical", [True, False])
def test_hierarchical_planted_clusters_are_pure_and_contiguous(spherical):
    x, labels = _planted(8, 64, 24)  # 512 points, leaves of 64: one planted cluster per leaf
    leaves = hierarchical_balanced_2means(x, max_leaf=64, spherical=spherical)
    assert int(leaves.max()) + 1 == 8
    assert _purity(leaves, labels) == 1.0
    coarse = hierarchical_balanced_2means(x, max_leaf=128, spherical=spherical)
    # leaves of the finer tree nest inside the coarser one: leaf // 2 is the parent
    assert _purity(coarse, leaves // 2) == 1.0


def test_errors():
    with pytest.raises(ValueError, match="k: expected"):
        balanced_kmeans(torch.randn(5, 2), 6)
    with pytest.raises(ValueError, match="x: expected a non-empty"):
        hierarchical_balanced_2means(torch.randn(0, 2))
    with pytest.raises(ValueError, match="max_leaf"):
        hierarchical_balanced_2means(torch.randn(4, 2), max_leaf=0)
