"""The active-class selection rule: positives, pooled neighbours, random fill."""

import math

import pytest
import torch

from megaclass.index.selection import fill_random, pool_neighbours, select_active


@pytest.mark.parametrize("num_classes", [7, 100, 5000])
@pytest.mark.parametrize("sample_num", [1, 5, 64])
@pytest.mark.parametrize("with_neighbours", [True, False])
def test_select_active_rule(num_classes, sample_num, with_neighbours):
    batch = 6
    positives = torch.unique(torch.randint(num_classes, (batch,)))
    neighbours = None
    if with_neighbours:
        neighbours = torch.randint(-1, num_classes, (batch, sample_num // batch + 1))
    generator = torch.Generator().manual_seed(1)
    selection = select_active(
        positives, neighbours, sample_num=sample_num, num_classes=num_classes, generator=generator
    )
    ids = selection.ids
    expected = min(max(sample_num, positives.numel()), num_classes)
    assert ids.numel() == expected  # exactly sample_num (or all positives / all classes)
    assert torch.unique(ids).numel() == ids.numel()  # no duplicates
    assert int(ids.min()) >= 0 and int(ids.max()) < num_classes
    assert torch.equal(ids[: positives.numel()], positives)  # true classes first
    assert selection.num_positive == positives.numel()
    near = ids[positives.numel() : positives.numel() + selection.num_neighbour]
    if neighbours is not None:
        assert set(near.tolist()) <= set(neighbours[neighbours >= 0].tolist())
    else:
        assert selection.num_neighbour == 0
    # the correction: 0 for sure classes, log((C - fixed) / random) for random ones
    fixed = selection.num_positive + selection.num_neighbour
    assert torch.all(selection.logit_adjust[:fixed] == 0)
    if selection.num_random:
        value = math.log((num_classes - fixed) / selection.num_random)
        torch.testing.assert_close(selection.logit_adjust[fixed:], torch.full((selection.num_random,), value))


def test_pool_neighbours_rank_order_and_exclusion():
    neighbours = torch.tensor([[4, 9, 2], [4, 8, -1], [6, 2, 3]])
    # rank 0: 4, 4, 6; rank 1: 9, 8, 2; rank 2: 2, 3
    assert pool_neighbours(neighbours, torch.tensor([6]), 10, 10).tolist() == [4, 9, 8, 2, 3]
    assert pool_neighbours(neighbours, torch.tensor([6]), 2, 10).tolist() == [4, 9]
    assert pool_neighbours(neighbours, torch.tensor([6]), 0, 10).numel() == 0


@pytest.mark.parametrize("num_classes,active,count", [(10, 3, 7), (1000, 10, 20), (1000, 10, 900)])
def test_fill_random_distinct_and_outside_active(num_classes, active, count):
    taken = torch.randperm(num_classes)[:active]
    drawn = fill_random(taken, count, num_classes, generator=torch.Generator().manual_seed(0))
    assert drawn.numel() == count and torch.unique(drawn).numel() == count
    assert not set(drawn.tolist()) & set(taken.tolist())


def test_fill_random_is_uniform():
    counts = torch.zeros(50)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[fill_random(torch.tensor([0, 1]), 3, 50, generator=generator)] += 1
    assert counts[:2].sum() == 0
    expected = 2000 * 3 / 48
    chi2 = float(((counts[2:] - expected) ** 2 / expected).sum())
    assert chi2 < 90  # 47 degrees of freedom: p ~ 1e-4 threshold


def test_fill_random_too_many():
    with pytest.raises(ValueError, match="only 2 left"):
        fill_random(torch.tensor([0, 1, 2]), 3, 5)
