"""Where classifier rows live: on the compute device (``gpu``) or in pinned host memory (``host``), each with
a row-sparse optimizer (:mod:`megaclass.store.optim`). :func:`build_store` maps a store spec to a store.
"""

from __future__ import annotations

import torch

from megaclass.store.base import RowStore
from megaclass.store.optim import RowOptimizerConfig

__all__ = ["RowOptimizerConfig", "RowStore", "build_store"]


def build_store(
    spec: str,
    *,
    num_rows: int,
    dim: int,
    device: torch.device | str,
    optimizer: RowOptimizerConfig,
    seed: int = 0,
    init_bound: float | None = None,
) -> RowStore:
    """The row store that ``spec`` names: ``gpu`` (alias ``device``: rows on ``device``), ``host``, or
    ``ps://host:port[,host:port...]`` (parameter-server shards, which hold their own initial rows: start them
    with ``--seed`` for the matrix the other stores draw; ``optimizer`` settings are sent to them).

    >>> build_store("host", num_rows=4, dim=2, device="cpu", optimizer=RowOptimizerConfig()).num_rows
    4
    """
    options = dict(device=device, optimizer=optimizer, seed=seed, init_bound=init_bound)
    if spec in ("gpu", "device"):
        from megaclass.store.device import DeviceStore

        return DeviceStore(num_rows, dim, **options)
    if spec == "host":
        from megaclass.store.host import HostStore

        return HostStore(num_rows, dim, **options)
    if spec.startswith("ps://"):
        from megaclass.store.paramserver import ParamServerStore

        store = ParamServerStore(spec, device=device)
        if (store.num_rows, store.dim) != (num_rows, dim):
            raise ValueError(
                f"store {spec!r}: the servers hold {store.num_rows} x {store.dim} rows, "
                f"need {num_rows} x {dim}"
            )
        store.configure(optimizer)
        return store
    raise ValueError(f"store: unknown store {spec!r}; expected 'gpu', 'host' or 'ps://host:port,...'")
