"""The active-class selection rule: positives, pooled neighbours, random fill (checked against a Python
reference of the rule), with no host sync and a fixed output size."""

import math

import pytest
import torch

from megaclass.index.selection import coprime_multipliers, select_active


def reference_fixed(labels: list[int], neighbours: list[list[int]] | None, total: int) -> list[int]:
    """Sorted unique labels, then neighbours rank by rank (lower sample first), unique, cut to ``total``."""
    fixed = sorted(set(labels))
    if neighbours:
        for rank in range(len(neighbours[0])):
            for row in neighbours:
                value = row[rank]
                if value >= 0 and value not in fixed and len(fixed) < total:
                    fixed.append(value)
    return fixed


@pytest.mark.parametrize("num_classes", [7, 100, 5000, 100_003])
@pytest.mark.parametrize("sample_num", [1, 5, 64])
@pytest.mark.parametrize("with_neighbours", [True, False])
@pytest.mark.parametrize("batch", [1, 6])
def test_select_active_rule(num_classes, sample_num, with_neighbours, batch):
    labels = torch.randint(num_classes, (batch,))
    neighbours = None
    if with_neighbours:
        neighbours = torch.randint(-1, num_classes, (batch, sample_num // batch + 1))
    generator = torch.Generator().manual_seed(1)
    mark = torch.full((num_classes,), torch.iinfo(torch.int32).max, dtype=torch.int32)
    selection = select_active(
        labels, neighbours, sample_num=sample_num, num_classes=num_classes, generator=generator, mark=mark
    )
    ids = selection.ids
    total = min(max(sample_num, labels.numel()), num_classes)
    assert ids.numel() == total  # exactly sample_num (or all labels / all classes)
    assert torch.unique(ids).numel() == ids.numel()  # no duplicates
    assert int(ids.min()) >= 0 and int(ids.max()) < num_classes
    assert torch.all(mark == torch.iinfo(torch.int32).max)  # scratch left clean
    fixed = reference_fixed(labels.tolist(), None if neighbours is None else neighbours.tolist(), total)
    positives = len(set(labels.tolist()))
    assert int(selection.num_positive) == positives
    assert int(selection.num_neighbour) == len(fixed) - positives
    assert ids[: len(fixed)].tolist() == fixed  # true classes first (sorted), then neighbours in rank order
    assert torch.equal(ids[selection.label_columns], labels)  # every label entry finds its column
    # the correction: 0 for sure classes, log((C - fixed) / random) for random ones
    assert torch.all(selection.logit_adjust[: len(fixed)] == 0)
    drawn = total - len(fixed)
    if drawn:
        value = math.log((num_classes - len(fixed)) / drawn)
        torch.testing.assert_close(selection.logit_adjust[len(fixed) :], torch.full((drawn,), value))


def test_select_active_docs_example():
    s = select_active(torch.tensor([3]), torch.tensor([[3, 5], [7, 5]]), sample_num=4, num_classes=10)
    assert s.ids[:3].tolist() == [3, 7, 5] and int(s.num_neighbour) == 2 and int(s.num_random) == 1


def test_multilabel_repeats_and_empty_labels():
    labels = torch.tensor([9, 2, 9, 2, 2])
    s = select_active(labels, None, sample_num=3, num_classes=50)
    assert s.ids.numel() == 5 and s.ids[:2].tolist() == [2, 9]
    assert s.label_columns.tolist() == [1, 0, 1, 0, 0]
    empty = select_active(torch.empty(0, dtype=torch.int64), None, sample_num=4, num_classes=50)
    assert empty.ids.numel() == 4 and int(empty.num_positive) == 0 and empty.label_columns.numel() == 0


@pytest.mark.parametrize("num_classes", [30, 1000])  # the dense (permutation) and sparse (draws) regimes
def test_random_fill_is_uniform(num_classes):
    rng = torch.Generator().manual_seed(0)
    counts = torch.zeros(num_classes)
    rounds = 3000
    for _ in range(rounds):
        s = select_active(torch.tensor([0, 1]), None, sample_num=5, num_classes=num_classes, generator=rng)
        counts[s.ids] += 1
    others = counts[2:] / rounds  # each other class: included with probability 3 / (C - 2)
    expected = 3 / (num_classes - 2)
    sigma = math.sqrt(expected * (1 - expected) / rounds)
    assert float((others - expected).abs().max()) < 5 * sigma
    assert counts[:2].eq(rounds).all()


@pytest.mark.parametrize("num_classes", [1000, 99_991])
def test_random_candidates_end_with_distinct_backstop(num_classes):
    from megaclass.index.selection import _random_candidates

    out = _random_candidates(40, num_classes, coprime_multipliers(num_classes), None, torch.device("cpu"))
    assert out.numel() == 2 * 40 + 64 + 40  # the draws, then the progression
    assert torch.unique(out[-40:]).numel() == 40


@pytest.mark.parametrize("num_classes", [1, 2, 12, 97, 1000])
def test_coprime_multipliers_give_permutations(num_classes):
    for step in coprime_multipliers(num_classes, 8).tolist():
        assert sorted((step * j + 3) % num_classes for j in range(num_classes)) == list(range(num_classes))
