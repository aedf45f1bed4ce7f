"""Background cold builds of the cluster index: answers while building, a swap equal to a synchronous build,
rows updated meanwhile refreshed after it, whole-index-or-none checkpoints, errors, and the head on top."""

import threading

import pytest
import torch

from megaclass.heads import HeadContext, build_head, head_config
from megaclass.index.kmeans import ClusterIndex

from ._clustered import trained_like


def _gated(index: ClusterIndex) -> threading.Event:
    """Hold ``index``'s cold builds until the returned event is set (or the build is cancelled)."""
    gate = threading.Event()
    cold = index._cold

    def held(state, cancel=None):
        while not gate.wait(0.01):
            if cancel is not None and cancel.is_set():
                break
        cold(state, cancel)

    index._cold = held
    return gate


def _assert_same_index(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_background_build_answers_meanwhile_and_swaps_in_a_synchronous_build():
    rows, queries = trained_like(3000, 16, 60, 32)
    live = rows.clone()  # the trainer's rows, updated in place while the index is built
    index = ClusterIndex(leaf_size=16, background=True)
    gate = _gated(index)
    index.build(live)
    assert index.is_built and not index.is_ready
    assert index.metrics()["index_building"] == 1.0
    assert (index.query(queries, 7) == -1).all()  # no index yet: the step takes positives and random classes
    assert index.state_dict() == {}  # a checkpoint now holds no index, never half of one
    first = torch.tensor([5, 17, 2999])
    live[first] = torch.randn(3, 16)
    index.build(live, changed=first)  # during the build: noted, not applied
    assert not index.is_ready
    gate.set()
    index.wait()
    assert index.is_ready and index.metrics()["index_building"] == 0.0

    reference = ClusterIndex(leaf_size=16, background=False)
    reference.build(rows)  # the rows as they were at the first build call
    served, expected = index.state_dict(), reference.state_dict()
    assert torch.equal(served.pop("stale"), first) and expected.pop("stale").numel() == 0
    _assert_same_index(served, expected)
    assert torch.equal(index.query(queries, 7), reference.query(queries, 7))

    second = torch.tensor([40, 17])
    live[second] = torch.randn(2, 16)
    index.build(live, changed=second)  # warm: the noted rows and these
    reference.build(live, changed=torch.tensor([5, 17, 40, 2999]))
    _assert_same_index(index.state_dict(), reference.state_dict())
    assert index.state_dict()["stale"].numel() == 0


def test_stale_rows_survive_a_checkpoint_and_load_cancels_a_running_build():
    rows, queries = trained_like(2000, 16, 40, 16)
    index = ClusterIndex(leaf_size=16, background=True)
    gate = _gated(index)
    index.build(rows)
    index.build(rows, changed=torch.tensor([3, 9]))
    gate.set()
    index.wait()
    saved = {key: value.clone() for key, value in index.state_dict().items()}  # warm builds write in place
    assert saved["stale"].tolist() == [3, 9]

    resumed = ClusterIndex(leaf_size=16, background=True)
    held = _gated(resumed)
    resumed.build(rows * 2)  # a build of other rows under way: loading the checkpoint cancels it
    resumed.load_state_dict(saved)
    assert not held.is_set() and resumed.is_ready
    _assert_same_index(resumed.state_dict(), saved)
    moved = rows.clone()
    moved[[3, 9, 11]] = torch.randn(3, 16)
    for selector in (index, resumed):
        selector.build(moved, changed=torch.tensor([11]))
    _assert_same_index(resumed.state_dict(), index.state_dict())
    assert torch.equal(resumed.query(queries, 5), index.query(queries, 5))
    assert resumed.state_dict()["rows"][3].ne(saved["rows"][3]).any()  # the stale row was refreshed


def test_background_error_reaches_the_caller():
    index = ClusterIndex(leaf_size=8, background=True)

    def broken(state, cancel=None):
        raise FloatingPointError("boom")

    index._cold = broken
    index.build(torch.randn(100, 8))
    with pytest.raises(RuntimeError, match="background ClusterIndex build failed"):
        index.wait()
    assert not index.is_built  # nothing half-built is served; the next build starts again
    index._cold = ClusterIndex._cold.__get__(index)
    index.build(torch.randn(100, 8))
    index.wait()
    assert index.is_ready


def test_background_is_automatic_on_the_cpu_from_2_to_the_15_rows():
    index = ClusterIndex()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert index._in_background(1 << 15, cpu) and not index._in_background((1 << 15) - 1, cpu)
    assert not index._in_background(10**7, cuda)  # a GPU cold build takes seconds: synchronous
    assert ClusterIndex(background=True)._in_background(10, cpu)
    assert not ClusterIndex(background=False)._in_background(10**7, cpu)


def test_selected_head_trains_on_random_classes_until_the_first_index_is_in():
    config = head_config(
        {
            "type": "selected",
            "sample_num": 12,
            "coverage_every": 0,
            "interval": 2,
            "index": {"type": "gpu", "leaf_size": 8, "background": True},
        }
    )
    context = HeadContext(in_features=8, num_classes=300, multilabel=False)
    head = build_head(config, context)
    head.materialize()
    gate = _gated(head.selector)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 4):  # the build runs across steps and scheduled rebuilds
        features, targets = (
            torch.randn(4, 8, generator=generator),
            torch.randint(300, (4,), generator=generator),
        )
        loss = head(features, targets)
        assert torch.isfinite(loss)
        assert int(head._counts["neighbour_classes"]) == 0  # positives and random classes only
        assert set(targets.tolist()) <= set(head._pending[0].tolist())
        loss.backward()
        head.after_step(step, 0.0, lr=0.1)
    state = {key: value.clone() for key, value in head.state_dict().items()}
    assert "index.built" in state and not any(key.startswith("index.rows") for key in state)
    gate.set()
    head.selector.wait()
    head(torch.randn(4, 8, generator=generator), torch.randint(300, (4,), generator=generator))
    assert int(head._counts["neighbour_classes"]) > 0

    resumed = build_head(config, context)  # the checkpoint held no index: loading starts a build again
    resumed.load_state_dict(state)
    assert resumed.selector.is_built
    resumed.selector.wait()
    assert resumed.selector.is_ready
