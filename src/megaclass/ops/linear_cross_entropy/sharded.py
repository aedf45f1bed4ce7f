"""The collective form of the fused linear + loss: this rank holds the classes ``[start, stop)`` of ``C``
(a :class:`~megaclass.ops.collectives.ClassShard`) and every rank passes the same global batch.

The loss is the single-process loss over all ``C`` classes, held by every rank (Cut Cross-Entropy's
vocab-parallel form, InsightFace's PartialFC_V2 without sampling):

- softmax: the normaliser from an all-reduce of the per-row maximum and of the sums of exponentials
  (arXiv 1805.02867's online softmax, across ranks); each positive's logit from the rank that owns it, summed
  over ranks (the others contribute 0); with a cosine margin the target's margin logit joins the normaliser
  after the reduction, as in :func:`~.common.assemble_loss`.
- bce / squared hinge: each rank's classes' terms, summed by one all-reduce of the scalar.

Backward needs no communication: the rows' gradients are complete on their owner, and each rank's partial
``dx`` is summed over ranks by whoever gathered ``x`` (:func:`~megaclass.ops.collectives.gather_rows`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from megaclass.ops.collectives import ClassShard, all_reduce_logsumexp, all_reduce_replicated, local_targets
from megaclass.ops.linear_cross_entropy.common import (
    DenseBackend,
    DenseOperands,
    LinearLossOptions,
    LossKind,
    input_grads,
    positive_grad,
    positive_logits,
    prepare_inputs,
    row_coefficients,
    segment_sum,
)
from megaclass.targets import RaggedLabels, Targets

__all__ = ["ShardedLinearLossFunction", "sharded_linear_loss_apply"]


def _owned_exclude(targets: RaggedLabels, local: RaggedLabels, options: LinearLossOptions) -> Tensor | None:
    """``(B,)`` local column of each row's target where this rank owns it, else -1 (cosine margin only)."""
    if not options.cosine:
        return None
    exclude = torch.full((targets.batch_size,), -1, dtype=torch.int64, device=targets.indices.device)
    return exclude.index_put((local.sample_ids(),), local.indices)


class ShardedLinearLossFunction(torch.autograd.Function):
    """:class:`~.common.LinearLossFunction` over one rank's classes with the per-row statistics reduced over
    the shard's group; returns the whole problem's loss, equal on every rank.

    ``indptr`` / ``indices`` hold the global targets (ids in ``[0, C)``); ``weight`` and ``bias`` the shard's
    rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        indptr: Tensor,
        indices: Tensor,
        options: LinearLossOptions,
        backend: DenseBackend,
        shard: ClassShard,
    ) -> Tensor:
        targets = RaggedLabels(indptr, indices)
        local = local_targets(targets, shard.start, shard.stop)  # ids relative to shard.start
        coef = row_coefficients(targets, options)  # (B,) from the global label counts
        z_pos = positive_logits(x, weight, bias, local, options)  # (L_local,)
        dense = DenseOperands(x, weight, bias, _owned_exclude(targets, local, options), options)
        with torch.autocast(x.device.type, enabled=False):  # compute dtype is x.dtype, chosen by the caller
            reduced = backend.reduce(dense)  # (B,) over this rank's classes
        if options.loss is LossKind.SOFTMAX:
            positive_sum = all_reduce_replicated(segment_sum(z_pos, local), group=shard.group)  # (B,)
            lse = all_reduce_logsumexp(reduced, group=shard.group)  # (B,) over all classes
            if options.cosine:
                lse = torch.logaddexp(lse, positive_sum)  # the target's margin logit, from its owner
                per_row = lse - positive_sum
            else:
                per_row = lse - positive_sum / targets.lengths().clamp_min(1).to(torch.float32)
            per_row = torch.where(coef > 0, per_row, torch.zeros_like(per_row))  # rows without labels: 0
            loss, stat = (coef * per_row).sum(), lse
        else:
            if options.loss is LossKind.BCE:
                per_row = reduced - segment_sum(z_pos, local)
            else:
                correction = F.relu(1 - z_pos).square() - F.relu(1 + z_pos).square()
                per_row = reduced + segment_sum(correction, local)
            loss = all_reduce_replicated((coef * per_row).sum(), group=shard.group)
            stat = reduced
        ctx.save_for_backward(
            x, weight, bias, indptr, indices, local.indptr, local.indices, coef, stat, z_pos
        )
        ctx.options, ctx.backend = options, backend
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, indptr, indices, local_indptr, local_indices, coef, stat, z_pos = ctx.saved_tensors
        options: LinearLossOptions = ctx.options
        targets, local = RaggedLabels(indptr, indices), RaggedLabels(local_indptr, local_indices)
        coef = coef * grad_loss.float()  # device-side scale: no host sync
        dense = DenseOperands(x, weight, bias, _owned_exclude(targets, local, options), options)
        with torch.autocast(x.device.type, enabled=False):
            grads = ctx.backend.grads(dense, stat, coef)
        if options.loss is LossKind.SOFTMAX and not options.cosine:
            rows = local.sample_ids()
            lengths = targets.lengths().clamp_min(1).to(torch.float32)  # the global label counts
            dz_pos = -coef.index_select(0, rows) / lengths.index_select(0, rows)
        else:
            dz_pos = positive_grad(z_pos, stat, local, coef, options)
        return (*input_grads(grads, dense, local, dz_pos), None, None, None, None, None)


def sharded_linear_loss_apply(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    bias: Tensor | None,
    options: LinearLossOptions,
    backend: DenseBackend,
    shard: ClassShard,
) -> Tensor:
    """Validate, normalise ``x`` for a cosine margin (plain autograd), run :class:`ShardedLinearLossFunction`.

    ``weight (stop - start, D)`` holds the shard's rows; ``targets`` are global class ids in ``[0, C)``."""
    x, ragged = prepare_inputs(x, weight, targets, bias, options, shard.num_classes)
    return ShardedLinearLossFunction.apply(
        x, weight, bias, ragged.indptr, ragged.indices, options, backend, shard
    )
