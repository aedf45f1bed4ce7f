"""Output strategies: one ``Head`` interface, one file per strategy, selected by a short registered name."""

from __future__ import annotations

from typing import Any

from megaclass.heads.base import Head, HeadContext
from megaclass.schema import ConfigError, from_dict

__all__ = ["Head", "HeadContext", "build_head", "head_config", "head_types"]


def head_types() -> dict[str, tuple[type, type[Head]]]:
    """Registered head names and their ``(ConfigClass, HeadClass)``.

    Each config class is a frozen dataclass whose first field is ``type: Literal["<name>"]``.
    """
    from megaclass.heads.dense import DenseHead, DenseHeadConfig
    from megaclass.heads.partial_fc import PartialFCConfig, PartialFCHead
    from megaclass.heads.selected import SelectedHead, SelectedHeadConfig
    from megaclass.heads.sparse import SparseHead, SparseHeadConfig

    return {
        "dense": (DenseHeadConfig, DenseHead),
        "sparse": (SparseHeadConfig, SparseHead),
        "selected": (SelectedHeadConfig, SelectedHead),
        "partial_fc": (PartialFCConfig, PartialFCHead),
    }


def head_config(data: dict[str, Any]) -> Any:
    """Parse ``{type: name, **options}`` into that head's frozen config dataclass."""
    data = {"type": "dense", **data}
    types = head_types()
    if data["type"] not in types:
        raise ConfigError(f"head.type: unknown head {data['type']!r}; known: {', '.join(sorted(types))}")
    return from_dict(types[data["type"]][0], data, where="head")


def build_head(config: Any, context: HeadContext) -> Head:
    """Build the head that ``config`` (a registered head config) describes."""
    for config_class, head_class in head_types().values():
        if isinstance(config, config_class):
            return head_class(config, context)
    raise ConfigError(f"not a registered head config: {config!r}")
