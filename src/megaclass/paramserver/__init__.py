"""The classifier as a sharded service: a gRPC parameter server, its client, and row-sparse updaters.

The wire API is ``megaclass.proto`` (shipped here); ``megaclass paramserver serve`` runs one shard and
:class:`ParamServerClient` talks to all of them. Needs the ``ps`` extra (``grpcio``, ``protobuf``), loaded
only when a name below is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ParamServerClient": "client",
    "ParamServerError": "client",
    "PendingPull": "client",
    "RunningServer": "server",
    "ShardService": "server",
    "serve": "server",
    "ServerConfig": "config",
    "shard_range": "config",
    "OPTIMIZERS": "updaters",
    "HyperParams": "updaters",
    "apply_update": "updaters",
    "state_shapes": "updaters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megaclass.paramserver' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megaclass.paramserver.{_EXPORTS[name]}"), name)
