"""Plain-PyTorch reference of the fixed fan-in layer and its losses: the executable spec of the kernels.

It materialises the ``(B, C, K)`` gathered inputs and the ``B x C`` logits; use it on small shapes (tests,
sampled labels), never on a full extreme output space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["reference_fixed_fanin", "reference_fixed_fanin_loss", "reference_row_values"]


def reference_fixed_fanin(
    x: Tensor, weight: Tensor, index: Tensor, bias: Tensor | None = None, *, group: int = 1
) -> Tensor:
    """``y[b, c] = sum_k x[b, index[c // group, k]] * weight[c, k] (+ bias[c])``, ``(B, C)``."""
    classes = weight.shape[0]
    rows = torch.arange(classes, device=weight.device) // group
    gathered = x[:, index[rows].long()]  # (B, C, K)
    y = (gathered * weight[None]).sum(-1)  # (B, C)
    return y if bias is None else y + bias


def reference_row_values(logits: Tensor, loss: str) -> Tensor:
    """``(B,)``: sum over labels of the all-negative loss (``bce``, ``hinge``) or the log-sum-exp."""
    if loss == "bce":
        return F.softplus(logits).sum(1)
    if loss == "hinge":
        return F.relu(1 + logits).square().sum(1)
    if loss == "softmax":
        return torch.logsumexp(logits, 1)
    raise ValueError(f"loss: expected 'bce', 'hinge' or 'softmax', got {loss!r}")


def reference_fixed_fanin_loss(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    indptr: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    group: int = 1,
    loss: str = "bce",
) -> Tensor:
    """Mean over samples of the loss against ragged targets ``(indptr, labels)``, from dense logits.

    ``bce`` and ``hinge`` sum the binary loss over all ``C`` labels; ``softmax`` is the cross-entropy against
    the uniform distribution over a sample's labels (a sample without labels adds nothing).
    """
    logits = reference_fixed_fanin(x, weight, index, bias, group=group).float()  # (B, C)
    batch = logits.shape[0]
    target = torch.zeros_like(logits)
    sample = torch.repeat_interleave(torch.arange(batch, device=x.device), indptr[1:] - indptr[:-1])
    target[sample, labels] = 1.0
    if loss == "bce":
        per_sample = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    elif loss == "hinge":
        sign = 2 * target - 1
        per_sample = F.relu(1 - sign * logits).square().sum(1)
    elif loss == "softmax":
        counts = target.sum(1)
        log_p = torch.log_softmax(logits, 1)
        per_sample = -(target * log_p).sum(1) / counts.clamp_min(1)
    else:
        raise ValueError(f"loss: expected 'bce', 'hinge' or 'softmax', got {loss!r}")
    return per_sample.sum() / batch
