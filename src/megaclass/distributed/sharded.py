"""Class-sharded heads: rank ``r`` of ``N`` holds the contiguous classes ``shard_range(C, r, N)``.

    torchrun --nproc-per-node 2 -m megaclass train ... --head dense --set distributed.shard_head=true

Each rank's encoder runs on its own samples (data parallel); the head gathers every rank's features and
targets (:func:`~megaclass.ops.collectives.gather_rows`, whose backward hands each rank the gradient
of its own rows) and scores the whole global batch against its own classes. The loss is the single-process
head's loss on the global batch, held by every rank:

- dense softmax: the normaliser from an all-reduce of the per-row maximum and of the sums of exponentials
  (arXiv 1805.02867's online softmax, across ranks); the positives' logits from their owners;
- dense BCE / squared hinge: each rank's classes' terms, summed by one all-reduce;
- selected (HF-Softmax): each rank selects ``sample_num / N`` of its own classes (the batch's true classes at
  their owners) with its own index over its own rows; one softmax normaliser over the union.

Top-``k``: each rank's own top-``k``, merged. A rank's head memory is ``~1/N`` of the whole. With a world size
of 1 no collective runs and the sharded head computes exactly what the plain head does.

The gradient reaching each rank's features is scaled by ``N``: the data-parallel wrapper of the encoder (DDP,
FSDP2) averages gradients over ranks, and the average of ``N`` times each rank's share is their sum.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from megaclass.heads.base import Head, HeadContext
from megaclass.heads.dense import DenseHeadConfig
from megaclass.heads.selected import SelectedHead, SelectedHeadConfig
from megaclass.ops.chunked_topk import chunked_topk
from megaclass.ops.collectives import (
    ClassShard,
    all_reduce_logsumexp,
    all_reduce_replicated,
    gather_rows,
    gather_targets,
    local_targets,
    merge_topk,
    scale_grad,
    shard_range,
    world_of,
)
from megaclass.ops.linear_cross_entropy import LinearLossOptions, LossKind, linear_loss
from megaclass.ops.margins import margin_logits
from megaclass.schema import ConfigError
from megaclass.targets import Targets, as_ragged

__all__ = [
    "ShardedDenseHead",
    "ShardedSelectedHead",
    "ShardedSparseHead",
    "StateKind",
    "build_sharded_head",
    "export_prefix",
    "sharded_head_types",
]

StateKind = Literal["rows", "groups", "rank"]
"""How a head state entry splits across ranks: ``rows`` (leading dimension: the rank's rows
``[start, stop)``), ``groups`` (leading dimension: groups of ``config.group`` rows, the sparse head's index),
``rank`` (private to the rank: rebuilt when the world size changes). Entries not named are replicated."""

_INIT_BLOCK = 1 << 16  # rows initialised per seeded generator: the same matrix for any world size


def _init_normal_rows_(weight: Tensor, start: int, *, std: float, seed: int) -> None:
    """Fill the rows of global classes ``[start, start + len(weight))`` with ``N(0, std^2)``, drawn in blocks
    of ``_INIT_BLOCK`` global rows seeded ``(seed, block)``: every world size starts from the same matrix."""
    stop, device = start + weight.shape[0], weight.device
    for block in range(start // _INIT_BLOCK, -(-stop // _INIT_BLOCK)):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + block)
        first = block * _INIT_BLOCK
        rows = (
            torch.randn(_INIT_BLOCK, weight.shape[1], generator=generator, device=device) * std
        )  # (block, D)
        lo, hi = max(start, first), min(stop, first + _INIT_BLOCK)
        weight[lo - start : hi - start] = rows[lo - first : hi - first].to(weight.dtype)


# --------------------------------------------------------------------------------------- dense, the head


class ShardedDenseHead(Head):
    """The rows ``shard_range(C, rank, N)`` of a :class:`~megaclass.heads.dense.DenseHead`.

    Its state dict has the dense head's keys (``weight``, ``bias``) over the rank's rows, so the rows of all
    ranks stacked in rank order are a plain dense head's state.

    Args:
        config: the dense head's options.
        context: the whole task (``num_classes`` is ``C`` over all ranks).
        seed: seeds the rows, drawn per global row block (the same matrix for any world size).
        group: the process group sharing the classes (the default group).

    >>> context = HeadContext(in_features=8, num_classes=10, multilabel=False)
    >>> head = ShardedDenseHead(DenseHeadConfig(), context)
    >>> head.start, head.stop, float(head(torch.randn(4, 8), torch.tensor([0, 1, 2, 9]))) > 0
    (0, 10, True)
    """

    def __init__(self, config: DenseHeadConfig, context: HeadContext, *, seed: int = 0, group: Any = None):
        super().__init__()
        if config.margin.enabled and context.multilabel:
            raise ConfigError(
                "head.margin needs multi-class data (one label per sample), the data is multi-label"
            )
        loss = config.loss if config.loss != "auto" else ("bce" if context.multilabel else "softmax")
        self.config, self.context, self.group = config, context, group
        self.rank, self.world_size = world_of(group)
        self.start, self.stop = shard_range(context.num_classes, self.rank, self.world_size)
        self.num_rows = context.num_classes  # rows over all ranks
        self.options = LinearLossOptions(
            loss=LossKind(loss),
            reduction=config.reduction,
            margin=config.margin,
            chunk_size=config.chunk_size,
        )
        rows = self.stop - self.start
        self.weight = nn.Parameter(torch.empty(rows, context.in_features))
        self.bias = nn.Parameter(torch.zeros(rows)) if config.bias else None
        with torch.no_grad():
            std = config.init_scale / math.sqrt(context.in_features)
            _init_normal_rows_(self.weight, self.start, std=std, seed=seed)

    def state_layout(self) -> dict[str, StateKind]:
        """How each state entry splits across ranks (see :data:`StateKind`)."""
        return {"weight": "rows", "bias": "rows"}

    def _compute_input(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.context.in_features:
            raise ValueError(
                f"features must be (B, D={self.context.in_features}), got shape {tuple(features.shape)}"
            )
        device_type = features.device.type
        if torch.is_autocast_enabled(device_type):
            return features.to(torch.get_autocast_dtype(device_type))
        return features

    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """The whole head's loss on the global batch (every rank's ``features (B, D)`` and ``targets``)."""
        x = gather_rows(self._compute_input(features), group=self.group, grad_scale=float(self.world_size))
        return linear_loss(
            x,  # (N * B, D)
            self.weight,
            gather_targets(targets, group=self.group),
            bias=self.bias,
            options=self.options,
            impl=self.config.impl,
            shard=ClassShard(self.start, self.stop, self.context.num_classes, self.group),
        )

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` over all classes of ``features (B, D)``, the same on every rank; each ``(B, k)``."""
        if not 1 <= k <= self.context.num_classes:
            raise ValueError(f"k must be in [1, C={self.context.num_classes}], got {k}")
        margin = self.config.margin
        scores, ids = chunked_topk(
            self._compute_input(features),
            self.weight,
            min(k, self.weight.shape[0]),
            bias=self.bias,
            cosine=margin.enabled,
            scale=margin.scale,
            chunk_size=self.config.chunk_size,
        )
        return merge_topk(scores, ids + self.start, k, group=self.group)

    def extra_repr(self) -> str:
        return (
            f"classes=[{self.start}, {self.stop}) of {self.context.num_classes}, "
            f"rank {self.rank}/{self.world_size}, "
            f"loss={self.options.loss.value}"
        )


