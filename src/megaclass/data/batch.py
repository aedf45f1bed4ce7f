"""What every dataset hands the trainer: a :class:`Batch` of encoder inputs and targets, and the
:class:`InputSpec` that tells the encoder what its inputs are.

:func:`batch_targets` and :func:`count_labels` turn a dataset's label rows (a
:class:`~megaclass.data.xmc.CSR` of label ids per row) into targets and per-class counts, the same way for
every kind of input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from megaclass.targets import RaggedLabels, Targets

__all__ = ["Batch", "InputSpec", "SparseInputs", "batch_targets", "count_labels"]


@dataclass(frozen=True)
class InputSpec:
    """What an encoder receives: ``sparse`` rows over ``num_features`` columns, ``tokens`` or ``image``."""

    kind: Literal["sparse", "tokens", "image"]
    num_features: int = 0  # F: columns of sparse rows, or vocabulary size of token ids

    def describe(self) -> str:
        """In words, for messages.

        >>> InputSpec("sparse", 7472).describe(), InputSpec("image").describe()
        ('sparse rows of 7,472 features', 'images')
        """
        if self.kind == "sparse":
            return f"sparse rows of {self.num_features:,} features"
        if self.kind == "tokens":
            return f"token ids of {self.num_features:,} tokens" if self.num_features else "token ids"
        return "images"

    def mismatch(self, expected: InputSpec) -> str:
        """What differs from ``expected``, the training data's inputs, in words."""
        sparse = self.kind == expected.kind == "sparse"
        hint = " (a BoW file's feature ids must be the training file's)" if sparse else ""
        return f"{self.describe()}, where the training data has {expected.describe()}{hint}"


@dataclass(frozen=True)
class SparseInputs:
    """``B`` sparse rows in CSR form: row ``b`` is ``weights[indptr[b]:indptr[b+1]]`` at ``indices[...]``.

    Args:
        indices: ``(N,)`` int64 column ids.
        indptr: ``(B + 1,)`` int64 offsets.
        weights: ``(N,)`` float32 values.
    """

    indices: Tensor
    indptr: Tensor
    weights: Tensor

    @classmethod
    def from_lists(cls, indices: Sequence[Sequence[int]], weights: Sequence[Sequence[float]]) -> SparseInputs:
        """Build from one list of column ids and one of values per row."""
        lengths = torch.tensor([len(row) for row in indices], dtype=torch.int64)
        indptr = torch.zeros(len(indices) + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(lengths, 0)
        flat_indices = torch.tensor([int(i) for row in indices for i in row], dtype=torch.int64)
        flat_weights = torch.tensor([float(v) for row in weights for v in row], dtype=torch.float32)
        return cls(flat_indices, indptr, flat_weights)

    @property
    def batch_size(self) -> int:
        return self.indptr.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseInputs:
        return SparseInputs(
            self.indices.to(device, non_blocking=non_blocking),
            self.indptr.to(device, non_blocking=non_blocking),
            self.weights.to(device, non_blocking=non_blocking),
        )


@dataclass(frozen=True)
class Batch:
    """Encoder inputs and the targets of the same ``B`` samples."""

    inputs: Any
    targets: Targets

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.inputs.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
        )


def batch_targets(labels: Any, rows: np.ndarray, *, multilabel: bool) -> Targets:
    """The targets of rows ``rows (B,)`` of ``labels`` (a CSR of label ids per row), on the CPU.

    ``LongTensor[B]`` (one label per row) or :class:`~megaclass.targets.RaggedLabels` when ``multilabel``.
    """
    taken = labels.take(np.asarray(rows, dtype=np.int64))
    label_ids = torch.from_numpy(taken.indices.astype(np.int64))
    return RaggedLabels(torch.from_numpy(taken.indptr), label_ids) if multilabel else label_ids


def count_labels(labels: Any, num_classes: int) -> np.ndarray:
    """``(C,)`` int64 number of rows of ``labels`` (a CSR of label ids per row) carrying each label."""
    return np.bincount(labels.indices, minlength=num_classes).astype(np.int64, copy=False)
