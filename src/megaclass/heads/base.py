"""The ``Head`` interface every output strategy implements, and what a head is told when it is built.

A head is built as ``HeadClass(config, context, shard=None)``. ``shard`` is the contiguous class range this
process holds (:class:`~megaclass.ops.collectives.ClassShard`): None for a head that holds every class; a
head given a shard gathers the global batch's features and targets over the shard's process group and
computes the whole head's loss with the ops' collective forms. Sharding is a parameter, not a subclass.

Everything the trainer calls is defined here with a default, so the trainer never asks a head what it
offers: binding an optimizer, rewired connections, initial rows, how its state splits over ranks, and
whether it uses label features.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from megaclass.ops.collectives import ClassShard, gather_rows, gather_targets, world_of
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels, Targets

if TYPE_CHECKING:
    from megaclass.store.average import RowAverage

__all__ = [
    "ClassShard",
    "Head",
    "HeadContext",
    "LabelFeatures",
    "PlanRequest",
    "PlannedBytes",
    "RaggedLabels",
    "StateKind",
    "Targets",
    "is_streamed_entry",
]

StateKind = Literal["rows", "groups", "rank"]
"""How a state entry splits across ranks: ``rows`` (leading dimension: the head's rows ``[start, stop)`` of
:meth:`Head.row_range`), ``groups`` (leading dimension: groups of :attr:`Head.row_group` rows), ``rank``
(private to the rank: rebuilt when the world size changes). Entries not named are replicated."""


def is_streamed_entry(name: str) -> bool:
    """Whether the head state entry ``name`` is a row store's (``store.weight``, ``store.optim.<name>``),
    which a head loads from a :class:`~megaclass.state_io.RowSource` a block of rows at a time: loaders
    leave those in their files rather than read them whole."""
    return name.startswith("store.")


class LabelFeatures(str, enum.Enum):
    """How a head uses per-label feature vectors (``HeadContext.label_features``)."""

    UNUSED = "unused"
    WANTED = "wanted"  # they help (clustering or ordering labels); training works without them
    REQUIRED = "required"  # training cannot start without them


@dataclass(frozen=True)
class HeadContext:
    """Facts about the task a head is built for.

    Args:
        in_features: ``D``, the width of the features the encoder gives.
        num_classes: ``C``, the number of classes or labels.
        multilabel: whether a sample may have several labels (targets are :class:`RaggedLabels`).
        label_counts: ``(C,)`` training frequency of each label, or None when unknown.
        label_features: ``(C, E)`` float32 vector per label for clustering (PIFA: the normalised sum of the
            vectors of each label's training documents), or None when the data gives none.
    """

    in_features: int
    num_classes: int
    multilabel: bool
    label_counts: np.ndarray | None = None
    label_features: np.ndarray | None = None


class Head(nn.Module):
    """An output layer plus its loss over ``C`` classes, built never to hold a ``B x C`` matrix.

    Subclasses implement :meth:`forward` and :meth:`topk`; every other hook has a default. A head saves
    everything it maintains in its state dict, so a checkpoint restores it exactly.

    Args:
        context: the task (``num_classes`` is ``C`` over all ranks).
        shard: the class range this process holds, or None for all of them.
    """

    def __init__(self, context: HeadContext, shard: ClassShard | None = None) -> None:
        super().__init__()
        if context.in_features < 1 or context.num_classes < 1:
            raise ValueError(f"{type(self).__name__} needs in_features and num_classes >= 1, got {context}")
        if shard is not None and shard.num_classes != context.num_classes:
            raise ValueError(f"shard: {shard} is of {shard.num_classes} classes, the head has {context}")
        self.context = context
        self.shard = shard

    @property
    def sharded(self) -> bool:
        """Whether the head computes over a class range of a process group (collectives on every call)."""
        return self.shard is not None

    def _check_features(self, features: Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.context.in_features:
            raise ValueError(
                f"features must be (B, D={self.context.in_features}), got shape {tuple(features.shape)}"
            )

    def gather_batch(self, features: Tensor, targets: Targets) -> tuple[Tensor, Targets]:
        """The global batch of a sharded head: every rank's ``features`` stacked ``(N * B, D)`` and targets,
        in rank order (as given without a shard). The gradient reaching each rank's features is scaled by
        ``N``: the data-parallel encoder averages gradients over ranks, and the mean of ``N`` shares is their
        sum."""
        if self.shard is None:
            return features, targets
        group = self.shard.group
        _, world = world_of(group)
        return gather_rows(features, group=group, grad_scale=float(world)), gather_targets(
            targets, group=group
        )

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.context.num_classes:
            raise ValueError(f"k must be in [1, C={self.context.num_classes}], got {k}")

    # ------------------------------------------------------------------ what every head implements
    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """Scalar training loss of ``features (B, D)`` against ``targets`` (the whole head's when sharded)."""
        raise NotImplementedError

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, ids)``, each ``(B, k)``, scores descending; never ``B x C`` at once."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks with defaults
    def topk_is_approximate(self) -> bool:
        """Whether :meth:`topk` searches an index rather than scoring every class (measured by
        :meth:`topk_recall`)."""
        return False

    @torch.no_grad()
    def topk_recall(self, features: Tensor, k: int) -> float | None:
        """Share of the exact top-``k`` that :meth:`topk` finds for ``features (B, D)``; None where it is
        exact."""
        return None

    @classmethod
    def check_config(cls, config: Any, *, in_features: int | None) -> None:
        """Refuse a config that cannot fit features ``in_features`` wide (None: not known before the encoder
        is built), before any data is read; nothing to check by default.

        Raises:
            ConfigError: naming the setting that does not fit.
        """

    @classmethod
    def label_features(cls, config: Any) -> LabelFeatures:
        """Whether a head of ``config`` uses label feature vectors (asked before it is built)."""
        return LabelFeatures.UNUSED

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, *, total_steps: int | None = None) -> None:
        """The optimizer of the head's parameters and the run's length (a rewiring head resets the state of
        new connections and anneals to the last step); nothing by default."""

    def kernels(self, *, batch: int, device_type: str, dtype: torch.dtype) -> dict[str, str]:
        """The implementation each of the head's ops runs for training batches of ``batch`` rows in
        ``dtype`` on ``device_type``: ``impl="auto"`` resolved by the ops' fixed rules. A run records it,
        and a resume that would run other arithmetic is refused. None by default."""
        return {}

    def materialize(self) -> object:
        """Build now what the head would build at first use (a row store: connecting to parameter servers
        checks them), so that a run fails before its folder changes. Nothing by default."""
        return None

    def after_step(self, step: int, epoch: float, *, lr: float) -> None:
        """Called after each optimizer step with the global step, the fractional epoch and the head's lr."""

    def take_rewired(self) -> dict[str, Tensor]:
        """Masks, by parameter name, of the weights whose meaning changed since the last call (rewired
        connections): state kept per weight elsewhere (a weight average) restarts there. None by default."""
        return {}

    def average_rows(self, decay: float) -> dict[str, RowAverage]:
        """Start averaging the weights the head holds outside its parameters (a row store's rows), each kept
        by a :class:`~megaclass.store.average.RowAverage`, by state-dict name; a weight average
        (``train.ema_decay``) averages the parameters itself. Nothing by default."""
        return {}

    def init_rows(self, rows: Tensor) -> None:
        """Start the class rows from ``rows (C, D)``, one vector per class of all ``C`` (e.g. encoded label
        names), unit-normalised and scaled to the rows' mean norm; a sharded head keeps its range.

        Raises:
            ConfigError: the head has no ``(C, D)`` class rows.
        """
        raise ConfigError(f"{type(self).__name__} has no (C, D) class rows to initialise from label vectors")

    def row_range(self) -> tuple[int, int, int]:
        """``(start, stop, num_rows)``: the rows this process holds of the head's ``num_rows`` (checkpoints
        split ``rows`` entries of :meth:`state_layout` by it)."""
        if self.shard is None:
            return 0, self.context.num_classes, self.context.num_classes
        return self.shard.start, self.shard.stop, self.context.num_classes

    row_group: int = 1
    """Rows per entry row of ``groups`` state entries (:data:`StateKind`)."""

    def weights_state_dict(self) -> dict[str, Any]:
        """What inference needs (kept and final weights, exports): the state dict, less what only training
        uses where the head keeps it (a store's row optimizer state); :meth:`load_state_dict` takes either."""
        return self.state_dict()

    def state_layout(self) -> dict[str, StateKind]:
        """How each state entry splits across ranks (see :data:`StateKind`); others are replicated."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging about the head's state (coverage, sparsity, ...); empty by default."""
        return {}

    def state_bytes(self) -> dict[str, int]:
        """Bytes this head holds, by kind: ``weights`` and ``structure`` (indices, topology, index); a head
        whose rows live in a store adds ``row_optimizer`` (the store's optimizer state)."""
        weights = sum(p.numel() * p.element_size() for p in self.parameters())
        structure = sum(b.numel() * b.element_size() for b in self.buffers())
        return {"weights": weights, "structure": structure}

    # ------------------------------------------------------------------ CUDA graph capture of the step
    def capture_blocker(self, *, targets_static: bool) -> str | None:
        """Why this head's forward and backward cannot be captured in a CUDA graph, or None when they can:
        static shapes, no host sync (``.item()``, ``nonzero``, data-dependent sizes) and no host-side work a
        replay would skip. ``targets_static``: the targets are multi-class ``(B,)``, not ragged. Not
        capturable by default."""
        return f"{type(self).__name__} does not declare its step capturable"

    def graph_generators(self) -> list[torch.Generator]:
        """The CUDA generators the forward draws from besides the device's default one (a captured step
        advances them on each replay); none by default."""
        return []

    def graph_key(self) -> tuple:
        """What a captured step depends on besides its inputs' shapes: buffers the forward reads that may be
        replaced, Python values it branches on. A change recaptures; nothing by default."""
        return ()

    def after_replay(self) -> None:
        """Called after each replay of a captured step, before the optimizer step: the host-side part of
        :meth:`forward` (bookkeeping a replay skips, as it runs device work only). Nothing by default."""

    def close(self, *, wait: bool = True) -> None:  # noqa: B027 (an optional hook: no-op by default)
        """Release what the head holds beyond its tensors (a row store's page-locked memory, threads and
        connections: :meth:`~megaclass.store.RowStore.close`). Nothing by default."""

    @classmethod
    def planned_bytes(
        cls, config: Any, context: HeadContext, request: PlanRequest
    ) -> dict[str, PlannedBytes]:
        """What a head of ``config`` for ``context`` would hold, by part, without building it (the memory
        plan of :mod:`megaclass.train.plan`) for the run ``request`` describes: ``weights``, ``gradients``,
        ``optimizer`` (a torch optimizer keeping ``request.optimizer_moments`` weight-sized tensors, or the
        row store's own state), ``index`` (topology, class index, label maps), ``activations`` (one training
        batch), ``evaluation`` (one scoring batch), ``checkpoint`` (host copies its state dict makes
        beyond what it holds) and, where it has any, ``initialisation`` (what building it holds beyond its
        weights, while the modules are built).

        Raises:
            ConfigError: the head cannot plan its memory.
        """
        raise ConfigError(f"{cls.__name__} gives no memory plan")


