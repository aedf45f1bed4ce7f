"""Ragged multi-label targets against plain Python lists, and multi-class targets viewed as ragged."""

import pytest
import torch

from megaclass.targets import RaggedLabels, as_ragged

CASES = [[[3, 1], [], [0]], [[]], [[5]], [[], [], [2, 2, 7]]]


@pytest.mark.parametrize("lists", CASES)
def test_round_trip_lengths_and_sample_ids_match_the_lists(lists):
    labels = RaggedLabels.from_lists(lists)
    assert labels.to_lists() == lists
    assert labels.batch_size == len(lists)
    assert labels.indptr.dtype == labels.indices.dtype == torch.int64
    assert labels.lengths().tolist() == [len(row) for row in lists]
    assert labels.sample_ids().tolist() == [b for b, row in enumerate(lists) for _ in row]


def test_empty_batch():
    labels = RaggedLabels.from_lists([])
    assert labels.batch_size == 0 and labels.to_lists() == [] and labels.sample_ids().numel() == 0


def test_to_moves_both_tensors():
    labels = RaggedLabels.from_lists([[1], [0, 2]]).to("meta")
    assert labels.device == torch.device("meta") and labels.indptr.device == torch.device("meta")


def test_malformed_shapes_are_refused():
    with pytest.raises(AssertionError, match="indptr"):
        RaggedLabels(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(AssertionError, match="indices"):
        RaggedLabels(torch.zeros(2, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64))


def test_as_ragged_views_class_ids_as_one_label_each():
    ids = torch.tensor([4, 0, 4], dtype=torch.int32)
    ragged = as_ragged(ids)
    assert ragged.to_lists() == [[4], [0], [4]] and ragged.indices.dtype == torch.int64
    labels = RaggedLabels.from_lists([[1, 2]])
    assert as_ragged(labels) is labels
