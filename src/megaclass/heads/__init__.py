"""Output strategies: one ``Head`` interface, one file per strategy, selected by a short registered name."""

from __future__ import annotations

import dataclasses
from typing import Any

from megaclass.heads.base import ClassShard, Head, HeadContext, LabelFeatures, is_streamed_entry
from megaclass.heads.dense import DenseHead, DenseHeadConfig
from megaclass.heads.selected import PARTIAL_FC_DEFAULTS, SelectedHead, SelectedHeadConfig
from megaclass.heads.sparse import SparseHead, SparseHeadConfig
from megaclass.schema import ConfigError, from_dict

__all__ = [
    "ClassShard",
    "Head",
    "HeadConfig",
    "HeadContext",
    "LabelFeatures",
    "build_head",
    "head_class",
    "head_config",
    "head_types",
    "is_streamed_entry",
]

HeadConfig = DenseHeadConfig | SparseHeadConfig | SelectedHeadConfig
"""Any registered head config."""

_DEFAULTS: dict[str, dict[str, Any]] = {"partial_fc": PARTIAL_FC_DEFAULTS}  # a name's own defaults


def head_types() -> dict[str, tuple[type, type[Head]]]:
    """Registered head names and their ``(ConfigClass, HeadClass)``.

    Each config class is a frozen dataclass whose first field is ``type: Literal[...]`` naming it; one
    class may serve several names (``partial_fc`` is the selected head with its index off).
    """
    return {
        "dense": (DenseHeadConfig, DenseHead),
        "sparse": (SparseHeadConfig, SparseHead),
        "selected": (SelectedHeadConfig, SelectedHead),
        "partial_fc": (SelectedHeadConfig, SelectedHead),
    }


def head_config(data: dict[str, Any]) -> HeadConfig:
    """Parse ``{type: name, **options}`` into that head's frozen config dataclass (``dense`` by default).

    >>> head_config({"type": "partial_fc"}).index.type
    'none'
    """
    data = {"type": "dense", **data}
    types = head_types()
    if data["type"] not in types:
        raise ConfigError(f"head.type: unknown head {data['type']!r}; known: {', '.join(sorted(types))}")
    config_class = types[data["type"]][0]
    known = _field_names(config_class)
    for key in data:
        owners = sorted(name for name, (other, _) in types.items() if key in _field_names(other))
        if key not in known and owners:
            raise ConfigError(
                f"head.{key}: a setting of the {' and '.join(owners)} head{'s' * (len(owners) > 1)}, not "
                f"of the {data['type']} head (--head {' or --head '.join(owners)})",
                key=f"head.{key}",
            )
    return from_dict(config_class, {**_DEFAULTS.get(data["type"], {}), **data}, where="head")


def _field_names(config_class: type) -> set[str]:
    return {field.name for field in dataclasses.fields(config_class)}


def head_class(config: HeadConfig) -> type[Head]:
    """The head class that builds ``config``."""
    return head_types()[config.type][1]


def build_head(config: HeadConfig, context: HeadContext, shard: ClassShard | None = None) -> Head:
    """Build the head that ``config`` describes; ``shard``: the class range this process holds (None: all).

    >>> head = build_head(head_config({"type": "dense"}), HeadContext(8, 100, multilabel=False))
    >>> head.row_range()
    (0, 100, 100)
    """
    return head_class(config)(config, context, shard)
