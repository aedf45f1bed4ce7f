"""The Annoy forest: built in the background, swapped in, restored from its state."""

import pytest
import torch

from megaclass.index import build_selector
from megaclass.index.exact import exact_topk

from ._clustered import recall, trained_like


def test_annoy_background_build_swaps_in():
    pytest.importorskip("annoy")
    rows, queries = trained_like(400, 16, 20, 8)
    selector = build_selector("annoy", ntrees=10, seed=3)
    selector.build(rows)  # the first build waits
    assert selector.is_built and selector.swaps == 1
    truth = exact_topk(queries, rows, 10, metric="cosine")[1]
    assert recall(selector.query(queries, 10), truth) >= 0.8
    new_rows = -rows  # every neighbour changes
    selector.build(new_rows)  # runs in a thread; the old forest serves meanwhile
    old_or_new = selector.query(queries, 10)
    assert old_or_new.shape == (8, 10)
    selector.wait()
    assert selector.swaps == 2
    truth = exact_topk(queries, new_rows, 10, metric="cosine")[1]
    assert recall(selector.query(queries, 10), truth) >= 0.8
    state = selector.state_dict()
    restored = build_selector("annoy", ntrees=10)
    restored.load_state_dict(state)
    assert torch.equal(restored.query(queries, 10), selector.query(queries, 10))


def test_annoy_ranks_by_angle_only():
    from megaclass.index.annoy_forest import AnnoySelector
    from megaclass.index.base import Metric

    assert AnnoySelector.ranks_by == (Metric.COSINE,)
    selector = AnnoySelector(ntrees=2)
    with pytest.raises(ValueError, match="ranks by angle only"):
        selector.query(torch.randn(2, 4), 3, metric="dot")  # refused before the forest is needed
