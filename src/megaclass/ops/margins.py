"""Cosine margins for face recognition (ArcFace, CosFace), shared by the fused losses and the heads.

With L2-normalised features and class rows a logit is a cosine; a margin scores non-target classes
``s * cos(theta)`` and the target ``s * cos(theta + m)`` (ArcFace, arXiv 1801.07698) or
``s * (cos(theta) - m)`` (CosFace, arXiv 1801.09414).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megaclass.schema import ConfigError

__all__ = ["MarginConfig", "MarginKind", "margin_logits", "margin_target_logit"]


class MarginKind(str, enum.Enum):
    """Which margin the target's logit gets: none (plain dot products), ArcFace's angle, CosFace's cosine."""

    NONE = "none"
    ARCFACE = "arcface"
    COSFACE = "cosface"


@dataclass(frozen=True)
class MarginConfig:
    """A cosine margin: ``kind`` none leaves logits as plain dot products."""

    kind: MarginKind = MarginKind.NONE
    scale: float = 64.0  # s: the cosine's range [-1, 1] is too narrow for a softmax over many classes
    margin: float = 0.5  # m: ArcFace's additive angle (radians), CosFace's additive cosine (use ~0.35)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", MarginKind(self.kind))
        except ValueError:
            raise ConfigError(
                f"margin.kind must be one of {[k.value for k in MarginKind]}, got {self.kind!r}"
            ) from None
        if self.scale <= 0:
            raise ConfigError(f"margin.scale must be > 0, got {self.scale}")
        if not 0 <= self.margin < math.pi / 2:
            raise ConfigError(f"margin.margin must be in [0, pi/2), got {self.margin}")

    @property
    def enabled(self) -> bool:
        return self.kind is not MarginKind.NONE


def margin_target_logit(cosine: Tensor, config: MarginConfig) -> Tensor:
    """Scaled target logit ``s * psi(cos)`` for the target cosines ``(N,)``.

    ArcFace uses ``cos(theta + m)`` while ``theta + m <= pi`` and, beyond it, the monotone continuation
    ``cos(theta) - m * sin(m)`` (InsightFace's rule), so the logit never rises as ``theta`` grows.
    """
    if config.kind is MarginKind.COSFACE:
        return config.scale * (cosine - config.margin)
    if config.kind is MarginKind.ARCFACE:
        cos_m, sin_m = math.cos(config.margin), math.sin(config.margin)
        sine = torch.sqrt((1.0 - cosine * cosine).clamp_min(1e-12))
        shifted = cosine * cos_m - sine * sin_m
        threshold = math.cos(math.pi - config.margin)
        fallback = cosine - config.margin * sin_m
        return config.scale * torch.where(cosine > threshold, shifted, fallback)
    return cosine


def margin_logits(cosine: Tensor, target_position: Tensor, config: MarginConfig) -> Tensor:
    """Logits ``(B, S)`` from cosines ``(B, S)``: every entry scaled by ``s``, the target's with its margin.

    Args:
        cosine: ``(B, S)`` cosines between normalised features and normalised class rows.
        target_position: ``(B,)`` column of each row's target; ``-1`` for a row whose target is absent.
    """
    if not config.enabled:
        return cosine
    logits = cosine * config.scale
    rows = torch.nonzero(target_position >= 0).squeeze(1)
    columns = target_position[rows]
    target = margin_target_logit(cosine[rows, columns].float(), config).to(logits.dtype)
    return logits.index_put((rows, columns), target)
