"""Where classifier rows live: on the compute device (``gpu``), in host memory (``host``), or in
parameter-server shards (``ps://``), each with a row-sparse optimizer (:mod:`megaclass.ops.row_optimizers`).
:func:`build_store` maps a store spec to a store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megaclass.ops.row_optimizers import RowOptimizerConfig
from megaclass.store.base import RowStore
from megaclass.store.local import LocalRows, RowDtype

if TYPE_CHECKING:
    from megaclass.store.paramserver import ParamServerStore

__all__ = ["RowDtype", "RowOptimizerConfig", "RowStore", "build_store"]


def build_store(
    spec: str,
    *,
    num_rows: int,
    dim: int,
    device: torch.device | str,
    optimizer: RowOptimizerConfig,
    seed: int = 0,
    init_bound: float | None = None,
    dtype: RowDtype | str = RowDtype.FLOAT32,
) -> RowStore:
    """The row store that ``spec`` names: ``gpu`` (alias ``device``: rows on ``device``), ``host``, or
    ``ps://host:port[,host:port...]`` (parameter-server shards, which hold their own initial rows: start them
    with ``--seed`` for the matrix the other stores draw; ``optimizer`` settings are sent to them).

    ``dtype``: ``float32``, or ``bf16_sr``: rows and their row-shaped optimizer state in bfloat16, updated
    with stochastic rounding (:class:`~megaclass.store.local.LocalRows`; ``ps://``: the dtype the shards were
    started with, ``--dtype``, which must match).

    >>> build_store("host", num_rows=4, dim=2, device="cpu", optimizer=RowOptimizerConfig()).num_rows
    4
    """
    device = torch.device(device)
    options = dict(optimizer=optimizer, seed=seed, init_bound=init_bound, draw_device=device, dtype=dtype)
    if spec in ("gpu", "device"):
        from megaclass.store.device import DeviceStore

        return DeviceStore(LocalRows(num_rows, dim, device=device, **options))
    if spec == "host":
        from megaclass.store.host import HostStore

        return HostStore(LocalRows(num_rows, dim, device="cpu", **options), device=device)
    if spec.startswith("ps://"):
        from megaclass.store.paramserver import ParamServerStore

        store = ParamServerStore(spec, device=device)
        try:
            _check_servers(store, spec, num_rows, dim, RowDtype(dtype))
            store.configure(optimizer)
        except ValueError:
            store.close()  # its shared buffers detached now, not when it is collected
            raise
        return store
    raise ValueError(f"store: unknown store {spec!r}; expected 'gpu', 'host' or 'ps://host:port,...'")


def _check_servers(store: ParamServerStore, spec: str, num_rows: int, dim: int, dtype: RowDtype) -> None:
    """Raise ``ValueError`` unless the servers behind ``store`` hold ``num_rows x dim`` rows as ``dtype``."""
    if (store.num_rows, store.dim) != (num_rows, dim):
        raise ValueError(
            f"store {spec!r}: the servers hold {store.num_rows} x {store.dim} rows, need {num_rows} x {dim}"
        )
    held = store.client.row_dtype
    if held != dtype.value:
        raise ValueError(
            f"store {spec!r}: the servers hold {held} rows but {dtype.value} rows were asked for; start "
            f"them with --dtype {dtype.value} or ask for {held} (head.store_dtype)"
        )
