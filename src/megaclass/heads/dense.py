"""The exact head: every class scored, the loss fused with the ``x @ W^T`` matmul, chunked over classes.

Memory is ``O(B x chunk)`` for the logits (the Triton kernels on CUDA hold one tile per program); the weight
and
its gradient stay fp32 master copies. Every approximate head is measured against this one.

    megaclass train --train train.txt --test test.txt --out runs/dense --head dense --set head.loss=bce
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from megaclass.heads.base import Head, HeadContext
from megaclass.ops.chunked_topk import chunked_topk
from megaclass.ops.linear_cross_entropy import LinearLossOptions, LossKind, linear_loss
from megaclass.ops.margins import MarginConfig
from megaclass.schema import ConfigError
from megaclass.targets import Targets

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
    impl: Literal["auto", "triton", "torch", "reference"] = "auto"  # auto: fastest measured on CUDA

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"head.chunk_size must be >= 1, got {self.chunk_size}")
        if self.init_scale < 0:
            raise ConfigError(f"head.init_scale must be >= 0, got {self.init_scale}")
        if self.bias is None:
            object.__setattr__(self, "bias", not self.margin.enabled)
        if self.margin.enabled and self.bias:
            raise ConfigError("head.bias must be false with a cosine margin (head.margin.kind != none)")
        if self.margin.enabled and self.loss not in ("auto", "softmax"):
            raise ConfigError(f"head.margin needs head.loss softmax, got {self.loss!r}")


class DenseHead(Head):
    """Exact linear head over all ``C`` classes with a fused, class-chunked loss.

    Args:
        config: loss, bias, margin, chunking.
        context: ``in_features`` (D), ``num_classes`` (C), ``multilabel``.

    >>> head = DenseHead(DenseHeadConfig(), HeadContext(in_features=8, num_classes=100, multilabel=False))
    >>> loss = head(torch.randn(4, 8), torch.tensor([1, 2, 3, 99]))
    >>> scores, ids = head.topk(torch.randn(4, 8), k=5)
    >>> tuple(ids.shape)
    (4, 5)
    """

    def __init__(self, config: DenseHeadConfig, context: HeadContext) -> None:
        super().__init__()
        if context.in_features < 1 or context.num_classes < 1:
            raise ValueError(f"DenseHead needs in_features and num_classes >= 1, got {context}")
        loss = config.loss
        if loss == "auto":
            loss = "bce" if context.multilabel else "softmax"
        if config.margin.enabled and context.multilabel:
            raise ConfigError(
                "head.margin needs multi-class data (one label per sample), the data is multi-label"
            )
        self.config = config
        self.context = context
        self.options = LinearLossOptions(
            loss=LossKind(loss),
            reduction=config.reduction,
            margin=config.margin,
            chunk_size=config.chunk_size,
        )
        self.weight = nn.Parameter(torch.empty(context.num_classes, context.in_features))
        self.bias = nn.Parameter(torch.zeros(context.num_classes)) if config.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows ~ N(0, (init_scale / sqrt(D))^2), bias zero."""
        nn.init.normal_(self.weight, std=self.config.init_scale / math.sqrt(self.context.in_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _compute_input(self, features: Tensor) -> Tensor:
        """``features`` in the compute dtype: the autocast dtype where autocast is on, else as given."""
        if features.dim() != 2 or features.shape[1] != self.context.in_features:
            raise ValueError(
                f"features must be (B, D={self.context.in_features}), got shape {tuple(features.shape)}"
            )
        device_type = features.device.type
        if torch.is_autocast_enabled(device_type):
            return features.to(torch.get_autocast_dtype(device_type))
        return features

    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """Scalar loss of ``features (B, D)`` against ``targets`` (``LongTensor (B,)`` or ragged labels)."""
        x = self._compute_input(features)
        return linear_loss(
            x, self.weight, targets, bias=self.bias, options=self.options, impl=self.config.impl
        )

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, ids)`` of the logits, each ``(B, k)``, in chunks of ``chunk_size`` classes."""
        margin = self.config.margin
        return chunked_topk(
            self._compute_input(features),
            self.weight,
            k,
            bias=self.bias,
            cosine=margin.enabled,
            scale=margin.scale,
            chunk_size=self.config.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.context.in_features}, num_classes={self.context.num_classes}, "
            f"loss={self.options.loss.value}, bias={self.bias is not None}, "
            f"margin={self.config.margin.kind.value}"
        )
