"""Cosine margins against their formulas in float64 (ArcFace's angle through ``acos``), and their configs."""

from __future__ import annotations

import math

import pytest
import torch

from megaclass.ops.margins import MarginConfig, MarginKind, margin_logits, margin_target_logit
from megaclass.schema import ConfigError

COSINES = torch.linspace(-1.0, 1.0, 401, dtype=torch.float64)


@pytest.mark.parametrize("margin", [0.1, 0.5, 1.2])
def test_arcface_is_the_shifted_angle_then_its_monotone_continuation(margin: float) -> None:
    config = MarginConfig(kind="arcface", scale=16.0, margin=margin)
    got = margin_target_logit(COSINES, config)
    theta = torch.acos(COSINES)
    shifted = torch.cos(theta + margin)
    continuation = COSINES - margin * math.sin(margin)
    want = 16.0 * torch.where(theta + margin <= math.pi, shifted, continuation)
    # atol: the sine is clamped at 1e-6 (a finite gradient at cos = +-1), which moves s * cos(theta + m) there
    torch.testing.assert_close(got, want, rtol=0, atol=16.0 * 1e-6)
    assert torch.all(got.diff() >= -1e-9), "the target logit must not fall as the cosine grows"


def test_cosface_subtracts_the_margin_and_none_is_the_identity() -> None:
    cosface = MarginConfig(kind=MarginKind.COSFACE, scale=30.0, margin=0.35)
    torch.testing.assert_close(margin_target_logit(COSINES, cosface), 30.0 * (COSINES - 0.35))
    assert margin_target_logit(COSINES, MarginConfig()) is COSINES


def test_margin_logits_scales_every_entry_and_margins_the_targets() -> None:
    config = MarginConfig(kind="cosface", scale=4.0, margin=0.25)
    cosine = torch.rand(4, 6) * 2 - 1
    position = torch.tensor([2, -1, 0, 5])  # row 1: its target is absent
    logits = margin_logits(cosine, position, config)
    want = 4.0 * cosine
    for row, column in ((0, 2), (2, 0), (3, 5)):
        want[row, column] = 4.0 * (cosine[row, column] - 0.25)
    torch.testing.assert_close(logits, want)
    plain = torch.rand(2, 3)
    assert margin_logits(plain, torch.tensor([0, 1]), MarginConfig()) is plain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sphereface"}, "margin.kind"),
        ({"scale": 0.0}, "margin.scale"),
        ({"margin": -0.1}, "margin.margin"),
        ({"margin": math.pi / 2}, "margin.margin"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MarginConfig(**kwargs)


def test_config_takes_kind_names() -> None:
    assert MarginConfig(kind="arcface").kind is MarginKind.ARCFACE and MarginConfig(kind="arcface").enabled
    assert not MarginConfig().enabled
