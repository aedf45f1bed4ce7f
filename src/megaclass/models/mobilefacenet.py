"""MobileFaceNet: a light face backbone (Chen et al., arXiv 1804.07573), as InsightFace's ``arcface_torch``.

``megaclass train --train faces/train.rec --set model.type=mobilefacenet --set head.margin.kind=arcface``

Inverted-residual depthwise blocks over four halvings of the input, a 1x1 conv to ``8u`` channels, then the
global depthwise conv (GDC: a depthwise conv over the whole final map), a linear layer and BatchNorm1d.
Channel counts are multiples of a unit ``u = 64 * width`` (InsightFace: ``width=1``, ``scale=2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from megaclass.models.iresnet import _halved, check_image_input, prepare_images
from megaclass.schema import ConfigError

__all__ = ["MobileFaceNet", "MobileFaceNetConfig"]


@dataclass(frozen=True)
class MobileFaceNetConfig:
    """A MobileFaceNet; ``width`` below 1 gives the small nets CPU tests train."""

    type: Literal["mobilefacenet"] = "mobilefacenet"
    embedding_size: int = 512  # D: the face embedding
    blocks: tuple[int, ...] = (1, 4, 6, 2)  # residual depthwise blocks of the four stages
    scale: int = 2  # stage widths are 1u, 1u, 2u, 2u times scale (InsightFace's "mbf" uses 2)
    width: float = 1.0  # u = round(64 * width) channels; 0.125 for a net that trains in seconds on a CPU
    input_size: int = 112  # side of the square input faces; the GDC kernel covers ceil(input_size / 16)^2
    flip: bool = True  # training only: mirror a random half of each batch, on the device (InsightFace's aug)

    @property
    def out_features(self) -> int:
        """``D``, the embedding width (known from the config alone)."""
        return self.embedding_size

    def __post_init__(self) -> None:
        if self.embedding_size <= 0:
            raise ConfigError(f"model.embedding_size: expected > 0, got {self.embedding_size}")
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise ConfigError(f"model.blocks: expected 4 block counts >= 1, got {list(self.blocks)}")
        if self.scale < 1:
            raise ConfigError(f"model.scale: expected >= 1, got {self.scale}")
        if not 0 < self.width <= 8 or round(64 * self.width) < 1:
            raise ConfigError(
                f"model.width: expected a value in (0, 8] giving >= 1 channel, got {self.width}"
            )
        if self.input_size < 16:
            raise ConfigError(f"model.input_size: expected >= 16, got {self.input_size}")


def _conv(in_c: int, out_c: int, kernel: int, stride: int, groups: int, *, activation: bool) -> nn.Sequential:
    """Conv (no bias), BN and, with ``activation``, PReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_c),
    ]
    if activation:
        layers.append(nn.PReLU(out_c))
    return nn.Sequential(*layers)


class DepthWise(nn.Module):
    """1x1 expand to ``hidden``, 3x3 depthwise (with the stride), linear 1x1 projection; optional residual."""

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int, *, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            _conv(in_c, hidden, 1, 1, 1, activation=True),
            _conv(hidden, hidden, 3, stride, hidden, activation=True),
            _conv(hidden, out_c, 1, 1, 1, activation=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """Faces ``(B, 3, S, S)`` (uint8, or float in ``[-1, 1]``) to embeddings ``(B, D)``.

    >>> import torch
    >>> config = MobileFaceNetConfig(width=0.125, blocks=(1, 1, 1, 1), embedding_size=8, input_size=32)
    >>> net = MobileFaceNet(config)
    >>> net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
    torch.Size([2, 8])
    """

    def __init__(self, config: MobileFaceNetConfig, input_spec: Any = None) -> None:
        super().__init__()
        check_image_input(input_spec, config.type)
        self.config = config
        self.out_features = config.embedding_size
        unit, scale = round(64 * config.width), config.scale
        first, second = unit * scale, 2 * unit * scale
        layers: list[nn.Module] = [_conv(3, first, 3, 2, 1, activation=True)]
        if config.blocks[0] == 1:
            layers.append(_conv(first, first, 3, 1, unit, activation=True))
        else:
            layers += [DepthWise(first, first, 2 * unit, 1, residual=True) for _ in range(config.blocks[0])]
        layers.append(DepthWise(first, first, 2 * unit, 2, residual=False))
        layers += [DepthWise(first, first, 2 * unit, 1, residual=True) for _ in range(config.blocks[1])]
        layers.append(DepthWise(first, second, 4 * unit, 2, residual=False))
        layers += [DepthWise(second, second, 4 * unit, 1, residual=True) for _ in range(config.blocks[2])]
        layers.append(DepthWise(second, second, 8 * unit, 2, residual=False))
        layers += [DepthWise(second, second, 4 * unit, 1, residual=True) for _ in range(config.blocks[3])]
        layers.append(_conv(second, 8 * unit, 1, 1, 1, activation=True))
        self.layers = nn.Sequential(*layers)
        side = _halved(config.input_size, 4)
        self.gdc = nn.Sequential(
            nn.Conv2d(8 * unit, 8 * unit, side, groups=8 * unit, bias=False),  # global depthwise conv
            nn.BatchNorm2d(8 * unit),
            nn.Flatten(),
            nn.Linear(8 * unit, config.embedding_size, bias=False),
            nn.BatchNorm1d(config.embedding_size),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        x = prepare_images(images, self.config.input_size, flip=self.training and self.config.flip)
        x = self.layers(x)  # (B, 8u, s, s)
        return self.gdc(x)  # (B, D)
