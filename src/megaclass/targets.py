"""Batch targets: one class per sample, or a ragged set of labels per sample.

Multi-class targets are a ``LongTensor[B]``. Multi-label targets are :class:`RaggedLabels` in CSR form,
never a dense ``B x C`` matrix. Their padded form (:meth:`RaggedLabels.pad_to`) keeps the labels of every
batch in ``indices`` of one fixed capacity, the shape a CUDA graph's static input needs; what reads it goes
through :meth:`~RaggedLabels.label_ids`, :meth:`~RaggedLabels.sample_ids` and
:meth:`~RaggedLabels.mask_pads`, which treat both forms alike on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PAD_LABEL = -1
"""What :meth:`RaggedLabels.pad_to` writes into the entries past the labels (never read as a label id)."""


@dataclass(frozen=True)
class RaggedLabels:
    """The labels of ``B`` samples: those of sample ``b`` are ``indices[indptr[b]:indptr[b + 1]]``.

    Args:
        indptr: ``(B + 1,)`` int64 offsets, ``indptr[0] == 0``, non-decreasing.
        indices: ``(L,)`` int64 label ids, ``L == indptr[-1]``. A sample may have no labels.
        padded: ``indices`` is ``(L_cap,)``: the ``indptr[-1] <= L_cap`` labels, then pads (whatever the
            entries from ``indptr[-1]`` on hold, they are no labels). The count of labels stays on the
            device: nothing reads it on the host.

    >>> y = RaggedLabels.from_lists([[3, 1], [], [0]])
    >>> y.batch_size, y.indices.tolist(), y.sample_ids().tolist()
    (3, [3, 1, 0], [0, 0, 2])
    >>> padded = y.pad_to(5)
    >>> padded.indices.tolist(), padded.label_ids().tolist(), padded.sample_ids().tolist()
    ([3, 1, 0, -1, -1], [3, 1, 0, 0, 0], [0, 0, 2, 2, 2])
    """

    indptr: Tensor
    indices: Tensor
    padded: bool = False

    def __post_init__(self) -> None:
        assert self.indptr.dim() == 1 and self.indptr.numel() >= 1, "indptr must be (B + 1,)"
        assert self.indices.dim() == 1, "indices must be (L,)"
        assert not (self.padded and self.batch_size == 0 and self.indices.numel()), "pads need a sample"

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
        """``(L,)`` the sample each entry of ``indices`` belongs to; a pad: the last sample."""
        if self.padded:
            # entry l belongs to the sample b with indptr[b] <= l < indptr[b + 1]: the count of ends <= l
            entries = torch.arange(self.indices.numel(), dtype=self.indptr.dtype, device=self.indptr.device)
            samples = torch.searchsorted(self.indptr[1:], entries, right=True)  # (L_cap,) pads: B
            return samples.clamp_max(self.batch_size - 1)
        batch = torch.arange(self.batch_size, device=self.indptr.device)
        # output_size given: no host sync to learn the result length
        return torch.repeat_interleave(batch, self.lengths(), output_size=self.indices.numel())

    def valid(self) -> Tensor:
        """``(L,)`` bool: True on labels, False on pads."""
        entries = torch.arange(self.indices.numel(), device=self.indptr.device)
        return entries < self.indptr[-1]

    def mask_pads(self, values: Tensor, fill: int | float = 0) -> Tensor:
        """``values (L, ...)`` with the pads' entries set to ``fill``: ``values`` itself when not padded.
        Differentiable; a pad's entry passes no gradient back."""
        if not self.padded:
            return values
        valid = self.valid().view(-1, *([1] * (values.dim() - 1)))
        return torch.where(valid, values, fill)

    def label_ids(self) -> Tensor:
        """``(L,)`` the label ids, pads read as label 0: every entry indexes a class row (what a pad gathers
        is then masked out with :meth:`mask_pads`)."""
        return self.mask_pads(self.indices, 0)

    def pad_to(self, capacity: int, *, out: Tensor | None = None) -> RaggedLabels:
        """The padded form with ``indices`` of ``capacity`` entries, the labels first, then
        :data:`PAD_LABEL`. The label count is the shape of ``indices``: no host sync.

        Args:
            out: a ``(capacity,)`` tensor to write the padded ``indices`` into (a CUDA graph's static input).

        Raises:
            ValueError: these are padded already, or hold more than ``capacity`` labels.
        """
        if self.padded:
            raise ValueError("pad_to: the labels are padded already")
        count = self.indices.numel()
        if count > capacity:
            raise ValueError(f"pad_to: {count} labels do not fit in a capacity of {capacity}")
        indices = self.indices.new_empty((capacity,)) if out is None else out
        indices[:count].copy_(self.indices)
        indices[count:].fill_(PAD_LABEL)
        return RaggedLabels(self.indptr, indices, padded=True)

    def unpadded(self) -> RaggedLabels:
        """The labels without pads (a host sync when padded: the count is read from the device)."""
        if not self.padded:
            return self
        return RaggedLabels(self.indptr, self.indices[: int(self.indptr[-1])])  # deliberate host sync

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RaggedLabels:
        return RaggedLabels(
            self.indptr.to(device, non_blocking=non_blocking),
            self.indices.to(device, non_blocking=non_blocking),
            padded=self.padded,
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
