"""MobileFaceNet (arcface_torch's mbf): parameter count, shapes and gradients, input handling, config."""

import pytest
import torch
import torch.nn.functional as F

from megaclass.data.batch import InputSpec
from megaclass.models import build_model, model_config
from megaclass.models.mobilefacenet import MobileFaceNet, MobileFaceNetConfig
from megaclass.schema import ConfigError

TINY_MBF = {"width": 0.0625, "blocks": (1, 1, 1, 1), "scale": 1}


def test_full_size_parameter_count_matches_insightface():
    """arcface_torch's mbf (scale 2) at 512-d: the count its model zoo reports."""
    model = build_model(model_config({"type": "mobilefacenet"}), InputSpec(kind="image"))
    assert sum(p.numel() for p in model.parameters()) == 2_059_520
    assert model.out_features == 512


@pytest.mark.parametrize("input_size", [112, 56, 33, 16])
@pytest.mark.parametrize("embedding_size", [1, 7, 256])
@pytest.mark.parametrize("batch", [2, 3])
def test_shapes_and_gradients(input_size, embedding_size, batch):
    config = MobileFaceNetConfig(embedding_size=embedding_size, input_size=input_size, **TINY_MBF)
    model = MobileFaceNet(config)
    images = torch.randint(0, 256, (batch, 3, input_size, input_size), dtype=torch.uint8)
    features = model(images)
    assert features.shape == (batch, embedding_size) and features.dtype == torch.float32
    features.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_uint8_input_is_normalised_and_resized():
    model = MobileFaceNet(MobileFaceNetConfig(embedding_size=8, input_size=32, **TINY_MBF)).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    resized = F.interpolate((images.float() - 127.5) / 127.5, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(model(images), model(resized), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, message", [({"blocks": (1, 0, 1, 1)}, "model.blocks"), ({"width": 0.001}, "model.width")]
)
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        MobileFaceNetConfig(**options)


def test_needs_image_data():
    with pytest.raises(ConfigError, match="needs image data"):
        build_model(model_config({"type": "mobilefacenet"}), InputSpec(kind="sparse", num_features=10))
