"""Batches, sparse inputs and label rows to targets, against hand-written expectations."""

import numpy as np
import pytest
import torch

from megaclass.data.batch import Batch, SparseInputs, batch_targets, count_labels
from megaclass.data.xmc import CSR
from megaclass.targets import RaggedLabels

# label sets of 4 rows over C = 5: {0, 2}, {3}, {}, {1, 2, 3}
_LABELS = CSR(
    np.array([0, 2, 3, 3, 6], dtype=np.int64), np.array([0, 2, 3, 1, 2, 3], dtype=np.int32), None, 5
)


def test_sparse_inputs_from_lists_is_csr():
    inputs = SparseInputs.from_lists([[4, 1], [], [2]], [[0.5, 0.25], [], [1.0]])
    assert inputs.batch_size == 3
    assert inputs.indptr.tolist() == [0, 2, 2, 3]
    assert inputs.indices.tolist() == [4, 1, 2]
    assert inputs.weights.tolist() == [0.5, 0.25, 1.0]
    assert (inputs.indices.dtype, inputs.indptr.dtype, inputs.weights.dtype) == (
        torch.int64,
        torch.int64,
        torch.float32,
    )


@pytest.mark.parametrize("rows", [[3, 0], [2], [1, 2, 1]])
def test_multilabel_targets_are_the_label_sets_of_the_rows(rows):
    targets = batch_targets(_LABELS, np.array(rows), multilabel=True)
    assert isinstance(targets, RaggedLabels)
    sets = [[0, 2], [3], [], [1, 2, 3]]
    got = [targets.indices[targets.indptr[b] : targets.indptr[b + 1]].tolist() for b in range(len(rows))]
    assert got == [sets[row] for row in rows]
    assert targets.indices.dtype == torch.int64


def test_one_label_targets_are_class_ids():
    labels = CSR(np.arange(4, dtype=np.int64), np.array([4, 0, 2], dtype=np.int32), None, 5)
    targets = batch_targets(labels, np.array([2, 0, 0]), multilabel=False)
    assert targets.dtype == torch.int64
    assert targets.tolist() == [2, 4, 4]


def test_count_labels_counts_rows_per_class_including_unused_classes():
    counts = count_labels(_LABELS, 7)
    assert counts.dtype == np.int64
    assert counts.tolist() == [1, 1, 2, 2, 0, 0, 0]


def test_batch_to_moves_inputs_and_targets():
    inputs = SparseInputs.from_lists([[1]], [[2.0]])
    targets = RaggedLabels(torch.tensor([0, 1]), torch.tensor([3]))
    moved = Batch(inputs, targets).to("meta")
    assert moved.inputs.indices.device.type == "meta"
    assert moved.targets.indices.device.type == "meta"
    assert inputs.indices.device.type == "cpu"
