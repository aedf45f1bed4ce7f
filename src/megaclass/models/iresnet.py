"""IResNet face backbones (IResNet-18/34/50/100), as InsightFace's ``arcface_torch`` builds them.

``megaclass train --train faces/train.rec --set model.type=iresnet50 --set head.margin.kind=arcface``

An improved residual network (Duta et al., arXiv 2004.04989, as used by ArcFace, arXiv 1801.07698): a 3x3
stem at full resolution, four stages of pre-activation basic blocks (BN-conv-BN-PReLU-conv-BN) each halving
the resolution, then the embedding: BN, dropout, a fully connected layer over the flattened ``7 x 7`` map of
a ``112 x 112`` face, and a BatchNorm1d without learnt scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from megaclass.data.images import flip_images, normalize_images
from megaclass.schema import ConfigError

__all__ = ["IResNet", "IResNetConfig", "check_image_input", "prepare_images"]

_DEPTHS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


@dataclass(frozen=True)
class IResNetConfig:
    """An IResNet; ``type`` picks the depth, which ``layers`` may override (tiny nets for tests)."""

    type: Literal["iresnet18", "iresnet34", "iresnet50", "iresnet100"] = "iresnet50"
    embedding_size: int = 512  # D: the face embedding; 512 in ArcFace, 256 saves head memory at 10^7 ids
    layers: tuple[int, ...] | None = None  # blocks per stage; None takes the depth from ``type``
    widths: tuple[int, ...] = (64, 128, 256, 512)  # channels per stage; the stem has widths[0]
    dropout: float = 0.0  # before the embedding FC; InsightFace uses 0 on large data, 0.4 on small
    input_size: int = 112  # side of the square input faces; the FC sees ceil(input_size / 16)^2 positions
    zero_init_residual: bool = False  # start each block as the identity (last BN scale 0)
    flip: bool = True  # training only: mirror a random half of each batch, on the device (InsightFace's aug)

    @property
    def out_features(self) -> int:
        """``D``, the embedding width (known from the config alone)."""
        return self.embedding_size

    def __post_init__(self) -> None:
        if self.embedding_size <= 0:
            raise ConfigError(f"model.embedding_size: expected > 0, got {self.embedding_size}")
        if self.layers is not None and (len(self.layers) != 4 or min(self.layers) < 1):
            raise ConfigError(f"model.layers: expected 4 block counts >= 1, got {list(self.layers)}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ConfigError(f"model.widths: expected 4 positive channel counts, got {list(self.widths)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: expected a value in [0, 1), got {self.dropout}")
        if self.input_size < 16:
            raise ConfigError(f"model.input_size: expected >= 16, got {self.input_size}")

    @property
    def depths(self) -> tuple[int, ...]:
        return self.layers if self.layers is not None else _DEPTHS[self.type]


def check_image_input(input_spec: Any, name: str) -> None:
    """Raise :class:`ConfigError` unless the data gives images."""
    kind = getattr(input_spec, "kind", "image")
    if kind != "image":
        raise ConfigError(f"model.type={name} needs image data, but the training data gives {kind!r} inputs")


def prepare_images(images: Tensor, input_size: int, *, flip: bool = False) -> Tensor:
    """Float images in ``[-1, 1]`` of side ``input_size``, from uint8 ``(B, 3, H, W)`` or floats in range.

    With ``flip``, a random half of the images (drawn from torch's RNG on their device) is mirrored.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = normalize_images(images)  # [0, 255] -> [-1, 1]
    if flip:
        mirror = torch.rand(images.shape[0], device=images.device) < 0.5  # (B,)
        images = torch.where(mirror[:, None, None, None], flip_images(images), images)
    if images.shape[-1] != input_size or images.shape[-2] != input_size:
        images = nn.functional.interpolate(
            images, size=(input_size, input_size), mode="bilinear", antialias=True
        )
    return images


def _halved(size: int, times: int) -> int:
    for _ in range(times):
        size = (size + 1) // 2  # a 3x3 stride-2 conv with padding 1
    return size


class IBasicBlock(nn.Module):
    """BN, 3x3 conv, BN, PReLU, 3x3 conv (carrying the stride), BN; plus the (projected) input."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """Faces ``(B, 3, S, S)`` (uint8, or float in ``[-1, 1]``) to embeddings ``(B, D)``.

    >>> config = IResNetConfig(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8), embedding_size=16, input_size=32)
    >>> net = IResNet(config)
    >>> net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
    torch.Size([2, 16])
    """

    def __init__(self, config: IResNetConfig, input_spec: Any = None) -> None:
        super().__init__()
        check_image_input(input_spec, config.type)
        self.config = config
        self.out_features = config.embedding_size
        stem = config.widths[0]
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=1e-5)
        self.prelu = nn.PReLU(stem)
        stages, in_channels = [], stem
        for channels, blocks in zip(config.widths, config.depths, strict=True):
            stage = [IBasicBlock(in_channels, channels, 2)] + [
                IBasicBlock(channels, channels, 1) for _ in range(blocks - 1)
            ]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(config.dropout)
        side = _halved(config.input_size, 4)
        self.fc = nn.Linear(in_channels * side * side, config.embedding_size)
        self.features = nn.BatchNorm1d(config.embedding_size, eps=1e-5)
        self.features.weight.requires_grad_(False)  # InsightFace fixes the final BN's scale at 1
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.zero_init_residual:
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.zeros_(module.bn3.weight)

    def forward(self, images: Tensor) -> Tensor:
        x = prepare_images(images, self.config.input_size, flip=self.training and self.config.flip)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)  # (B, C4 * s * s)
        return self.features(self.fc(self.dropout(x)))  # (B, D)
