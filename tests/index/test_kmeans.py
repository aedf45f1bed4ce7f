"""The GPU cluster index: recall against an exact scan, warm rebuilds, row dtypes, saved state."""

import pytest
import torch

from megaclass.index import build_selector
from megaclass.index.exact import exact_topk

from ._clustered import recall, trained_like


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("row_dtype", [None, "bfloat16", "int8"])
def test_cluster_index_recall_and_warm_rebuild(metric, row_dtype):
    rows, queries = trained_like(6000, 32, 150, 128)
    index = build_selector("gpu", metric=metric, row_dtype=row_dtype, leaf_size=32, probes=8)
    index.build(rows)
    truth = exact_topk(queries, rows, 10, metric=metric)[1]
    assert recall(index.query(queries, 10), truth) >= 0.9
    # rows drift a little between builds; the warm rebuild follows them
    moved = rows + 0.05 * torch.randn_like(rows) / 32**0.5
    index.build(moved)
    truth = exact_topk(queries, moved, 10, metric=metric)[1]
    assert recall(index.query(queries, 10), truth) >= 0.9
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
    rows, queries = trained_like(3000, 64, 30, 64)
    index = build_selector("gpu", row_dtype="bfloat16", compute_dtype="bfloat16", leaf_size=32, probes=1000)
    index.build(rows)  # probes above the cluster count: every row is a candidate
    snapshot = index._gather(index.state_dict(), torch.arange(3000), torch.float32)
    unit = torch.nn.functional.normalize(queries, dim=1)
    assert torch.equal(index.query(queries, 10), exact_topk(unit, snapshot, 10)[1])


@pytest.mark.parametrize("row_dtype", [None, "int8"])
@pytest.mark.parametrize("refine_iters", [0, 1, 2])
def test_cluster_index_warm_build_moves_only_changed_rows(row_dtype, refine_iters):
    rows, _ = trained_like(500, 16, 20, 8)
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
    rows, queries = trained_like(50, 8, 5, 4)
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
