"""The exact head: every class scored, the loss fused with the ``x @ W^T`` matmul, chunked over classes.

Memory is ``O(B x chunk)`` for the logits (the Triton kernels on CUDA hold one tile per program); the weight
and its gradient stay fp32 master copies. Every approximate head is measured against this one.

    megaclass train --train train.txt --test test.txt --out runs/dense --head dense --set head.loss=bce

Given a :class:`~megaclass.ops.collectives.ClassShard`, the head holds the rows ``[start, stop)``, scores the
global batch (every rank's features, gathered) against them and computes the whole head's loss with the
op's collective form (the softmax normaliser and the BCE / hinge sums reduced over ranks); its top-``k`` is
merged over ranks. The rows of all ranks stacked in rank order are an unsharded head's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from megaclass.heads.base import Head, HeadContext, PlannedBytes, PlanRequest, StateKind, rescaled_rows
from megaclass.ops import Impl
from megaclass.ops.chunked_topk import chunked_topk, scoring_chunk
from megaclass.ops.collectives import ClassShard, merge_topk
from megaclass.ops.linear_cross_entropy import (
    LinearLossOptions,
    LossKind,
    holds_softmax_logits,
    linear_loss,
    resolve_impl,
)
from megaclass.ops.margins import MarginConfig
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels, Targets

__all__ = ["DenseHead", "DenseHeadConfig"]


@dataclass(frozen=True)
class DenseHeadConfig:
    """Options of :class:`DenseHead`."""

    type: Literal["dense"] = "dense"
    loss: Literal["auto", "softmax", "bce", "squared_hinge"] = (
        "auto"  # auto: softmax multi-class, bce multi-label
    )
    reduction: Literal["mean", "sum"] = (
        "mean"  # mean over samples of each sample's loss (summed over classes)
    )
    bias: bool | None = None  # a per-class bias; None: on, except with a cosine margin (scaled cosines)
    chunk_size: int = 8192  # classes per chunk on the PyTorch path and in topk: memory O(B x chunk_size)
    margin: MarginConfig = field(default_factory=MarginConfig)  # ArcFace / CosFace for face recognition
    init_scale: float = 1.0  # weight rows ~ N(0, (init_scale / sqrt(D))^2): unit-variance logits at start
    impl: Literal["auto", "triton", "torch", "reference"] = "auto"  # auto: by device and shape (ops rule)
    seed: int = 0  # seeds the rows, per block of rows (every world size starts alike)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"head.chunk_size must be >= 1, got {self.chunk_size}")
        if self.init_scale < 0:
            raise ConfigError(f"head.init_scale must be >= 0, got {self.init_scale}")
        if self.margin.enabled and self.bias:
            raise ConfigError("head.bias must be false with a cosine margin (head.margin.kind != none)")
        if self.margin.enabled and self.loss not in ("auto", "softmax"):
            raise ConfigError(f"head.margin needs head.loss softmax, got {self.loss!r}")


_INIT_BLOCK_BYTES = 1 << 24  # at most one block of rows drawn at a time: 16 MiB in float32


def _init_block_rows(dim: int) -> int:
    """Rows drawn per seeded generator: the most, a power of two up to 65,536, that fit 16 MiB at width D."""
    rows = 1 << 16
    while rows > 1 and rows * dim * 4 > _INIT_BLOCK_BYTES:
        rows //= 2
    return rows


def _init_normal_rows_(weight: Tensor, start: int, *, num_classes: int, std: float, seed: int) -> None:
    """Fill the rows of global classes ``[start, start + len(weight))`` (of ``num_classes``) with
    ``N(0, std^2)``, drawn in blocks of :func:`_init_block_rows` global rows seeded ``(seed, block)`` (the
    last block only up to class ``num_classes``): every world size starts from the same matrix."""
    stop, device, dim = start + weight.shape[0], weight.device, weight.shape[1]
    block_rows = _init_block_rows(dim)
    for block in range(start // block_rows, -(-stop // block_rows)):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + block)
        first = block * block_rows
        drawn = min(block_rows, num_classes - first)
        rows = torch.randn(drawn, dim, generator=generator, device=device).mul_(std)  # (drawn, D)
        lo, hi = max(start, first), min(stop, first + drawn)
        weight[lo - start : hi - start] = rows[lo - first : hi - first].to(weight.dtype)


def _loss_options(config: DenseHeadConfig, context: HeadContext) -> LinearLossOptions:
    """The fused op's options for ``config`` on ``context``'s data (``auto``: softmax multi-class, bce
    multi-label)."""
    loss = config.loss
    if loss == "auto":
        loss = "bce" if context.multilabel else "softmax"
    return LinearLossOptions(
        loss=LossKind(loss), reduction=config.reduction, margin=config.margin, chunk_size=config.chunk_size
    )


class DenseHead(Head):
    """Exact linear head over all ``C`` classes with a fused, class-chunked loss.

    Args:
        config: loss, bias, margin, chunking.
        context: ``in_features`` (D), ``num_classes`` (C), ``multilabel``.
        shard: the class range this process holds (None: all classes).

    >>> head = DenseHead(DenseHeadConfig(), HeadContext(in_features=8, num_classes=100, multilabel=False))
    >>> loss = head(torch.randn(4, 8), torch.tensor([1, 2, 3, 99]))
    >>> scores, ids = head.topk(torch.randn(4, 8), k=5)
    >>> tuple(ids.shape)
    (4, 5)
    """

    def __init__(
        self, config: DenseHeadConfig, context: HeadContext, shard: ClassShard | None = None
    ) -> None:
        super().__init__(context, shard)
        if config.margin.enabled and context.multilabel:
            raise ConfigError(
                "head.margin needs multi-class data (one label per sample), the data is multi-label"
            )
        self.config = config
        self.options = _loss_options(config, context)
        start, stop, _ = self.row_range()
        has_bias = config.bias if config.bias is not None else not config.margin.enabled
        self.weight = nn.Parameter(torch.empty(stop - start, context.in_features))  # (C_r, D)
        self.bias = nn.Parameter(torch.zeros(stop - start)) if has_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows ~ N(0, (init_scale / sqrt(D))^2) drawn per block of rows seeded by ``config.seed`` (every
        world size, sharded or not, starts from the same matrix); bias zero."""
        std = self.config.init_scale / math.sqrt(self.context.in_features)
        start, _, _ = self.row_range()
        with torch.no_grad():
            _init_normal_rows_(
                self.weight, start, num_classes=self.context.num_classes, std=std, seed=self.config.seed
            )
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def state_layout(self) -> dict[str, StateKind]:
        """Weights and biases split by class rows."""
        return {"weight": "rows", "bias": "rows"}

    def kernels(self, *, batch: int, device_type: str, dtype: torch.dtype) -> dict[str, str]:
        """The fused loss's backend for this head's rows (a sharded head scores the global batch)."""
        start, stop, _ = self.row_range()
        impl = resolve_impl(
            self.config.impl,
            device_type=device_type,
            batch=batch,
            num_classes=stop - start,
            dim=self.context.in_features,
            dtype=dtype,
        )
        return {"linear_loss": impl.value}

    @torch.no_grad()
    def init_rows(self, rows: Tensor) -> None:
        """Rows from ``rows (C, D)``, unit-normalised and scaled to the initial rows' mean norm."""
        start, stop, _ = self.row_range()
        self.weight.copy_(rescaled_rows(rows[start:stop], self.weight))

    def _compute_input(self, features: Tensor) -> Tensor:
        """``features`` in the compute dtype: the autocast dtype where autocast is on, else as given."""
        self._check_features(features)
        device_type = features.device.type
        if torch.is_autocast_enabled(device_type):
            return features.to(torch.get_autocast_dtype(device_type))
        return features

    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """Scalar loss of ``features (B, D)`` against ``targets`` (``LongTensor (B,)`` or ragged labels);
        sharded: the whole head's loss on the global batch, held by every rank. Ragged labels may be padded
        (:meth:`~megaclass.targets.RaggedLabels.pad_to`) on one process: the same loss."""
        if self.sharded and isinstance(targets, RaggedLabels) and targets.padded:
            raise ValueError(
                "targets: a class-sharded head takes unpadded labels (they are gathered over ranks)"
            )
        x, targets = self.gather_batch(self._compute_input(features), targets)  # (N * B, D) sharded
        return linear_loss(
            x,
            self.weight,
            targets,
            bias=self.bias,
            options=self.options,
            impl=self.config.impl,
            shard=self.shard,
        )

    def capture_blocker(self, *, targets_static: bool) -> str | None:
        """Capturable on one process, with multi-class or padded multi-label targets
        (:meth:`~megaclass.targets.RaggedLabels.pad_to`): the fused op checks label ranges of CPU targets
        only and sizes everything from ``(B, D, C)`` and the label capacity."""
        if self.sharded:
            return "a class-sharded head reduces its loss over ranks inside the step"
        return None

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, ids)`` of the logits, each ``(B, k)``, in chunks of ``chunk_size`` classes;
        sharded: over all ranks' classes, the same on every rank."""
        self._check_k(k)
        margin = self.config.margin
        scores, ids = chunked_topk(
            self._compute_input(features),
            self.weight,
            min(k, self.weight.shape[0]),
            bias=self.bias,
            cosine=margin.enabled,
            scale=margin.scale,
            chunk_size=self.config.chunk_size,
        )
        if self.shard is None:
            return scores, ids
        return merge_topk(scores, ids + self.shard.start, k, group=self.shard.group)

    def extra_repr(self) -> str:
        start, stop, classes = self.row_range()
        return (
            f"in_features={self.context.in_features}, classes=[{start}, {stop}) of {classes}, "
            f"loss={self.options.loss.value}, bias={self.bias is not None}, "
            f"margin={self.config.margin.kind.value}"
        )

    @classmethod
    def planned_bytes(
        cls, config: DenseHeadConfig, context: HeadContext, request: PlanRequest
    ) -> dict[str, PlannedBytes]:
        """The ``(C, D)`` weight and bias on the device, as many gradients, the optimizer's moments of them,
        a chunk of ``B x chunk_size`` fp32 logits and their gradient per batch (and the batch's whole logits
        where the reference backend's softmax holds them), and the initial rows' draw."""
        classes, dim = context.num_classes, context.in_features
        has_bias = config.bias if config.bias is not None else not config.margin.enabled
        params = (classes * dim + (classes if has_bias else 0)) * (2 if request.low_precision else 4)
        chunk = min(config.chunk_size, classes)
        impl = resolve_impl(
            config.impl,
            device_type=request.device_type,
            batch=request.batch,
            num_classes=classes,
            dim=dim,
            dtype=torch.bfloat16 if request.feature_bytes == 2 else torch.float32,
        )
        held = (  # a margin never holds them (and needs multi-class data, which the head checks)
            impl is Impl.REFERENCE
            and not config.margin.enabled
            and holds_softmax_logits(_loss_options(config, context), request.batch, classes)
        )
        held_logits = request.batch * classes * 4 if held else 0  # (B, C)
        scored = min(classes, scoring_chunk(config.chunk_size, request.eval_batch, dim, request.device_type))
        smaller = (
            "optim.head_state=bf16_sr"
            if not request.low_precision
            else "head.type=selected with head.store=host"
        )
        return {
            "weights": PlannedBytes(params, 0, smaller),
            "gradients": PlannedBytes(params, 0, smaller),
            "optimizer": PlannedBytes(request.optimizer_moments * params, 0, smaller),
            "index": PlannedBytes(0, 0),
            "activations": PlannedBytes(
                2 * request.batch * (chunk + dim) * 4 + held_logits, 0, "train.batch_size"
            ),  # (B, chunk)
            "evaluation": PlannedBytes(request.eval_batch * (scored + dim) * 4, 0, "eval.batch_size"),
            "checkpoint": PlannedBytes(0, 0),  # its state dict holds the parameters themselves
            # one block of rows drawn on the host at a time (at most 16 MiB)
            "initialisation": PlannedBytes(
                0, min(_init_block_rows(dim), classes) * dim * 4, "a host with more memory"
            ),
        }
