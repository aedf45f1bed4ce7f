"""The ``Head`` interface every output strategy implements, and what a head is told when it is built."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from megaclass.targets import RaggedLabels, Targets

__all__ = ["Head", "HeadContext", "RaggedLabels", "Targets"]


@dataclass(frozen=True)
class HeadContext:
    """Facts about the task a head is built for.

    Args:
        in_features: ``D``, the width of the features the encoder gives.
        num_classes: ``C``, the number of classes or labels.
        multilabel: whether a sample may have several labels (targets are :class:`RaggedLabels`).
        label_counts: ``(C,)`` training frequency of each label, or None when unknown.
        label_features: ``(C, E)`` float32 vector per label for clustering (PIFA: the normalised sum of the
            vectors of each label's training documents), or None when the data gives none.
    """

    in_features: int
    num_classes: int
    multilabel: bool
    label_counts: np.ndarray | None = None
    label_features: np.ndarray | None = None


class Head(nn.Module):
    """An output layer plus its loss over ``C`` classes, built never to hold a ``B x C`` matrix.

    Subclasses implement :meth:`forward` and :meth:`topk`; :meth:`after_step` is for structure maintained
    between steps (rewiring, index rebuilds, off-device row updates). A head saves everything it maintains
    in its state dict, so a checkpoint restores it exactly.
    """

    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """Scalar training loss of ``features (B, D)`` against ``targets``."""
        raise NotImplementedError

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, ids)``, each ``(B, k)``, scores descending; never ``B x C`` at once."""
        raise NotImplementedError

    def after_step(self, step: int, epoch: float, *, lr: float) -> None:
        """Called after each optimizer step with the global step, the fractional epoch and the head's lr."""

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging about the head's state (coverage, sparsity, ...); empty by default."""
        return {}

    def state_bytes(self) -> dict[str, int]:
        """Bytes this head holds, by kind: ``weights`` and ``structure`` (indices, topology, index)."""
        weights = sum(p.numel() * p.element_size() for p in self.parameters())
        structure = sum(b.numel() * b.element_size() for b in self.buffers())
        return {"weights": weights, "structure": structure}
