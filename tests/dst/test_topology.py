"""Fixed fan-in topology: initialisation, prune/regrow keeping fan-in exactly K."""

import pytest
import torch

from megaclass.dst import (
    connection_magnitude,
    expand_to_labels,
    prune_regrow,
    random_fanin_index,
    rewiring_scratch_bytes,
    sample_new_columns,
    topology,
)


def _has_duplicates(index: torch.Tensor) -> bool:
    ordered = index.long().sort(dim=1).values
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())


@pytest.mark.parametrize(
    ("rows", "dim", "fan_in"), [(1, 5, 5), (7, 33, 1), (300, 40, 32), (50, 3000, 256), (64, 64, 16)]
)
def test_random_index_is_distinct_and_in_range(rows, dim, fan_in):
    generator = torch.Generator().manual_seed(1)
    index = random_fanin_index(rows, dim, fan_in, generator=generator)
    assert index.shape == (rows, fan_in) and index.dtype == torch.int32
    assert int(index.min()) >= 0 and int(index.max()) < dim
    assert not _has_duplicates(index)
    again = random_fanin_index(rows, dim, fan_in, generator=torch.Generator().manual_seed(1))
    assert torch.equal(index, again)


def test_fan_in_above_dim_draws_with_repeats():
    index = random_fanin_index(4, 3, 5, generator=torch.Generator().manual_seed(0))
    assert index.shape == (4, 5) and int(index.max()) < 3


@pytest.mark.parametrize("excluded_width", [0, 3, 40])
def test_sample_new_columns_avoids_excluded(excluded_width):
    generator = torch.Generator().manual_seed(0)
    dim = 50
    excluded = torch.stack([torch.randperm(dim, generator=generator)[:excluded_width] for _ in range(200)])
    excluded[:, :1] = -1 if excluded_width else excluded[:, :1]  # -1: no column
    new = sample_new_columns(excluded, dim, dim - excluded_width, generator)  # all the room there is
    assert not _has_duplicates(new)
    assert not (new[:, :, None] == excluded[:, None, :]).any()


@pytest.mark.parametrize("chunk", [None, 4])  # 4: index rows in several chunks, the last one partial
@pytest.mark.parametrize("group", [1, 3, 16])
@pytest.mark.parametrize("dim", [20, 22, 500])  # 20 - 16 < 6: just-pruned columns may come back
def test_prune_regrow_keeps_fan_in_and_prunes_weakest(group, dim, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(topology, "_ROW_CHUNK", chunk)
    generator = torch.Generator().manual_seed(0)
    classes, fan_in, count = 50, 16, 6
    groups = -(-classes // group)
    index = random_fanin_index(groups, dim, fan_in, generator=generator)
    weight = torch.randn(classes, fan_in)
    before_index, before_weight = index.clone(), weight.clone()
    magnitude = connection_magnitude(before_weight, group)
    rewired = prune_regrow(
        weight, index, dim=dim, group=group, count=count, threshold=None, generator=generator
    )
    assert index.shape == (groups, fan_in) and rewired.shape == (groups, fan_in)
    assert torch.equal(rewired.sum(1), torch.full((groups,), count))
    assert not _has_duplicates(index) and int(index.max()) < dim
    # the rewired connections are the weakest of their row
    weakest = magnitude.argsort(dim=1, stable=True)[:, :count]
    assert torch.equal(rewired, torch.zeros_like(rewired).scatter(1, weakest, True))
    labels = torch.arange(classes) // group
    label_mask = rewired[labels]
    assert torch.all(weight[label_mask] == 0)
    assert torch.equal(weight[~label_mask], before_weight[~label_mask])
    assert torch.equal(index[~rewired], before_index[~rewired])
    if dim - fan_in >= count:  # room to avoid the pruned columns: every new column is new to its row
        changed = index.long()[rewired].view(groups, count)
        assert not (changed[:, :, None] == before_index.long()[:, None, :]).any()


def test_threshold_prunes_only_small_weights():
    generator = torch.Generator().manual_seed(0)
    index = random_fanin_index(10, 100, 8, generator=generator)
    weight = torch.ones(10, 8)
    weight[:, 0] = 1e-4
    weight[0, 1] = 1e-5
    rewired = prune_regrow(weight, index, dim=100, group=1, count=3, threshold=1e-3, generator=generator)
    expected = torch.zeros(10, 8, dtype=torch.bool)
    expected[:, 0] = True
    expected[0, 1] = True
    assert torch.equal(rewired, expected)


def test_magnitude_is_l2_over_group():
    weight = torch.tensor([[3.0, 0.0], [4.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(connection_magnitude(weight, 2), torch.tensor([[5.0, 1.0], [1.0, 1.0]]))


def test_labels_mask_is_the_rows_mask_itself_without_groups():
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    assert expand_to_labels(mask, 1, 3).data_ptr() == mask.data_ptr()  # no copy of a (C, K) mask
    grouped = expand_to_labels(mask, 2, 5)
    assert torch.equal(grouped, mask[torch.tensor([0, 0, 1, 1, 2])])


def test_rewiring_scratch_counts_its_masks_and_one_chunk_of_rows(monkeypatch):
    """The masks a rewiring keeps whole (a byte a connection; a label's too with groups) and one chunk of
    index rows of scratch, whatever the row count past a chunk."""
    assert rewiring_scratch_bytes(1000, 32, 1, 0) == 0  # no rewiring
    monkeypatch.setattr(topology, "_ROW_CHUNK", 100)
    one_chunk = rewiring_scratch_bytes(100, 32, 1, 10) - 100 * 32
    assert rewiring_scratch_bytes(10_000, 32, 1, 10) == one_chunk + 10_000 * 32
    grouped = rewiring_scratch_bytes(1600, 32, 16, 10)  # 100 index rows of 16 labels
    assert grouped == 100 * 32 * (32 + 3 * 16 // 2) + 100 * 32 + 1600 * 32
    assert rewiring_scratch_bytes(100, 32, 1, 10) > rewiring_scratch_bytes(100, 32, 1, 3)
