"""Options and the small plain-PyTorch pieces both backends share: targets, row weights, positive logits.

Every loss here splits into a dense part over all ``C`` classes and a sparse part over each sample's
positives ``P_b``:

- softmax: ``loss_b = lse_b - mean_{c in P_b} z_bc``; with a cosine margin (one target ``t``) the target's
  logit is ``s * psi(cos)`` and ``lse_b = logaddexp(lse over c != t, z_bt)``.
- bce: ``loss_b = sum_c softplus(z_bc) - sum_{c in P_b} z_bc``.
- squared_hinge: ``loss_b = sum_c relu(1 + z_bc)^2 + sum_{c in P_b} [relu(1 - z_bc)^2 - relu(1 + z_bc)^2]``.

The dense part (a per-row reduction over all classes; in backward ``G = coef_b * g'(z)``) is what a backend
computes in class chunks; the sparse part touches the ``L`` gathered rows only and is done here. Padded
targets (:meth:`~megaclass.targets.RaggedLabels.pad_to`, a CUDA graph's static shape) gather class 0 at their
pads and mask those entries out of every sum and gradient: the same loss and gradients as without pads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from megaclass.ops.margins import MarginConfig, margin_target_logit
from megaclass.targets import RaggedLabels, Targets, as_ragged

NORM_EPS = 1e-12  # the clamp F.normalize uses on a row norm


class LossKind(str, enum.Enum):
    """The loss over a sample's logits: softmax cross-entropy, binary cross-entropy, squared hinge."""

    SOFTMAX = "softmax"
    BCE = "bce"
    SQUARED_HINGE = "squared_hinge"


class Reduction(str, enum.Enum):
    """``mean``: the average over samples of each sample's loss (summed over classes for bce and hinge;
    softmax averages over samples that have a label); ``sum``: the plain sum over samples."""

    MEAN = "mean"
    SUM = "sum"


@dataclass(frozen=True)
class LinearLossOptions:
    """Non-tensor options of the fused linear + loss ops (one frozen object, not positional arguments)."""

    loss: LossKind = LossKind.SOFTMAX
    reduction: Reduction = Reduction.MEAN
    margin: MarginConfig = field(default_factory=MarginConfig)  # cosine margin, softmax with one label only
    chunk_size: int = 8192  # classes per chunk in the reference backend: memory O(B x chunk_size)

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss", LossKind(self.loss))
        object.__setattr__(self, "reduction", Reduction(self.reduction))
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.margin.enabled and self.loss is not LossKind.SOFTMAX:
            raise ValueError(f"a cosine margin needs loss='softmax', got loss={self.loss.value!r}")

    @property
    def cosine(self) -> bool:
        return self.margin.enabled


def check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, options: LinearLossOptions) -> None:
    """Raise ValueError naming the argument when shapes or dtypes do not fit ``x (B, D)``, ``W (C, D)``."""
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (C, D={x.shape[1]}), got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one class row")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be (C={weight.shape[0]},), got shape {tuple(bias.shape)}")
        if options.cosine:
            raise ValueError("bias must be None with a cosine margin: the logits are scaled cosines")


def prepare_targets(
    targets: Targets, batch: int, num_classes: int, options: LinearLossOptions
) -> RaggedLabels:
    """Validate ``targets`` against ``B`` and ``C`` and return them as ragged int64 labels.

    Label ranges are checked for CPU targets only: a check on the GPU would need a host sync every step.
    Padded targets stay padded (a cosine margin needs multi-class targets).
    """
    if isinstance(targets, Tensor):
        if targets.dim() != 1 or targets.numel() != batch:
            raise ValueError(
                f"targets must be a LongTensor of shape (B={batch},), got {tuple(targets.shape)}"
            )
        if targets.is_floating_point():
            raise ValueError(f"targets must hold integer class ids, got dtype {targets.dtype}")
    ragged = as_ragged(targets)
    if ragged.batch_size != batch:
        raise ValueError(f"targets hold {ragged.batch_size} samples, x holds B={batch}")
    ragged = RaggedLabels(ragged.indptr.to(torch.int64), ragged.indices.to(torch.int64), padded=ragged.padded)
    labels = ragged.unpadded().indices if ragged.indices.device.type == "cpu" else None  # CPU: no device sync
    if labels is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"targets: label id {bad} out of range [0, {num_classes})")
    if options.cosine and not bool(ragged.indices.numel() == batch and isinstance(targets, Tensor)):
        raise ValueError(
            "a cosine margin needs multi-class targets: a LongTensor (B,) with one class per sample"
        )
    return ragged


