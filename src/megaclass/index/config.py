"""Index configs, one frozen dataclass per registered selector, told apart by ``type``.

    head: {type: selected, index: {type: gpu, leaf_size: auto, probes: auto}}   # or index: annoy, exact, none

:func:`build_index` builds the selector a config names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megaclass.index.base import ClassSelector, Metric
from megaclass.schema import ConfigError

__all__ = [
    "AnnoyIndexConfig",
    "ClusterIndexConfig",
    "ExactIndexConfig",
    "IndexConfig",
    "NoIndexConfig",
    "build_index",
]


@dataclass(frozen=True)
class ClusterIndexConfig:
    """Balanced clusters of the rows searched by their centroids, on the compute device (rebuilds in ms)."""

    type: Literal["gpu"] = "gpu"
    leaf_size: int | Literal["auto"] = "auto"  # mean rows per cluster; auto: sqrt(C) / 16, at least 32
    # clusters searched per query (in every group); auto: the cheapest search (groups, then clusters in
    # them) reaching recall_target
    probes: int | Literal["auto"] = "auto"
    # recall@10 that auto probes reach on the build's sample of rows; 0.92 measures >= 0.9 on trained-like
    # rows at 10^4..10^6 (benchmarks/index_recall.py) with 2.4x fewer rows gathered at 10^6 than 0.95
    recall_target: float = 0.92
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = "auto"  # row snapshot; auto: bf16 on CUDA
    background: bool | Literal["auto"] = "auto"  # cold builds in a thread; auto: on CPU from 2^15 rows
    # a batch an exact scan answers for less than the search (ClusterIndex.query): scanned
    scan_when_cheaper: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.scan_when_cheaper, bool):
            raise ConfigError(
                f"head.index.scan_when_cheaper: expected true or false, got {self.scan_when_cheaper!r}"
            )
        if self.background not in (True, False, "auto"):
            raise ConfigError(f"head.index.background: expected true, false or auto, got {self.background!r}")
        for name in ("leaf_size", "probes"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"head.index.{name}: expected an integer >= 1 or auto, got {value!r}")
        if not 0 < self.recall_target <= 1:
            raise ConfigError(
                f"head.index.recall_target: expected a value in (0, 1], got {self.recall_target}"
            )


@dataclass(frozen=True)
class AnnoyIndexConfig:
    """The original's hashing forest (Annoy, angular), built on the host in a background thread."""

    type: Literal["annoy"] = "annoy"
    ntrees: int = 50  # trees in the forest
    search_k: int = -1  # nodes inspected per query (-1: n * ntrees)

    def __post_init__(self) -> None:
        if self.ntrees < 1:
            raise ConfigError(f"head.index.ntrees must be >= 1, got {self.ntrees}")


@dataclass(frozen=True)
class ExactIndexConfig:
    """An exact scan of every row (the recall reference; O(C) per query)."""

    type: Literal["exact"] = "exact"


@dataclass(frozen=True)
class NoIndexConfig:
    """No index: random classes only (Partial FC's rule)."""

    type: Literal["none"] = "none"


IndexConfig = ClusterIndexConfig | AnnoyIndexConfig | ExactIndexConfig | NoIndexConfig
"""Any registered index config; a scalar names the type with its defaults (``index: exact``)."""


def build_index(
    config: IndexConfig, *, metric: Metric | str, device: torch.device, seed: int, chunk_size: int
) -> ClassSelector | None:
    """The selector ``config`` describes over rows compared by ``metric``; None for :class:`NoIndexConfig`."""
    from megaclass.index import build_selector

    if isinstance(config, NoIndexConfig):
        return None
    if isinstance(config, AnnoyIndexConfig):
        return build_selector("annoy", ntrees=config.ntrees, search_k=config.search_k, seed=seed)
    if isinstance(config, ExactIndexConfig):
        return build_selector("exact", metric=metric, chunk_size=chunk_size)
    row_dtype = None if config.dtype == "auto" else config.dtype
    return build_selector(
        "gpu",
        metric=metric,
        leaf_size=None if config.leaf_size == "auto" else config.leaf_size,
        probes=None if config.probes == "auto" else config.probes,
        recall_target=config.recall_target,
        row_dtype=row_dtype,
        device=device,
        seed=seed,
        background=None if config.background == "auto" else config.background,
        scan_when_cheaper=config.scan_when_cheaper,
    )
