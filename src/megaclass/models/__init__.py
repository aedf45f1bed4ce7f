"""Encoders: ``inputs -> features (B, D)``, one file per family, selected by a short registered name.

An encoder is built as ``EncoderClass(config, input_spec)`` from its frozen config dataclass (whose first
field is ``type: Literal["<name>"]``) and the :class:`~megaclass.data.batch.InputSpec` of the data; it
has an ``out_features`` attribute (``D``) and ``forward(inputs) -> (B, D)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from megaclass.schema import ConfigError, from_dict

__all__ = ["build_model", "model_config", "model_types"]


def model_types() -> dict[str, tuple[type, type[nn.Module]]]:
    """Registered encoder names and their ``(ConfigClass, EncoderClass)``."""
    from megaclass.models.iresnet import IResNet, IResNetConfig
    from megaclass.models.mlp import MLPConfig, MLPEncoder
    from megaclass.models.mobilefacenet import MobileFaceNet, MobileFaceNetConfig
    from megaclass.models.text import TransformerConfig, TransformerEncoder

    return {
        "mlp": (MLPConfig, MLPEncoder),
        "iresnet18": (IResNetConfig, IResNet),
        "iresnet34": (IResNetConfig, IResNet),
        "iresnet50": (IResNetConfig, IResNet),
        "iresnet100": (IResNetConfig, IResNet),
        "mobilefacenet": (MobileFaceNetConfig, MobileFaceNet),
        "transformer": (TransformerConfig, TransformerEncoder),
    }


def model_config(data: dict[str, Any] | None) -> Any:
    """Parse ``{type: name, **options}`` into that encoder's frozen config dataclass (``mlp`` by default).

    >>> model_config({"type": "mlp", "hidden": [256]}).hidden
    (256,)
    """
    data = {"type": "mlp", **(data or {})}
    types = model_types()
    if data["type"] not in types:
        raise ConfigError(f"model.type: unknown model {data['type']!r}; known: {', '.join(sorted(types))}")
    return from_dict(types[data["type"]][0], data, where="model")


def build_model(config: Any, input_spec: Any) -> nn.Module:
    """Build the encoder that ``config`` (a registered model config) describes for data of ``input_spec``."""
    for config_class, model_class in model_types().values():
        if isinstance(config, config_class):
            return model_class(config, input_spec)
    raise ConfigError(f"not a registered model config: {config!r}")