def row_coefficients(targets: RaggedLabels, options: LinearLossOptions) -> Tensor:
    """``(B,)`` float32 weight of each sample's loss in the reduced scalar."""
    lengths = targets.lengths()
    batch = targets.batch_size
    if options.loss is LossKind.SOFTMAX:
        has_labels = (lengths > 0).to(torch.float32)
        if options.reduction is Reduction.SUM:
            return has_labels
        return has_labels / has_labels.sum().clamp_min(1.0)
    ones = torch.ones(batch, dtype=torch.float32, device=lengths.device)
    return ones if options.reduction is Reduction.SUM else ones / max(batch, 1)


def positive_logits(
    x: Tensor, weight: Tensor, bias: Tensor | None, targets: RaggedLabels, options: LinearLossOptions
) -> Tensor:
    """``(L,)`` float32 logit of every positive, computed as the dense backends do (inputs in ``x.dtype``,
    fp32 sums; with a margin, ``s * psi(cos)`` over the fp32 norm of the weight row). Differentiable."""
    labels = targets.label_ids()  # (L,) pads: class 0, masked out where the logits are used
    bias_rows = None if bias is None else bias.index_select(0, labels)
    return _rows_logits(x, weight.index_select(0, labels), bias_rows, targets, options)


def _rows_logits(
    x: Tensor, class_rows: Tensor, bias_rows: Tensor | None, targets: RaggedLabels, options: LinearLossOptions
) -> Tensor:
    """``(L,)`` logits of ``x[sample_ids]`` against the gathered ``class_rows (L, D)``."""
    sample_rows = x.index_select(0, targets.sample_ids())  # (L, D)
    products = (sample_rows.float() * class_rows.to(x.dtype).float()).sum(-1)  # (L,)
    if options.cosine:
        norms = class_rows.float().norm(dim=-1).clamp_min(NORM_EPS)
        return margin_target_logit(products / norms, options.margin)
    return products if bias_rows is None else products + bias_rows.float()


def segment_sum(values: Tensor, targets: RaggedLabels) -> Tensor:
    """``(B,)`` sum of ``values (L,)`` over each sample's positives (pads add nothing)."""
    out = torch.zeros(targets.batch_size, dtype=values.dtype, device=values.device)
    return out.index_add(0, targets.sample_ids(), targets.mask_pads(values))


def assemble_loss(
    reduced: Tensor, z_pos: Tensor, targets: RaggedLabels, coef: Tensor, options: LinearLossOptions
) -> tuple[Tensor, Tensor]:
    """The scalar loss and the ``(B,)`` per-row statistic backward needs (the full lse for softmax).

    Args:
        reduced: ``(B,)`` dense reduction over classes: ``lse`` (with a margin: over classes but the target),
            ``sum softplus(z)`` for bce, ``sum relu(1 + z)^2`` for squared hinge.
        z_pos: ``(L,)`` positive logits.
    """
    if options.loss is LossKind.SOFTMAX:
        if options.cosine:
            lse = torch.logaddexp(reduced, z_pos)  # L == B: one target per row
            per_row = lse - z_pos
        else:
            lse = reduced
            lengths = targets.lengths().clamp_min(1).to(torch.float32)
            per_row = lse - segment_sum(z_pos, targets) / lengths
        per_row = torch.where(coef > 0, per_row, torch.zeros_like(per_row))  # rows without labels: 0, not nan
        return (coef * per_row).sum(), lse
    if options.loss is LossKind.BCE:
        per_row = reduced - segment_sum(z_pos, targets)
    else:
        correction = F.relu(1 - z_pos).square() - F.relu(1 + z_pos).square()
        per_row = reduced + segment_sum(correction, targets)
    return (coef * per_row).sum(), reduced


