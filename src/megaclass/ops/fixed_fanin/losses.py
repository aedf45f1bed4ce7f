"""Fused losses and chunked top-k over a fixed fan-in layer, built on the row values of ``function.py``.

The per-sample loss splits into a dense part with every target 0 (fused, never ``B x C`` in memory) and a
sparse correction at the ``L`` positive entries, computed from their ``L`` logits alone:

* BCE: ``l(z, 1) - l(z, 0) = -z``;
* squared hinge: ``max(0, 1 - z)^2 - max(0, 1 + z)^2``;
* softmax cross-entropy against the uniform distribution over a sample's labels:
  ``lse_b - mean_{c in labels(b)} z[b, c]``.

Padded targets (:meth:`~megaclass.targets.RaggedLabels.pad_to`, a CUDA graph's static shape) compute a
positive logit at label 0 for each pad and mask it out of the correction: the same loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megaclass.ops import Impl
from megaclass.ops.fixed_fanin.function import (
    FaninLoss,
    fixed_fanin,
    fixed_fanin_rows_positive,
    positive_values,
)
from megaclass.targets import RaggedLabels

__all__ = ["combine_loss", "fixed_fanin_loss", "fixed_fanin_topk", "positive_logits"]


def positive_logits(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    bias: Tensor | None,
    samples: Tensor,
    labels: Tensor,
    *,
    group: int = 1,
) -> Tensor:
    """``(L,)`` fp32 logits ``z[samples[l], labels[l]]`` from ``L`` gathers of ``K`` inputs (plain autograd;
    :func:`fixed_fanin_rows_positive` computes them with the row values and a sparse gradient)."""
    return positive_values(x, weight, index, bias, samples, labels, group)


def combine_loss(rows: Tensor, positive: Tensor, targets: RaggedLabels, loss: FaninLoss | str) -> Tensor:
    """Mean over samples of the per-sample loss from fused ``rows (B,)`` and ``positive (L,)`` logits (the
    entries of pads add nothing and get no gradient)."""
    loss = FaninLoss(loss)
    samples, batch = targets.sample_ids(), targets.batch_size
    positive = positive.float()
    if loss is FaninLoss.BCE:
        correction = -positive
    elif loss is FaninLoss.HINGE:
        correction = F.relu(1 - positive).square() - F.relu(1 + positive).square()
    else:
        lengths = targets.lengths()
        # clamped: a pad may sit on a sample without labels, and a masked 1 / 0 would still poison its grad
        correction = -positive / lengths[samples].clamp_min(1).to(positive.dtype)
        rows = rows * (lengths > 0).to(rows.dtype)  # a sample without labels adds nothing
    per_sample = rows.index_add(0, samples, targets.mask_pads(correction))  # (B,)
    return per_sample.sum() / batch


def fixed_fanin_loss(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    targets: RaggedLabels,
    bias: Tensor | None = None,
    *,
    group: int = 1,
    loss: FaninLoss | str = "bce",
    impl: Impl | str = "auto",
) -> Tensor:
    """Scalar loss of the fixed fan-in layer against ragged targets, fused: no ``B x C`` logits are kept.

    ``bce`` and ``hinge`` sum the binary loss over all ``C`` labels per sample; ``softmax`` is the
    cross-entropy against the uniform distribution over each sample's labels. Averaged over samples.
    ``targets`` may be padded (the same loss).

    >>> x, w, idx = torch.randn(2, 8), torch.randn(5, 3), torch.randint(0, 8, (5, 3))
    >>> fixed_fanin_loss(x, w, idx, RaggedLabels.from_lists([[1, 4], [0]])).shape
    torch.Size([])
    """
    if targets.batch_size != x.shape[0]:
        raise ValueError(f"targets: expected {x.shape[0]} samples, got {targets.batch_size}")
    labels = targets.label_ids().long()  # (L,) pads: label 0
    rows, positive = fixed_fanin_rows_positive(
        x, weight, index, targets.sample_ids(), labels, bias, group=group, loss=loss, impl=impl
    )
    return combine_loss(rows, positive, targets, loss)


@torch.no_grad()
def fixed_fanin_topk(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    k: int,
    bias: Tensor | None = None,
    *,
    group: int = 1,
    chunk_size: int = 1 << 16,
    impl: Impl | str = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-``k`` ``(scores, ids)``, each ``(B, k)`` (fp32, int64), over labels in chunks of ``chunk_size``."""
    classes = weight.shape[0]
    if not 1 <= k <= classes:
        raise ValueError(f"k: expected 1 <= k <= C = {classes}, got {k}")
    chunk = max(group, chunk_size // group * group)
    best_scores = best_ids = None
    for start in range(0, classes, chunk):
        stop = min(start + chunk, classes)
        rows = slice(start // group, -(-stop // group))
        chunk_bias = bias[start:stop] if bias is not None else None
        scores = fixed_fanin(x, weight[start:stop], index[rows], chunk_bias, group=group, impl=impl).float()
        top = scores.topk(min(k, stop - start), dim=1)
        ids = top.indices + start
        if best_scores is None:
            best_scores, best_ids = top.values, ids
            continue
        merged_scores = torch.cat([best_scores, top.values], 1)
        merged = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_ids = merged.values, torch.cat([best_ids, ids], 1).gather(1, merged.indices)
    assert best_scores is not None and best_ids is not None
    return best_scores, best_ids
