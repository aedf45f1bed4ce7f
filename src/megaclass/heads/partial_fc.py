"""Partial FC's random class sampling (An et al., "Partial FC", ICCV 2021 workshops): each step's softmax runs
over the batch's true classes plus uniformly random other classes, ``sample_rate`` of all classes in total.

    megaclass train ... --head partial_fc --set head.sample_rate=0.1

The baseline for :mod:`megaclass.heads.selected`: the same active-set head, store, optimizers and margins,
with the index switched off (one selection rule, :func:`megaclass.index.select_active`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megaclass.heads.base import HeadContext
from megaclass.heads.selected import SelectedHead, SelectedHeadConfig
from megaclass.ops.margins import MarginConfig
from megaclass.schema import ConfigError
from megaclass.store import RowOptimizerConfig

__all__ = ["PartialFCConfig", "PartialFCHead"]


@dataclass(frozen=True)
class PartialFCConfig:
    """Options of :class:`PartialFCHead`."""

    type: Literal["partial_fc"] = "partial_fc"
    sample_rate: float = 0.1  # share of the classes active per step (Partial FC's default)
    store: str = "gpu"  # where rows live: gpu or host
    optimizer: RowOptimizerConfig = field(default_factory=RowOptimizerConfig)  # row-sparse, on the store
    margin: MarginConfig = field(default_factory=MarginConfig)  # ArcFace / CosFace
    logq_correction: bool = False  # add log(1/q) to the random classes' logits
    coverage_every: int = 1000  # steps between exact coverage measurements (0: never)
    chunk_size: int = 8192  # classes scored at once in topk and coverage
    init_bound: float | None = None  # rows start U(-b, b); None: 1 / sqrt(D)
    seed: int = 0  # seeds the rows and the random classes

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"head.sample_rate must be in (0, 1], got {self.sample_rate}")

    def as_selected(self, num_classes: int) -> SelectedHeadConfig:
        """The :class:`SelectedHeadConfig` of the same head with the index off."""
        return SelectedHeadConfig(
            sample_num=max(1, math.ceil(self.sample_rate * num_classes)),
            index="none",
            store=self.store,
            optimizer=self.optimizer,
            margin=self.margin,
            logq_correction=self.logq_correction,
            coverage_every=self.coverage_every,
            chunk_size=self.chunk_size,
            init_bound=self.init_bound,
            seed=self.seed,
        )


class PartialFCHead(SelectedHead):
    """Softmax over positives plus uniformly random classes (:class:`SelectedHead` without an index).

    >>> head = PartialFCHead(PartialFCConfig(sample_rate=0.2), HeadContext(in_features=4, num_classes=50,
    ...                      multilabel=False))
    >>> head.config.sample_num, head.config.index
    (10, 'none')
    """

    def __init__(self, config: PartialFCConfig, context: HeadContext) -> None:
        super().__init__(config.as_selected(context.num_classes), context)
        self.partial_fc_config = config
