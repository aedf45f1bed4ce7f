"""Class selectors: exact top-k, the GPU cluster index, the background Annoy forest."""

import pytest
import torch

from megaclass.index import build_selector
from megaclass.index.exact import exact_topk


def _trained_like(classes: int, dim: int, groups: int, batch: int, seed: int = 0):
    """Rows and queries clustered around ``groups`` directions, as class rows of a trained head are."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(groups, dim, generator=generator), dim=1)
    rows = centres[torch.randint(groups, (classes,), generator=generator)]
    rows = rows + 0.3 * torch.randn(classes, dim, generator=generator) / dim**0.5
    rows = rows * (1 + torch.rand(classes, 1, generator=generator))  # varied norms
    queries = centres[torch.randint(groups, (batch,), generator=generator)]
    return rows, queries + 0.3 * torch.randn(batch, dim, generator=generator) / dim**0.5


def _recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (
        sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist(), strict=True)) / truth.numel()
    )


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("classes,chunk", [(1, 4), (13, 4), (100, 7), (100, 1000)])
def test_exact_topk_matches_full_scores(metric, classes, chunk):
    weight, features = torch.randn(classes, 6), torch.randn(5, 6)
    k = min(3, classes)
    scores, ids = exact_topk(features, weight, k, metric=metric, chunk_size=chunk)
    if metric == "cosine":
        full = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(weight, dim=1).T
    else:
        full = features @ weight.T
    expected = full.topk(k, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(ids, expected.indices)


def test_exact_selector_pads_and_sees_live_rows():
    weight = torch.eye(3)
    selector = build_selector("exact", metric="dot")
    selector.build(weight)
    found = selector.query(torch.tensor([[0.0, 0.0, 1.0]]), 5)
    assert found[0, 0] == 2 and found[0, 3:].tolist() == [-1, -1]
    weight[1, 1] = 5.0  # live: the next query sees the changed row
    assert selector.query(torch.tensor([[0.0, 1.0, 0.0]]), 1).tolist() == [[1]]
    assert (selector.query(torch.randn(2, 3), 5)[:, 3:] == -1).all()


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("row_dtype", [None, "bfloat16", "int8"])
def test_cluster_index_recall_and_warm_rebuild(metric, row_dtype):
    rows, queries = _trained_like(6000, 32, 150, 128)
    index = build_selector("gpu", metric=metric, row_dtype=row_dtype, leaf_size=32, probes=8)
    index.build(rows)
    truth = exact_topk(queries, rows, 10, metric=metric)[1]
    assert _recall(index.query(queries, 10), truth) >= 0.9
    # rows drift a little between builds; the warm rebuild follows them
    moved = rows + 0.05 * torch.randn_like(rows) / 32**0.5
    index.build(moved)
    truth = exact_topk(queries, moved, 10, metric=metric)[1]
    assert _recall(index.query(queries, 10), truth) >= 0.9
    sizes = (index.state_dict()["members"] >= 0).sum(1)
    width = index.state_dict()["members"].shape[1]
    assert int(sizes.sum()) == 6000 and int(sizes.max()) <= width <= 36
    assert index.metrics()["index_cluster_width"] == width


def _assert_consistent(index, state: dict) -> None:
    """Members and assignment agree, every row has one seat, the sums are the members' snapshot rows'."""
    classes = state["assignment"].numel()
    k = state["members"].shape[0]
    expected = torch.zeros(k, state["rows"].shape[1]).index_add_(
        0, state["assignment"], index._gather(state, torch.arange(classes), torch.float32)
    )
    torch.testing.assert_close(state["sums"], expected, atol=1e-4, rtol=1e-4)
    members = state["members"]
    assert sorted(members[members >= 0].tolist()) == list(range(classes))
    for cluster in range(k):
        assert (state["assignment"][members[cluster][members[cluster] >= 0]] == cluster).all()


def test_cluster_index_ranks_bfloat16_scores_again_in_float32():
    # 100 rows per direction: near neighbours' scores differ by less than bfloat16 resolves
    rows, queries = _trained_like(3000, 64, 30, 64)
    index = build_selector("gpu", row_dtype="bfloat16", compute_dtype="bfloat16", leaf_size=32, probes=1000)
    index.build(rows)  # probes above the cluster count: every row is a candidate
    snapshot = index._gather(index.state_dict(), torch.arange(3000), torch.float32)
    unit = torch.nn.functional.normalize(queries, dim=1)
    assert torch.equal(index.query(queries, 10), exact_topk(unit, snapshot, 10)[1])


@pytest.mark.parametrize("row_dtype", [None, "int8"])
@pytest.mark.parametrize("refine_iters", [0, 1, 2])
def test_cluster_index_warm_build_moves_only_changed_rows(row_dtype, refine_iters):
    rows, _ = _trained_like(500, 16, 20, 8)
    index = build_selector("gpu", leaf_size=16, row_dtype=row_dtype, refine_iters=refine_iters)
    index.build(rows)
    before = index.state_dict()
    changed = torch.tensor([3, 77, 499])
    moved = rows.clone()
    moved[changed] = torch.randn(3, 16)
    index.build(moved, changed=changed)
    after = index.state_dict()
    fresh = build_selector("gpu", leaf_size=16, row_dtype=row_dtype)
    fresh.build(moved)
    for key in ("rows", "norms", "scales"):  # the snapshot equals one taken from scratch
        assert torch.equal(after[key], fresh.state_dict()[key]), key
    stay = torch.ones(500, dtype=torch.bool)
    stay[changed] = False
    assert torch.equal(after["assignment"][stay], before["assignment"][stay])  # unchanged rows stay put
    _assert_consistent(index, before)
    _assert_consistent(index, after)
    if refine_iters:  # a moved row finds itself: it went to a cluster near its new direction
        assert index.query(moved[changed], 1)[:, 0].tolist() == changed.tolist()


def test_cluster_index_edge_cases_and_state_round_trip():
    rows, queries = _trained_like(50, 8, 5, 4)
    index = build_selector("gpu", leaf_size=8, probes=1)
    with pytest.raises(RuntimeError, match="before build"):
        index.query(queries, 3)
    index.build(rows)
    found = index.query(queries, 60)  # more than C: all classes, then -1
    assert (found[:, 50:] == -1).all()
    assert sorted(found[0, :50].tolist()) == list(range(50))
    one = build_selector("gpu", leaf_size=8)
    one.build(torch.randn(1, 8))
    assert one.query(queries, 1).tolist() == [[0]] * 4
    restored = build_selector("gpu", leaf_size=8, probes=1)
    restored.load_state_dict(index.state_dict())
    assert torch.equal(restored.query(queries, 7), index.query(queries, 7))
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"rows": rows})


def test_annoy_background_build_swaps_in():
    pytest.importorskip("annoy")
    rows, queries = _trained_like(400, 16, 20, 8)
    selector = build_selector("annoy", ntrees=10, seed=3)
    selector.build(rows)  # the first build waits
    assert selector.is_built and selector.swaps == 1
    truth = exact_topk(queries, rows, 10, metric="cosine")[1]
    assert _recall(selector.query(queries, 10), truth) >= 0.8
    new_rows = -rows  # every neighbour changes
    selector.build(new_rows)  # runs in a thread; the old forest serves meanwhile
    old_or_new = selector.query(queries, 10)
    assert old_or_new.shape == (8, 10)
    selector.wait()
    assert selector.swaps == 2
    truth = exact_topk(queries, new_rows, 10, metric="cosine")[1]
    assert _recall(selector.query(queries, 10), truth) >= 0.8
    state = selector.state_dict()
    restored = build_selector("annoy", ntrees=10)
    restored.load_state_dict(state)
    assert torch.equal(restored.query(queries, 10), selector.query(queries, 10))


def test_unknown_selector():
    with pytest.raises(ValueError, match="unknown selector 'faiss'"):
        build_selector("faiss")
