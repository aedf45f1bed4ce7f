"""A single-process head state loads into the head of any rank of any world size exactly as the sharded
checkpoint of the same state does (no process group: loading needs none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import exported_head
from megaclass.distributed.checkpoint import load_sharded, load_whole_head, save_sharded
from megaclass.heads.base import ClassShard, HeadContext
from megaclass.targets import RaggedLabels

D, C = 6, 23  # features, classes (odd on purpose)


def _head(kind: str, shard: ClassShard | None) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """A head of ``kind`` over ``shard`` (None: unsharded) and the AdamW of its parameters."""
    from megaclass.heads.dense import DenseHead, DenseHeadConfig
    from megaclass.heads.selected import SelectedHead, SelectedHeadConfig
    from megaclass.heads.sparse import SparseHead, SparseHeadConfig
    from megaclass.index.config import ExactIndexConfig

    features = np.random.default_rng(0).standard_normal((C, 5)).astype(np.float32)
    context = HeadContext(D, C, True, label_counts=np.arange(C)[::-1].copy(), label_features=features)
    if kind == "dense":
        head = DenseHead(DenseHeadConfig(seed=5), context, shard)
    elif kind == "selected":
        config = SelectedHeadConfig(sample_num=7, index=ExactIndexConfig(), interval=1, coverage_every=0)
        head = SelectedHead(config, context, shard)
    else:
        config = SparseHeadConfig(fan_in=3, group=2, intermediate=4, dense_frequent=4, aux_clusters=3)
        head = SparseHead(config, context, shard)
    params = [p for p in head.parameters() if p.requires_grad]
    return head, torch.optim.AdamW(params, lr=0.05) if params else None


def _trained_whole_head(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """An unsharded head after two steps: rows, optimizer moments and index all moved from their start."""
    head, optimizer = _head(kind, None)
    generator = torch.Generator().manual_seed(2)
    for step in (1, 2):
        targets = RaggedLabels.from_lists([[1, 5], [22], [], [3, 9, 17]])
        loss = head(torch.randn(4, D, generator=generator), targets)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        head.after_step(step, 0.5 * step, lr=0.05)
    return head, optimizer


def _assert_same_state(a: dict, b: dict, where: str) -> None:
    assert set(a) == set(b), where
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_state(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}.{key}"
        else:
            assert a[key] == b[key], f"{where}.{key}"


@pytest.mark.parametrize("kind", ["dense", "selected", "sparse"])
@pytest.mark.parametrize(("rank", "world"), [(0, 1), (0, 2), (1, 2), (2, 3)])
def test_single_process_state_loads_on_any_rank_as_the_sharded_checkpoint(
    tmp_path, kind, rank, world
) -> None:
    whole, whole_optimizer = _trained_whole_head(kind)
    folder = save_sharded(
        str(tmp_path), 2, head=whole, head_optimizer=whole_optimizer, common={}, private={}, rank=0,
        world_size=1,
    )  # fmt: skip
    shard = ClassShard.for_rank(C, rank, world)
    from_whole, whole_to_shard = _head(kind, shard)
    fresh = {key: value.clone() for key, value in from_whole.state_dict().items()}
    load_whole_head(
        from_whole,
        whole_to_shard,
        state=whole.state_dict(),
        optimizer_state=None if whole_optimizer is None else whole_optimizer.state_dict(),
    )
    from_sharded, sharded_optimizer = _head(kind, shard)
    load_sharded(folder, head=from_sharded, head_optimizer=sharded_optimizer, rank=rank, world_size=world)
    _assert_same_state(from_whole.state_dict(), from_sharded.state_dict(), "head")
    if whole_optimizer is not None:
        _assert_same_state(whole_to_shard.state_dict(), sharded_optimizer.state_dict(), "optimizer")
    start, stop, _ = from_whole.row_range()
    layout = from_whole.state_layout()
    loaded, saved = from_whole.state_dict(), whole.state_dict()
    for key, kind_of_entry in layout.items():
        if kind_of_entry == "rows":  # the rank's rows of the whole head
            assert torch.equal(loaded[key], saved[key][start:stop]), key
        elif kind_of_entry == "rank" and world > 1 and key in fresh:  # rebuilt as the head was built
            assert torch.equal(loaded[key], fresh[key]), key
    if kind == "dense":  # the AdamW moments of the rank's rows
        moments = whole_to_shard.state_dict()["state"][0]["exp_avg"]
        assert torch.equal(moments, whole_optimizer.state_dict()["state"][0]["exp_avg"][start:stop])
        assert moments.abs().sum() > 0


def test_a_head_state_of_other_rows_is_refused() -> None:
    whole, _ = _head("dense", None)
    state = {**whole.state_dict(), "weight": whole.weight.detach()[:-1]}
    sharded, _ = _head("dense", ClassShard.for_rank(C, 1, 2))
    with pytest.raises(ValueError, match=r"head entry weight has shape \(22, 6\), expected 23 rows"):
        load_whole_head(sharded, None, state=state, optimizer_state=None)


@pytest.mark.parametrize("kind", ["dense", "selected", "sparse"])
@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2), (2, 3)])
def test_kept_weights_load_on_any_rank_as_the_whole_heads_weights(tmp_path, kind, rank, world) -> None:
    """Kept weights (weights alone, no optimizer state) written in the sharded layout load into any rank's
    head as the whole head's weights do, and export as them."""
    from megaclass.distributed.checkpoint import export_head_state, save_sharded_weights
    from megaclass.state_io import SavedTensor, StackedRows

    whole, _ = _trained_whole_head(kind)
    weights = whole.weights_state_dict()
    folder = save_sharded_weights(
        str(tmp_path / "epoch-2"), head=whole, encoder={"w": torch.ones(2)}, rank=0, world_size=1
    )
    exported = exported_head(folder)
    assert set(exported) == set(weights) and all(torch.equal(exported[k], weights[k]) for k in weights)
    rows = "store.weight" if kind == "selected" else "weight"
    streamed = export_head_state(folder)[rows]  # left in the file until written out
    assert isinstance(streamed, StackedRows) and all(isinstance(p[0], SavedTensor) for p in streamed.parts)
    shard = ClassShard.for_rank(C, rank, world)
    from_whole, _ = _head(kind, shard)
    load_whole_head(from_whole, None, state=weights, optimizer_state=None, weights_only=True)
    from_sharded, _ = _head(kind, shard)
    common, _ = load_sharded(folder, head=from_sharded, head_optimizer=None, rank=rank, world_size=world)
    assert torch.equal(common["encoder"]["w"], torch.ones(2))
    _assert_same_state(from_whole.weights_state_dict(), from_sharded.weights_state_dict(), "head")
    start, stop, _ = from_whole.row_range()
    assert torch.equal(from_sharded.weights_state_dict()[rows], weights[rows][start:stop])


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2), (2, 3)])
def test_a_head_average_goes_with_the_rows_and_exports_in_their_place(tmp_path, kind, rank, world) -> None:
    from megaclass.distributed.checkpoint import shard_head_entries

    whole, optimizer = _trained_whole_head(kind)
    average = {name: param.detach() * 2 + 1 for name, param in whole.named_parameters()}
    folder = save_sharded(
        str(tmp_path), 2, head=whole, head_optimizer=optimizer, common={}, private={}, rank=0, world_size=1,
        head_average=average,
    )  # fmt: skip
    sharded, sharded_optimizer = _head(kind, ClassShard.for_rank(C, rank, world))
    common, _ = load_sharded(
        folder, head=sharded, head_optimizer=sharded_optimizer, rank=rank, world_size=world
    )
    expected = shard_head_entries(sharded, average)
    _assert_same_state(common["head_average"], expected, "average")
    start, stop, _ = sharded.row_range()
    assert torch.equal(expected["weight"], average["weight"][start:stop])
    assert torch.equal(sharded.weight, whole.weight[start:stop])  # the weights, not their average
    trained, averaged = exported_head(folder), exported_head(folder, averaged=True)
    for name, value in whole.state_dict().items():
        assert torch.equal(trained[name], value), name
        assert torch.equal(averaged[name], average.get(name, value)), name


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_a_row_store_loads_its_rows_from_the_files_a_block_at_a_time(
    tmp_path, monkeypatch, rank, world
) -> None:
    """The store of a selected head is handed its rows and their optimizer state as ranges of the
    checkpoint's files (never read whole into memory first), and ends with its range of the saved ones."""
    from megaclass.state_io import StackedRows

    whole, optimizer = _trained_whole_head("selected")
    folder = save_sharded(
        str(tmp_path), 2, head=whole, head_optimizer=optimizer, common={}, private={}, rank=0, world_size=1
    )
    sharded, sharded_optimizer = _head("selected", ClassShard.for_rank(C, rank, world))
    store = sharded.materialize()
    given = {}
    load = store.load_state_dict
    monkeypatch.setattr(store, "load_state_dict", lambda state: (given.update(state), load(state))[1])
    load_sharded(folder, head=sharded, head_optimizer=sharded_optimizer, rank=rank, world_size=world)
    assert set(given) == set(store.state_dict()) and "weight" in given
    assert all(isinstance(value, StackedRows) for value in given.values())
    start, stop, _ = sharded.row_range()
    for name, tensor in store.state_dict().items():
        assert torch.equal(tensor, whole.state_dict()[f"store.{name}"][start:stop]), name