def positive_grad(
    z_pos: Tensor, lse: Tensor, targets: RaggedLabels, coef: Tensor, options: LinearLossOptions
) -> Tensor:
    """``(L,)`` d loss / d z_pos of the sparse part (``coef`` already holds the incoming gradient); 0 at
    pads."""
    rows = targets.sample_ids()
    row_coef = coef.index_select(0, rows)
    if options.loss is LossKind.SOFTMAX:
        if options.cosine:
            return row_coef * (torch.exp(z_pos - lse.index_select(0, rows)) - 1)
        lengths = targets.lengths().clamp_min(1).to(torch.float32).index_select(0, rows)
        grad = -row_coef / lengths
    elif options.loss is LossKind.BCE:
        grad = -row_coef
    else:
        grad = -2 * row_coef * (F.relu(1 - z_pos) + F.relu(1 + z_pos))
    return targets.mask_pads(grad)


class DenseOperands(NamedTuple):
    """What the dense part over all classes reads."""

    x: Tensor  # (B, D) in the compute dtype
    weight: Tensor  # (C, D) class rows, any float dtype
    bias: Tensor | None  # (C,)
    exclude: Tensor | None  # (B,) a class per row left out of the reduction (the margin target)
    options: LinearLossOptions


def input_grads(
    grads: tuple[Tensor, Tensor, Tensor | None], dense: DenseOperands, targets: RaggedLabels, dz_pos: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Back-propagate ``dz_pos`` through the gathered positive logits into the dense part's fp32 ``grads``
    (in place) and return ``(dx, dW, dbias)`` in the dtypes of ``x``, ``weight`` and ``bias``. Pads (0 in
    ``dz_pos``) add exact zeros to class 0's row and the last sample's."""
    x, weight, bias, _, options = dense
    grad_x, grad_weight, grad_bias = grads
    if dz_pos.numel():
        labels = targets.label_ids()  # (L,)
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(True)
            rows_leaf = weight.detach().index_select(0, labels).requires_grad_(True)  # (L, D)
            leaves = [x_leaf, rows_leaf]
            bias_leaf = None
            if bias is not None:
                bias_leaf = bias.detach().index_select(0, labels).requires_grad_(True)  # (L,)
                leaves.append(bias_leaf)
            z = _rows_logits(x_leaf, rows_leaf, bias_leaf, targets, options)
            found = torch.autograd.grad(z, leaves, dz_pos)
        grad_x.add_(found[0].float())
        grad_weight.index_add_(0, labels, found[1].float())
        if grad_bias is not None:
            grad_bias.index_add_(0, labels, found[2].float())
    return (
        grad_x.to(x.dtype),
        grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


class DenseBackend(Protocol):
    """How the dense part over all classes is computed: Triton kernels or chunked plain PyTorch."""

    def reduce(self, dense: DenseOperands) -> Tensor:
        """``(B,)`` float32: lse over classes (softmax), or the sum over classes of softplus / relu(1+z)^2."""
        ...

    def grads(self, dense: DenseOperands, lse: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """fp32 ``(dx (B, D), dW (C, D), dbias (C,) or None)`` of ``sum_bc G_bc z_bc``, ``G = coef_b
        g'(z_bc)``, with ``g'`` the softmax ``exp(z - lse_b)``, ``sigmoid(z)`` or ``2 relu(1 + z)``; 0 on
        excluded classes."""
        ...

    def fuses_gradient(self, dense: DenseOperands) -> bool:
        """Whether the forward pass computes the gradients too (then this is a :class:`FusingBackend`)."""
        ...


class FusingBackend(DenseBackend, Protocol):
    """A backend that computes bce / squared hinge gradients in the forward pass: ``G = coef_b g'(z)`` needs
    no statistic of the whole row, and ``coef`` (the reduction's row weights) is known before the backward
    pass; the incoming gradient scales the result afterwards."""

    def reduce_and_grads(
        self, dense: DenseOperands, coef: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
        """``reduce(dense)`` and ``grads(dense, _, coef)`` in one pass over the classes."""
        ...

    def scale_grads(self, grads: tuple[Tensor, Tensor, Tensor | None], factor: Tensor) -> None:
        """Multiply ``grads`` in place by the 1-element ``factor`` without a host sync."""
        ...


class LinearLossFunction(torch.autograd.Function):
    """Fused ``x @ weight.T (+ bias)`` and loss; saves only ``(B,)`` statistics and ``(L,)`` positive logits,
    and recomputes the logits chunk by chunk in backward through ``backend``.

    When the backend fuses the gradient (bce / squared hinge on the Triton and reference backends, softmax
    on the reference backend where its logits are small) and an input needs one, the forward pass keeps the
    dense part's gradients at the row weights instead, and the backward pass scales them by the incoming
    gradient on the device; a second backward pass through the same graph recomputes them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        indptr: Tensor,
        indices: Tensor,
        padded: bool,
        options: LinearLossOptions,
        backend: DenseBackend,
        grad_enabled: bool,
    ) -> Tensor:
        targets = RaggedLabels(indptr, indices, padded=padded)
        coef = row_coefficients(targets, options)
        z_pos = positive_logits(x, weight, bias, targets, options)
        dense = DenseOperands(x, weight, bias, indices if options.cosine else None, options)
        ctx.fused = None
        with torch.autocast(x.device.type, enabled=False):  # compute dtype is x.dtype, chosen by the caller
            if grad_enabled and any(ctx.needs_input_grad[:3]) and backend.fuses_gradient(dense):
                reduced, ctx.fused = cast(FusingBackend, backend).reduce_and_grads(dense, coef)
            else:
                reduced = backend.reduce(dense)
        loss, stat = assemble_loss(reduced, z_pos, targets, coef, options)
        ctx.save_for_backward(x, weight, bias, indptr, indices, coef, stat, z_pos)
        ctx.options, ctx.backend, ctx.padded = options, backend, padded
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, indptr, indices, coef, stat, z_pos = ctx.saved_tensors
        options: LinearLossOptions = ctx.options
        targets = RaggedLabels(indptr, indices, padded=ctx.padded)
        coef = coef * grad_loss.float()  # device-side scale: no host sync
        dense = DenseOperands(x, weight, bias, indices if options.cosine else None, options)
        if ctx.fused is not None:
            grads, ctx.fused = ctx.fused, None  # scaled in place: a second backward pass recomputes
            cast(FusingBackend, ctx.backend).scale_grads(grads, grad_loss)
        else:
            with torch.autocast(x.device.type, enabled=False):
                grads = ctx.backend.grads(dense, stat, coef)
        dz_pos = positive_grad(z_pos, stat, targets, coef, options)
        return (*input_grads(grads, dense, targets, dz_pos), None, None, None, None, None, None)


def prepare_inputs(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    bias: Tensor | None,
    options: LinearLossOptions,
    num_classes: int,
) -> tuple[Tensor, RaggedLabels]:
    """Validate, and return ``x`` (L2-normalised rows for a cosine margin, plain autograd) and the targets
    as ragged int64 labels with ids in ``[0, num_classes)``."""
    check_inputs(x, weight, bias, options)
    ragged = prepare_targets(targets, x.shape[0], num_classes, options)
    if options.cosine:
        x = F.normalize(x.float(), dim=-1, eps=NORM_EPS).to(x.dtype)
    return x, ragged


def linear_loss_apply(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    bias: Tensor | None,
    options: LinearLossOptions,
    backend: DenseBackend,
) -> Tensor:
    """Validate, normalise ``x`` for a cosine margin (plain autograd), run :class:`LinearLossFunction`."""
    x, ragged = prepare_inputs(x, weight, targets, bias, options, weight.shape[0])
    grad_enabled = torch.is_grad_enabled()  # inside forward grad mode is off; needs_input_grad ignores it
    return LinearLossFunction.apply(
        x, weight, bias, ragged.indptr, ragged.indices, ragged.padded, options, backend, grad_enabled
    )
