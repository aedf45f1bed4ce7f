"""Ragged multi-label targets against plain Python lists, and multi-class targets viewed as ragged."""

import pytest
import torch

from megaclass.targets import PAD_LABEL, RaggedLabels, as_ragged

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


# ------------------------------------------------------------------------------ the padded, static form


@pytest.mark.parametrize("lists", [*CASES, [[1, 2], [3]], [[], [4], [], []]], ids=str)
@pytest.mark.parametrize("extra", [0, 1, 5])
def test_padded_form_reads_like_the_lists(lists, extra):
    labels = RaggedLabels.from_lists(lists)
    count = labels.indices.numel()
    padded = labels.pad_to(count + extra)
    assert padded.padded and not labels.padded and padded.indices.shape == (count + extra,)
    assert padded.indices[count:].tolist() == [PAD_LABEL] * extra
    assert padded.to_lists() == lists and padded.lengths().tolist() == labels.lengths().tolist()
    last = len(lists) - 1  # a pad belongs to the last sample, with or without labels of its own
    assert padded.sample_ids().tolist() == labels.sample_ids().tolist() + [last] * extra
    assert padded.label_ids().tolist() == labels.indices.tolist() + [0] * extra
    assert padded.valid().tolist() == [True] * count + [False] * extra
    unpadded = padded.unpadded()
    assert not unpadded.padded and torch.equal(unpadded.indices, labels.indices)
    assert labels.unpadded() is labels and torch.equal(labels.label_ids(), labels.indices)


def test_mask_pads_sets_and_stops_the_gradient_at_pads():
    padded = RaggedLabels.from_lists([[3], [1, 2]]).pad_to(5)
    values = torch.arange(1.0, 11.0).reshape(5, 2).requires_grad_(True)  # (L_cap, 2)
    masked = padded.mask_pads(values, fill=-7.0)
    assert masked.tolist() == [[1, 2], [3, 4], [5, 6], [-7, -7], [-7, -7]]
    masked.sum().backward()
    assert values.grad.tolist() == [[1, 1]] * 3 + [[0, 0]] * 2
    assert padded.mask_pads(torch.arange(5), fill=9).tolist() == [0, 1, 2, 9, 9]
    plain = torch.arange(3)
    assert RaggedLabels.from_lists([[3], [1, 2]]).mask_pads(plain) is plain


def test_padded_form_reads_its_count_from_indptr_not_from_pad_values():
    """Whatever the entries past ``indptr[-1]`` hold (a static buffer's stale labels), they are pads."""
    stale = RaggedLabels(torch.tensor([0, 1, 1]), torch.tensor([4, 8, 9]), padded=True)
    assert stale.to_lists() == [[4], []] and stale.label_ids().tolist() == [4, 0, 0]
    assert stale.sample_ids().tolist() == [0, 1, 1] and stale.unpadded().indices.tolist() == [4]


def test_pad_to_refuses_overflow_and_padding_twice():
    labels = RaggedLabels.from_lists([[1, 2], [3]])
    with pytest.raises(ValueError, match="3 labels do not fit in a capacity of 2"):
        labels.pad_to(2)
    with pytest.raises(ValueError, match="padded already"):
        labels.pad_to(4).pad_to(4)
    assert labels.pad_to(4).to("meta").padded