# --------------------------------------------------------------------------------------- selected


class ShardedSelectedHead(Head):
    """HF-Softmax over ``N`` ranks: each rank's :class:`~megaclass.heads.selected.SelectedHead` holds its own
    classes (its own store and index) and selects ``ceil(sample_num / N)`` of them for the global batch.

    The normaliser is one log-sum-exp over the union of the ranks' active sets; a sample's true classes are
    always active at their owners. ``local.*`` state entries are the rank's selected head's.

    Args:
        config: the selected head's options (``sample_num`` over all ranks).
        context: the whole task.
        group: the process group sharing the classes.
    """

    def __init__(self, config: SelectedHeadConfig, context: HeadContext, *, seed: int = 0, group: Any = None):
        super().__init__()
        self.config, self.context, self.group = config, context, group
        self.rank, self.world_size = world_of(group)
        self.start, self.stop = shard_range(context.num_classes, self.rank, self.world_size)
        self.num_rows = context.num_classes  # rows over all ranks
        counts = None if context.label_counts is None else context.label_counts[self.start : self.stop]
        features = None if context.label_features is None else context.label_features[self.start : self.stop]
        local_config = dataclasses.replace(
            config,
            sample_num=-(-config.sample_num // self.world_size),
            seed=config.seed + 7919 * self.rank,  # the rank's own rows, index and random fill
        )
        local_context = dataclasses.replace(
            context, num_classes=self.stop - self.start, label_counts=counts, label_features=features
        )
        self.local = SelectedHead(local_config, local_context)

    def state_layout(self) -> dict[str, StateKind]:
        """How each state entry splits across ranks: store rows and row state; the rank's index and RNG."""
        layout: dict[str, StateKind] = {"local.selection.dirty": "rows", "local.selection.rng": "rank"}
        for name in self.local.materialize().state_dict():
            layout[f"local.store.{name}"] = "rows"
        if self.local.selector is not None:
            layout.update({f"local.index.{name}": "rank" for name in self.local.selector.state_dict()})
            layout["local.index.built"] = "rank"
        return layout

    def _logits(self, features: Tensor, rows: Tensor, target_position: Tensor | None) -> Tensor:
        """``(B, S)`` logits against the rank's active rows; with a margin, ``target_position (B,)``'s entries
        (``-1``: the target is another rank's) get it."""
        if not self.config.margin.enabled:
            return features.float() @ rows.float().T
        normalise = torch.nn.functional.normalize
        cosine = normalise(features.float(), dim=1) @ normalise(rows.float(), dim=1).T  # (B, S)
        return margin_logits(cosine, target_position, self.config.margin)

    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """Mean softmax cross-entropy of the global batch over the union of the ranks' active sets."""
        if features.dim() != 2 or features.shape[1] != self.context.in_features:
            raise ValueError(
                f"features must be (B, D={self.context.in_features}), got {tuple(features.shape)}"
            )
        if not self.context.multilabel and not isinstance(targets, Tensor):
            raise ValueError("targets: multi-class data expects a LongTensor (B,) of class ids")
        x = gather_rows(features, group=self.group, grad_scale=float(self.world_size))  # (N * B, D)
        every = as_ragged(gather_targets(targets, group=self.group)).to(x.device)
        local = local_targets(every, self.start, self.stop)
        selection = self.local.select(x, local)
        rows = self.local.pull_active(selection.ids)  # (S_r, D)
        columns = torch.searchsorted(selection.ids[: selection.num_positive], local.indices)  # (L_r,)
        sample = local.sample_ids()  # (L_r,)
        position = None
        if self.config.margin.enabled:
            position = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device).index_put(
                (sample,), columns
            )
        logits = self._logits(x, rows, position)  # (N * B, S_r)
        if self.config.logq_correction:
            logits = logits + selection.logit_adjust
        lse = all_reduce_logsumexp(
            torch.logsumexp(logits, dim=1), group=self.group
        )  # (N * B,) over the union
        lengths = every.lengths().clamp_min(1).to(torch.float32)  # (N * B,) global label counts
        owned = logits[sample, columns] / lengths[sample]  # (L_r,) each label's share of its sample's loss
        positive = torch.zeros_like(lse).index_add(0, sample, owned)
        positive = all_reduce_replicated(positive, group=self.group)  # (N * B,)
        labelled = (every.lengths() > 0).to(torch.float32)
        return ((lse - positive) * labelled).sum() / labelled.sum().clamp_min(1.0)

    def after_step(self, step: int, epoch: float, *, lr: float) -> None:
        """The rank's pending row gradients go to its store; its index is rebuilt on schedule."""
        self.local.after_step(step, epoch, lr=lr)

    def metrics(self) -> dict[str, float]:
        return self.local.metrics()

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` over all classes of ``features (B, D)``, the same on every rank; each ``(B, k)``."""
        if not 1 <= k <= self.context.num_classes:
            raise ValueError(f"k must be in [1, C={self.context.num_classes}], got {k}")
        scores, ids = self.local.topk(features, min(k, self.stop - self.start))
        return merge_topk(scores, ids + self.start, k, group=self.group)


# --------------------------------------------------------------------------------------- sparse


class ShardedSparseHead(Head):
    """SPARTEX over ``N`` ranks: the fixed fan-in tail's label groups split into contiguous ranges (weights,
    index rows, biases and their rewiring by rank); the intermediate layer, the dense head of frequent labels
    and the auxiliary cluster head replicated.

    Every rank builds the whole :class:`~megaclass.heads.sparse.SparseHead` once (the same topology and rows
    for any world size) and keeps its range. Replicated parts back-propagate ``1 / N`` of their gradient on
    each rank and their parameters' gradients are summed over ranks as they are accumulated, so every rank
    steps them alike. ``start`` and ``stop`` are positions in the sparse tail (``label_order`` after the
    ``dense_frequent`` labels); ``local.*`` state entries are the rank's sparse head's.
    """

    def __init__(self, config: Any, context: HeadContext, *, seed: int = 0, group: Any = None) -> None:
        from megaclass.heads.sparse import SparseHead

        super().__init__()
        self.config, self.context, self.group = config, context, group
        self.rank, self.world_size = world_of(group)
        local = SparseHead(config, context)
        size = config.group
        tail = local.weight.shape[0]  # C_sparse
        first, last = shard_range(-(-tail // size), self.rank, self.world_size)  # index rows (label groups)
        self.start, self.stop, self.num_rows = first * size, min(last * size, tail), tail
        with torch.no_grad():
            local.weight = nn.Parameter(local.weight[self.start : self.stop].clone())  # (C_r, K)
            local.index = local.index[first:last].clone()  # (groups_r, K)
            if local.bias is not None:
                local.bias = nn.Parameter(local.bias[self.start : self.stop].clone())
        dst = dataclasses.replace(config.dst, seed=config.dst.seed + 7919 * self.rank)  # the rank's regrowth
        local.config = dataclasses.replace(config, dst=dst)
        self.local = local
        if self.world_size > 1:
            import torch.distributed as dist

            for module in (local.intermediate, local.dense, local.aux):
                for param in module.parameters() if module is not None else ():
                    with torch.no_grad():
                        dist.broadcast(param, dist.get_global_rank(group, 0) if group else 0, group=group)
                    param.register_post_accumulate_grad_hook(self._sum_over_ranks)

    def _sum_over_ranks(self, param: Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(param.grad, group=self.group)

    def state_layout(self) -> dict[str, StateKind]:
        """Tail rows (weights, biases), index rows by label group, and the rank's rewiring RNG."""
        return {
            "local.weight": "rows",
            "local.bias": "rows",
            "local.index": "groups",
            "local.dst_rng_state": "rank",
            "local.dst_last_fraction": "rank",
        }

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, *, total_steps: int | None = None) -> None:
        """As :meth:`~megaclass.heads.sparse.SparseHead.bind_optimizer`, for the rank's rewiring."""
        self.local.bind_optimizer(optimizer, total_steps=total_steps)

    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """The whole sparse head's loss on the global batch, held by every rank."""
        from megaclass.ops.fixed_fanin import combine_loss, fixed_fanin_rows, positive_logits
        from megaclass.ops.fixed_fanin.reference import reference_row_values

        local, share = self.local, 1.0 / self.world_size
        x = gather_rows(features, group=self.group, grad_scale=float(self.world_size))  # (N * B, D)
        hidden = local._hidden(x)  # (N * B, H)
        every = as_ragged(gather_targets(targets, group=self.group)).to(x.device)
        samples, position = every.sample_ids(), local.label_position[every.indices.long()]  # (L,) each
        rows = fixed_fanin_rows(
            hidden, local.weight, local.index, local.bias, group=self.config.group, loss=local.loss_kind,
            impl=self.config.impl,
        )  # fmt: skip
        if local.loss_kind == "softmax":
            rows = all_reduce_logsumexp(rows, group=self.group)  # (N * B,) over every rank's tail
        else:
            rows = all_reduce_replicated(rows, group=self.group)
        tail = position - local.num_dense
        owned = ((tail >= self.start) & (tail < self.stop)).nonzero().squeeze(1)  # (L_r,)
        mine = positive_logits(
            hidden, local.weight, local.index, local.bias, samples[owned], tail[owned] - self.start,
            group=self.config.group,
        )  # fmt: skip
        positive = torch.zeros(position.shape[0], dtype=torch.float32, device=x.device).index_put(
            (owned,), mine
        )
        positive = all_reduce_replicated(positive, group=self.group)  # (L,) every tail positive
        if local.dense is not None:
            dense_logits = scale_grad(local.dense(hidden).float(), share)  # (N * B, F), replicated
            dense_rows = reference_row_values(dense_logits, local.loss_kind)
            rows = torch.logaddexp(rows, dense_rows) if local.loss_kind == "softmax" else rows + dense_rows
            frequent = (position < local.num_dense).nonzero().squeeze(1)
            positive = positive.index_put((frequent,), dense_logits[samples[frequent], position[frequent]])
        loss = combine_loss(rows, positive, every, local.loss_kind)
        alpha = local.aux_alpha()
        if alpha == 0.0:
            return loss
        return (1.0 - alpha) * loss + alpha * scale_grad(local._aux_loss(hidden, every), share)

    def after_step(self, step: int, epoch: float, *, lr: float) -> None:
        """The epoch (auxiliary weight) and the rank's rewiring."""
        self.local.after_step(step, epoch, lr=lr)

    def metrics(self) -> dict[str, float]:
        return self.local.metrics()

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` over all labels of ``features (B, D)`` (original label ids), the same on every rank."""
        from megaclass.ops.fixed_fanin import fixed_fanin_topk

        if not 1 <= k <= self.context.num_classes:
            raise ValueError(f"k: expected 1 <= k <= C = {self.context.num_classes}, got {k}")
        local = self.local
        hidden = local._hidden(features)
        scores, ids = fixed_fanin_topk(
            hidden, local.weight, local.index, min(k, local.weight.shape[0]), local.bias,
            group=self.config.group, chunk_size=self.config.topk_chunk, impl=self.config.impl,
        )  # fmt: skip
        ids = ids + local.num_dense + self.start  # (B, k_r) positions
        if local.dense is not None and self.rank == 0:  # the replicated frequent labels, counted once
            top = local.dense(hidden).float().topk(min(k, local.num_dense), dim=1)
            scores, ids = torch.cat([scores, top.values], 1), torch.cat([ids, top.indices], 1)
        return merge_topk(scores, local.label_order[ids], k, group=self.group)


# --------------------------------------------------------------------------------------- registry


def export_prefix(head_type: str) -> str:
    """What a sharded head's state names carry before the plain head's names (``local.``, or nothing)."""
    return "" if head_type == "dense" else "local."


def sharded_head_types() -> dict[str, type[Head]]:
    """Head names that have a class-sharded form, and that form."""
    return {"dense": ShardedDenseHead, "selected": ShardedSelectedHead, "sparse": ShardedSparseHead}


def build_sharded_head(config: Any, context: HeadContext, *, seed: int = 0, group: Any = None) -> Head:
    """The class-sharded form of the head ``config`` describes, over the ranks of ``group``.

    Raises:
        ValueError: the head type has no sharded form.
    """
    types = sharded_head_types()
    if config.type not in types:
        raise ValueError(
            f"distributed.shard_head: head.type {config.type!r} has no class-sharded form; "
            f"sharded heads: {', '.join(sorted(types))} (or set distributed.shard_head=false to replicate it)"
        )
    return types[config.type](config, context, seed=seed, group=group)
