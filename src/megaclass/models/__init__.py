"""Encoders: ``inputs -> features (B, D)``, one file per family, selected by a short registered name.

An encoder is built as ``EncoderClass(config, input_spec)`` from its frozen config dataclass (whose first
field is ``type: Literal["<name>"]``) and the :class:`~megaclass.data.batch.InputSpec` of the data; it
has an ``out_features`` attribute (``D``) and ``forward(inputs) -> (B, D)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from megaclass.models.iresnet import IResNet, IResNetConfig
from megaclass.models.mlp import MLPConfig, MLPEncoder
from megaclass.models.mobilefacenet import MobileFaceNet, MobileFaceNetConfig
from megaclass.models.text import TransformerConfig, TransformerEncoder
from megaclass.schema import ConfigError, from_dict

__all__ = ["ModelConfig", "build_model", "model_config", "model_types"]

ModelConfig = MLPConfig | IResNetConfig | MobileFaceNetConfig | TransformerConfig
"""Any registered encoder config."""


def model_types() -> dict[str, tuple[type, type[nn.Module]]]:
    """Registered encoder names and their ``(ConfigClass, EncoderClass)``."""
    return {
        "mlp": (MLPConfig, MLPEncoder),
        "iresnet18": (IResNetConfig, IResNet),
        "iresnet34": (IResNetConfig, IResNet),
        "iresnet50": (IResNetConfig, IResNet),
        "iresnet100": (IResNetConfig, IResNet),
        "mobilefacenet": (MobileFaceNetConfig, MobileFaceNet),
        "transformer": (TransformerConfig, TransformerEncoder),
    }


def model_config(data: dict[str, Any] | None) -> ModelConfig:
    """Parse ``{type: name, **options}`` into that encoder's frozen config dataclass (``mlp`` by default).

    >>> model_config({"type": "mlp", "hidden": [256]}).hidden
    (256,)
    """
    data = {"type": "mlp", **(data or {})}
    types = model_types()
    if data["type"] not in types:
        raise ConfigError(f"model.type: unknown model {data['type']!r}; known: {', '.join(sorted(types))}")
    return from_dict(types[data["type"]][0], data, where="model")


def build_model(config: ModelConfig, input_spec: Any) -> nn.Module:
    """Build the encoder that ``config`` (a registered model config) describes for data of ``input_spec``."""
    return model_types()[config.type][1](config, input_spec)
