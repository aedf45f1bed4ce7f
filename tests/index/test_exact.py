"""The exact selector: chunked top-k over every row, the recall reference."""

import pytest
import torch

from megaclass.index import build_selector
from megaclass.index.exact import exact_topk


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


def test_exact_selector_ranks_by_the_metric_a_query_names():
    weight, features = torch.randn(50, 6) * torch.rand(50, 1) * 4, torch.randn(7, 6)
    selector = build_selector("exact", metric="cosine")
    selector.build(weight)
    for asked, ranked in (("dot", "dot"), (None, "cosine")):
        expected = exact_topk(features, weight, 4, metric=ranked)[1]
        assert torch.equal(selector.query(features, 4, metric=asked), expected)
