"""Approximate top-k search through an index (exact scores of its candidates) and its recall@k."""

import pytest
import torch

from megaclass.index import build_selector, recall_at_k
from megaclass.index.exact import exact_topk

from ._clustered import recall, trained_like


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("kind", ["exact", "gpu"])
def test_search_scores_candidates_exactly(metric, kind):
    rows, queries = trained_like(3000, 32, 60, 100)
    options = {"probes": 10**6, "row_dtype": "bfloat16"} if kind == "gpu" else {}
    index = build_selector(kind, metric=metric, **options)
    index.build(rows)
    scores, ids = index.search(queries, 7, weight=rows, candidates=20)
    truth_scores, truth_ids = exact_topk(queries, rows, 7, metric=metric)
    # every row is a candidate: exact float32 scores from the live rows, though the snapshot is bfloat16
    assert torch.equal(ids, truth_ids)
    torch.testing.assert_close(scores, truth_scores, rtol=1e-5, atol=1e-5)


def test_search_of_an_approximate_index_and_its_recall():
    rows, queries = trained_like(5000, 32, 100, 300)
    index = build_selector("gpu", metric="dot", leaf_size=50, probes=1, scan_when_cheaper=False)
    index.build(rows)
    scores, ids = index.search(queries, 10, weight=rows)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # ranked
    expected = (queries[:, None, :] * rows[ids]).sum(2)  # (B, 10) the rows' own logits
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    truth = exact_topk(queries, rows, 10, metric="dot")[1]
    measured = recall_at_k(index, queries, 10, weight=rows, sample=10**4)
    assert measured == pytest.approx(recall(ids, truth))
    assert 0.3 < measured < 1.0  # one probe misses some
    more = build_selector("gpu", metric="dot", leaf_size=50, probes=8, scan_when_cheaper=False)
    more.build(rows)
    assert recall_at_k(more, queries, 10, weight=rows, sample=10**4) > measured
    sampled = recall_at_k(index, queries, 10, weight=rows, sample=64, seed=3)
    picks = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:64]
    assert sampled == pytest.approx(recall(ids[picks], truth[picks]))


def test_search_pads_when_the_index_finds_fewer():
    rows = torch.randn(5, 8)
    index = build_selector("gpu", leaf_size=2, probes=100)
    index.build(rows)
    scores, ids = index.search(torch.randn(3, 8), 7, weight=rows)
    assert (ids[:, 5:] == -1).all() and torch.isinf(scores[:, 5:]).all()
    assert sorted(ids[0, :5].tolist()) == list(range(5))
    with pytest.raises(ValueError, match="candidates"):
        index.search(torch.randn(3, 8), 4, weight=rows, candidates=2)
    with pytest.raises(ValueError, match="queries"):
        index.search(torch.randn(3, 4), 2, weight=rows)
    with pytest.raises(ValueError, match="sample"):
        recall_at_k(index, torch.randn(3, 8), 2, weight=rows, sample=0)
