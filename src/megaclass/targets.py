"""Batch targets: one class per sample, or a ragged set of labels per sample.

Multi-class targets are a ``LongTensor[B]``. Multi-label targets are :class:`RaggedLabels` in CSR form,
never a dense ``B x C`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RaggedLabels:
    """The labels of ``B`` samples: those of sample ``b`` are ``indices[indptr[b]:indptr[b + 1]]``.

    Args:
        indptr: ``(B + 1,)`` int64 offsets, ``indptr[0] == 0``, non-decreasing.
        indices: ``(L,)`` int64 label ids, ``L == indptr[-1]``. A sample may have no labels.

    >>> y = RaggedLabels.from_lists([[3, 1], [], [0]])
    >>> y.batch_size, y.indices.tolist(), y.sample_ids().tolist()
    (3, [3, 1, 0], [0, 0, 2])
    """

    indptr: Tensor
    indices: Tensor

    def __post_init__(self) -> None:
        assert self.indptr.dim() == 1 and self.indptr.numel() >= 1, "indptr must be (B + 1,)"
        assert self.indices.dim() == 1, "indices must be (L,)"

    @classmethod
    def from_lists(
        cls, labels: Sequence[Sequence[int]], device: torch.device | str | None = None
    ) -> RaggedLabels:
        """Build from one list of label ids per sample."""
        lengths = torch.tensor([len(row) for row in labels], dtype=torch.int64)
        indptr = torch.zeros(len(labels) + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(lengths, 0)
        flat = [int(label) for row in labels for label in row]
        indices = torch.tensor(flat, dtype=torch.int64)
        return cls(indptr.to(device), indices.to(device))

    @property
    def batch_size(self) -> int:
        return self.indptr.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def lengths(self) -> Tensor:
        """``(B,)`` number of labels of each sample."""
        return self.indptr[1:] - self.indptr[:-1]

    def sample_ids(self) -> Tensor:
        """``(L,)`` the sample each entry of ``indices`` belongs to."""
        batch = torch.arange(self.batch_size, device=self.indptr.device)
        # output_size given: no host sync to learn the result length
        return torch.repeat_interleave(batch, self.lengths(), output_size=self.indices.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RaggedLabels:
        return RaggedLabels(
            self.indptr.to(device, non_blocking=non_blocking),
            self.indices.to(device, non_blocking=non_blocking),
        )

    def to_lists(self) -> list[list[int]]:
        bounds = self.indptr.tolist()
        flat = self.indices.tolist()
        return [flat[bounds[b] : bounds[b + 1]] for b in range(self.batch_size)]


Targets = Tensor | RaggedLabels
"""``LongTensor[B]`` of class ids (multi-class) or :class:`RaggedLabels` (multi-label)."""


def as_ragged(targets: Targets) -> RaggedLabels:
    """View multi-class targets as one label per sample; ragged targets pass through."""
    if isinstance(targets, RaggedLabels):
        return targets
    batch = targets.numel()
    indptr = torch.arange(batch + 1, dtype=torch.int64, device=targets.device)
    return RaggedLabels(indptr, targets.reshape(-1).to(torch.int64))