@torch.no_grad()
def rescaled_rows(rows: Tensor, like: Tensor) -> Tensor:
    """``rows (R, D)`` unit-normalised, times the mean row norm of ``like (R, D)`` (the initial scale)."""
    rows = torch.as_tensor(rows, dtype=torch.float32, device=like.device)
    if rows.shape != like.shape:
        raise ValueError(f"initial rows: expected shape {tuple(like.shape)}, got {tuple(rows.shape)}")
    scale = like.float().norm(dim=1).mean()
    return torch.nn.functional.normalize(rows, dim=1) * scale


@dataclass(frozen=True)
class PlanRequest:
    """The run a head's memory is planned for (:meth:`Head.planned_bytes`)."""

    batch: int  # training samples per step on this process
    eval_batch: int  # samples scored at once
    device_type: str = "cuda"  # the compute device's type
    optimizer_moments: int = 2  # weight-sized tensors the head's torch optimizer keeps (AdamW: 2)
    low_precision: bool = False  # bf16 head weights and optimizer state
    feature_bytes: int = 4  # bytes of a feature the head reads in a training step (2 under bf16 autocast)


class PlannedBytes(NamedTuple):
    """Bytes one part of a run would hold on the compute device and in host memory, the setting that
    shrinks it (for a plan's refusal line), and what a checkpoint writes of it from outside this process
    (``elsewhere``: rows on parameter servers)."""

    device: int
    host: int
    setting: str = ""
    elsewhere: int = 0
