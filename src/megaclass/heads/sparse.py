"""SparseHead: a fixed fan-in output layer trained sparse from the first step to the last (SPARTEX, NeurIPS
2024, "Navigating Extremes: Dynamic Sparsity in Large Output Spaces"), with HASTE's grouped indices and dense
head for frequent labels.

Every label keeps exactly ``K`` weights into the ``H``-wide hidden features: ``weight (C, K)`` and
``index (ceil(C / G), K)`` shared by groups of ``G`` labels. The loss is fused into the layer (no ``B x C``
logits kept), the topology is rewired by magnitude pruning and random regrowth, an optional intermediate layer
widens the features, and an auxiliary BCE loss over label clusters feeds the encoder early in training.

Training loop wiring: the trainer calls ``head.bind_optimizer(optimizer, total_steps=...)`` once after
building the optimizer (so rewiring can reset the optimizer state of new connections and anneal to the
stop point), and ``head.after_step(step, epoch, lr=...)`` after every optimizer step. The command line:
``megaclass train ... --head sparse --set head.fan_in=32 --set head.group=16 --set head.intermediate=4096``.

Given a :class:`~megaclass.ops.collectives.ClassShard`, the sparse tail's label groups split into
contiguous ranges over the ranks (weights, index rows, biases and their rewiring); the intermediate layer,
the dense head of frequent labels and the auxiliary cluster head are replicated: they back-propagate
``1 / N`` of their gradient on each rank and their parameters' gradients are summed over ranks as they are
accumulated, so every rank steps them alike. Each rank draws only its own range of the topology (the
generator runs over every row, keeping its own), so every world size starts from the same head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaclass.dst import (
    DSTConfig,
    RewireMode,
    expand_to_labels,
    prune_regrow,
    random_fanin_index,
    rewire_fraction,
    rewiring_scratch_bytes,
)
from megaclass.heads.base import Head, HeadContext, LabelFeatures, PlannedBytes, PlanRequest, StateKind
from megaclass.ops import resolve_impl_on
from megaclass.ops.collectives import (
    ClassShard,
    all_reduce_logsumexp,
    all_reduce_replicated,
    merge_topk,
    scale_grad,
    shard_range,
    world_of,
)
from megaclass.ops.fixed_fanin import (
    combine_loss,
    fixed_fanin_rows,
    fixed_fanin_rows_positive,
    fixed_fanin_topk,
    positive_logits,
    reference_row_values,
)
from megaclass.ops.fixed_fanin.columns import CHUNK_ROWS, LABEL_TILE, cached_bytes, grouped_tiles
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels, Targets, as_ragged

__all__ = ["SparseHead", "SparseHeadConfig"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "none": nn.Identity}
_WEIGHT_CHUNK = 1 << 16  # label rows of initial weights drawn at once (the same draws as one whole call)


@dataclass(frozen=True)
class SparseHeadConfig:
    """A fixed fan-in sparse output layer with dynamic sparse training."""

    type: Literal["sparse"] = "sparse"
    fan_in: int = 32  # K inputs per label: memory and time scale with C * K instead of C * D
    group: int = 1  # G labels share one index row; powers of two >= 16 run on tensor cores (HASTE)
    intermediate: int = 0  # width H of a dense layer before the sparse one (0: off); recovers accuracy
    activation: Literal["relu", "gelu", "none"] = "relu"  # after the intermediate layer
    loss: Literal["auto", "bce", "squared_hinge", "softmax"] = "auto"  # auto: bce multi-label, else softmax
    bias: bool = True  # one bias per label
    dst: DSTConfig = field(default_factory=DSTConfig)
    aux_clusters: int | str = (
        "auto"  # clusters of the auxiliary loss: auto (leaves of <= aux_leaf labels), n, 0 off
    )
    aux_leaf: int = 100  # auto: most labels per cluster of the balanced 2-means tree
    aux_alpha0: float = 0.5  # auxiliary weight at epoch 0, cosine-decayed to 0 at the cut-off
    aux_cutoff_epoch: float = 2.0  # epoch from which the auxiliary loss is off
    dense_frequent: int = 0  # most frequent labels given a dense head beside the sparse tail (0: none)
    index_dtype: Literal["int32", "int64"] = "int32"  # index values are input columns (< H): int32 suffices
    topk_chunk: int = 1 << 16  # labels scored at once by topk
    impl: Literal["auto", "triton", "reference"] = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.dst, DSTConfig):
            raise ConfigError(
                f"head.dst: expected a DSTConfig(...), got {self.dst!r}; in YAML or --set its fields do: "
                "dst: {mode: threshold}"
            )
        if self.fan_in < 1 or self.group < 1 or self.intermediate < 0 or self.dense_frequent < 0:
            raise ConfigError(
                "head.fan_in and head.group: expected >= 1, head.intermediate and head.dense_frequent >= 0; "
                "got "
                f"{self.fan_in}, {self.group}, {self.intermediate}, {self.dense_frequent}"
            )
        if isinstance(self.aux_clusters, str) and self.aux_clusters != "auto":
            raise ConfigError(
                f"head.aux_clusters: expected 'auto' or an integer >= 0, got {self.aux_clusters!r}"
            )
        if isinstance(self.aux_clusters, int) and self.aux_clusters < 0:
            raise ConfigError(
                f"head.aux_clusters: expected 'auto' or an integer >= 0, got {self.aux_clusters}"
            )
        if not 0.0 <= self.aux_alpha0 < 1.0 or self.aux_cutoff_epoch < 0 or self.aux_leaf < 1:
            raise ConfigError(
                "head.aux_alpha0 in [0, 1), head.aux_cutoff_epoch >= 0 and head.aux_leaf >= 1 expected; got "
                f"{self.aux_alpha0}, {self.aux_cutoff_epoch}, {self.aux_leaf}"
            )

    @property
    def aux_enabled(self) -> bool:
        """Whether the auxiliary cluster loss is on."""
        return self.aux_clusters != 0 and self.aux_alpha0 > 0.0


def _label_clusters(config: SparseHeadConfig, context: HeadContext) -> Tensor | None:
    """``(C,)`` cluster id per label from the PIFA label features; None when the auxiliary loss is off or
    there are no label features (a head rebuilt to load a state dict gets its clusters from it)."""
    if not config.aux_enabled or context.label_features is None:
        return None
    from megaclass.index.clustering import balanced_kmeans, hierarchical_balanced_2means

    features = torch.as_tensor(context.label_features, dtype=torch.float32)
    if config.aux_clusters == "auto":
        return hierarchical_balanced_2means(features, max_leaf=config.aux_leaf, seed=config.dst.seed)
    return balanced_kmeans(features, min(int(config.aux_clusters), context.num_classes), seed=config.dst.seed)


def _label_order(config: SparseHeadConfig, context: HeadContext, clusters: Tensor | None) -> Tensor:
    """``(C,)`` original label at each position: the ``dense_frequent`` most frequent first, the sparse tail
    next, ordered by label cluster (when label features exist) so that the labels of a group are similar."""
    classes = context.num_classes
    order = torch.arange(classes)
    if config.group > 1 and clusters is None and context.label_features is not None:
        from megaclass.index.clustering import hierarchical_balanced_2means

        features = torch.as_tensor(context.label_features, dtype=torch.float32)
        clusters = hierarchical_balanced_2means(features, max_leaf=config.aux_leaf, seed=config.dst.seed)
    if clusters is not None and config.group > 1:
        order = torch.argsort(clusters, stable=True)
    if config.dense_frequent:
        if context.label_counts is None:
            raise ConfigError("head.dense_frequent: needs label counts, and the data gives none")
        counts = torch.as_tensor(context.label_counts, dtype=torch.float64)
        frequent = torch.argsort(counts, descending=True, stable=True)[: config.dense_frequent]
        is_frequent = torch.zeros(classes, dtype=torch.bool)
        is_frequent[frequent] = True
        order = torch.cat([frequent, order[~is_frequent[order]]])
    return order


class SparseHead(Head):
    """Fixed fan-in sparse head (see the module docstring).

    Args:
        config: the head's options.
        context: ``in_features`` D, ``num_classes`` C, ``label_counts`` (for ``dense_frequent``) and
            ``label_features`` (for the auxiliary clusters).

    >>> context = HeadContext(in_features=8, num_classes=50, multilabel=True)
    >>> head = SparseHead(SparseHeadConfig(fan_in=4), context)
    >>> loss = head(torch.randn(3, 8), RaggedLabels.from_lists([[1, 7], [], [49]]))
    >>> head.topk(torch.randn(3, 8), 5)[1].shape
    torch.Size([3, 5])
    """

    def __init__(
        self, config: SparseHeadConfig, context: HeadContext, shard: ClassShard | None = None
    ) -> None:
        super().__init__(context, shard)
        if config.dense_frequent >= context.num_classes:
            raise ConfigError(
                f"head.dense_frequent: expected < C = {context.num_classes}, got {config.dense_frequent}"
            )
        self.config = config
        self.row_group = config.group
        loss = config.loss if config.loss != "auto" else ("bce" if context.multilabel else "softmax")
        self.loss_kind = "hinge" if loss == "squared_hinge" else loss  # the op's name for it
        self.hidden_dim = config.intermediate or context.in_features
        self.intermediate = (
            nn.Sequential(
                nn.Linear(context.in_features, config.intermediate), _ACTIVATIONS[config.activation]()
            )
            if config.intermediate
            else nn.Identity()
        )
        clusters = _label_clusters(config, context)
        order = _label_order(config, context, clusters)
        self.register_buffer("label_order", order)  # position -> original label
        self.register_buffer("label_position", torch.argsort(order))  # original label -> position
        self.num_dense = config.dense_frequent
        self.dense = nn.Linear(self.hidden_dim, self.num_dense) if self.num_dense else None
        self.rank, self.world_size = (0, 1) if shard is None else world_of(shard.group)
        self.num_tail = context.num_classes - self.num_dense  # sparse tail positions over all ranks
        groups = -(-self.num_tail // config.group)
        first, last = shard_range(groups, self.rank, self.world_size)  # this rank's index rows
        self.tail_start, self.tail_stop = first * config.group, min(last * config.group, self.num_tail)
        self._build_sparse(groups, (first, last))
        self.aux: nn.Linear | None = None
        if clusters is not None:
            self._build_aux(clusters.long(), int(clusters.max()) + 1)
        # The auxiliary loss is on but its clusters are unknown until a state dict brings them: training
        # before that raises (the trainer computes label features whenever the head needs them).
        self._aux_missing = config.aux_enabled and clusters is None
        self.register_buffer("epoch", torch.zeros((), dtype=torch.float64))
        self.register_buffer("dst_rewirings", torch.zeros((), dtype=torch.int64))
        self.register_buffer("dst_last_fraction", torch.zeros((), dtype=torch.float64))
        self.register_buffer("dst_rng_state", torch.zeros(0, dtype=torch.uint8))
        self._dst_seed = config.dst.seed + 7919 * self.rank  # the rank's own regrowth
        self._epoch = 0.0  # host copy of the epoch buffer: the auxiliary weight needs no device sync
        # (1 - alpha, alpha) of the auxiliary loss on the device: a captured step reads them at each replay
        alpha = self.aux_alpha()
        self.register_buffer("aux_mix", torch.tensor([1.0 - alpha, alpha]), persistent=False)
        self._optimizer: torch.optim.Optimizer | None = None
        self._total_steps: int | None = None
        self._rewired: Tensor | None = None  # (C_sparse, K) connections of the last rewiring, until taken
        self._track_rewired = False  # kept only once someone takes them (a C x K mask)
        if self.world_size > 1:
            self._replicate_over_ranks()

    def kernels(self, *, batch: int, device_type: str, dtype: torch.dtype) -> dict[str, str]:
        """The fixed fan-in ops' implementation on ``device_type``."""
        return {"fixed_fanin": resolve_impl_on(self.config.impl, device_type).value}

    @classmethod
    def check_config(cls, config: SparseHeadConfig, *, in_features: int | None) -> None:
        """Each label's ``K`` inputs are distinct columns of the sparse layer's input: ``K <= H``."""
        width = config.intermediate or in_features
        if width is not None and config.fan_in > width:
            source = "head.intermediate" if config.intermediate else "the encoder output"
            raise ConfigError(
                f"head.fan_in: expected <= the sparse layer's input width {width} ({source}), "
                f"got {config.fan_in}"
            )

    @classmethod
    def label_features(cls, config: SparseHeadConfig) -> LabelFeatures:
        """Required by the auxiliary loss (it clusters labels by them); wanted to group similar labels."""
        if config.aux_enabled:
            return LabelFeatures.REQUIRED
        return LabelFeatures.WANTED if config.group > 1 else LabelFeatures.UNUSED

    def _build_sparse(self, groups: int, keep: tuple[int, int]) -> None:
        """Index rows ``keep = [first, last)`` of ``groups`` and their labels' weights, from the draws of the
        whole tail (one seeded generator: every world size starts from the same head)."""
        config, fan_in = self.config, self.config.fan_in
        self.check_config(config, in_features=self.context.in_features)
        generator = torch.Generator().manual_seed(config.dst.seed)
        index_dtype = torch.int32 if config.index_dtype == "int32" else torch.int64
        index = random_fanin_index(
            groups, self.hidden_dim, fan_in, generator=generator, dtype=index_dtype, keep=keep
        )
        self.register_buffer("index", index)  # (groups_r, K)
        bound = 1.0 / math.sqrt(fan_in)
        # drawn on the generator's device (CPU) whatever the default device, so every device starts alike
        weight = torch.empty(self.tail_stop - self.tail_start, fan_in, device=generator.device)  # (C_r, K)
        for start in range(0, self.num_tail, _WEIGHT_CHUNK):
            stop = min(start + _WEIGHT_CHUNK, self.num_tail)
            chunk = torch.empty(stop - start, fan_in, device=generator.device).uniform_(
                -bound, bound, generator=generator
            )
            lo, hi = max(start, self.tail_start), min(stop, self.tail_stop)
            if lo < hi:
                weight[lo - self.tail_start : hi - self.tail_start] = chunk[lo - start : hi - start]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(weight.shape[0])) if config.bias else None

    def _replicated_modules(self) -> list[nn.Module]:
        return [module for module in (self.intermediate, self.dense, self.aux) if module is not None]

    def _replicate_over_ranks(self) -> None:
        """Start the replicated parts from rank 0's values; sum their gradients over ranks as they land."""
        import torch.distributed as dist

        group = self.shard.group
        source = dist.get_global_rank(group, 0) if group is not None else 0
        for module in self._replicated_modules():
            for param in module.parameters():
                with torch.no_grad():
                    dist.broadcast(param, source, group=group)
                param.register_post_accumulate_grad_hook(self._sum_over_ranks)

    def _sum_over_ranks(self, param: Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(param.grad, group=self.shard.group)

    def row_range(self) -> tuple[int, int, int]:
        """This rank's positions ``[start, stop)`` of the sparse tail (labels in ``label_order`` after the
        ``dense_frequent`` ones), of ``num_tail``."""
        return self.tail_start, self.tail_stop, self.num_tail

    def state_layout(self) -> dict[str, StateKind]:
        """Tail rows (weights, biases), index rows by label group, and the rank's rewiring RNG."""
        return {
            "weight": "rows",
            "bias": "rows",
            "index": "groups",
            "dst_rng_state": "rank",
            "dst_last_fraction": "rank",
        }

    def _build_aux(self, clusters: Tensor, num_clusters: int) -> None:
        """The auxiliary classifier over ``num_clusters`` clusters; ``clusters (C,)``: each label's."""
        self.register_buffer("label_cluster", clusters)
        self.aux = nn.Linear(self.hidden_dim, num_clusters, device=clusters.device)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, *, total_steps: int | None = None) -> None:
        """Give rewiring the optimizer (to reset the state of new connections) and the run's length."""
        self._optimizer = optimizer
        self._total_steps = total_steps

    def aux_alpha(self) -> float:
        """Auxiliary weight now: ``alpha0 * (1 + cos(pi * epoch / cutoff)) / 2``, 0 from the cut-off."""
        cutoff, epoch = self.config.aux_cutoff_epoch, self._epoch
        if self.aux is None or epoch >= cutoff:
            return 0.0
        return self.config.aux_alpha0 * 0.5 * (1.0 + math.cos(math.pi * epoch / cutoff))

    def _hidden(self, features: Tensor) -> Tensor:
        """The sparse layer's input: the intermediate layer's output, in the autocast dtype where autocast is
        on (as ``nn.Linear`` computes; fp32 features would take the kernels' exact fp32 dot, several times
        slower)."""
        self._check_features(features)
        hidden = self.intermediate(features)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            return hidden.to(torch.get_autocast_dtype(device_type))
        return hidden

    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """Scalar loss ``(1 - alpha) * main + alpha * auxiliary`` of ``features (B, D)``; no ``B x C``."""
        if self._aux_missing and self.training:
            raise ConfigError(
                f"head.aux_clusters={self.config.aux_clusters!r}: the auxiliary loss needs label features "
                "(HeadContext.label_features) to cluster labels, and none were given; pass them (the "
                "trainer's data.label_feature_dim) or set head.aux_clusters=0"
            )
        if self.shard is not None:
            return self._sharded_loss(features, targets)
        hidden = self._hidden(features)  # (B, H)
        ragged = as_ragged(targets)
        if ragged.batch_size != hidden.shape[0]:
            raise ValueError(f"targets: expected {hidden.shape[0]} samples, got {ragged.batch_size}")
        # padded targets: a pad reads label 0's entries, masked out in combine_loss and _aux_loss
        samples, position = ragged.sample_ids(), self.label_position[ragged.label_ids().long()]
        tail_labels = (position - self.num_dense).clamp_min(0)  # entries of the dense head compute a dummy
        # one autograd node: the positives' gradient goes sparsely into the layer's, no dense (C, K) tensor
        rows, positive = fixed_fanin_rows_positive(
            hidden,
            self.weight,
            self.index,
            samples,
            tail_labels,
            self.bias,
            group=self.config.group,
            loss=self.loss_kind,
            impl=self.config.impl,
        )  # (B,), (L,)
        if self.dense is not None:  # no host sync: both sources are computed and selected per entry
            dense_logits = self.dense(hidden).float()  # (B, F)
            dense_rows = reference_row_values(dense_logits, self.loss_kind)
            rows = torch.logaddexp(rows, dense_rows) if self.loss_kind == "softmax" else rows + dense_rows
            head_positive = dense_logits[samples, position.clamp_max(self.num_dense - 1)]  # (L,)
            positive = torch.where(position < self.num_dense, head_positive, positive)
        loss = combine_loss(rows, positive, ragged, self.loss_kind)
        if self.aux_alpha() == 0.0:
            return loss
        main, auxiliary = self.aux_mix
        return main * loss + auxiliary * self._aux_loss(hidden, ragged)

    def _sharded_loss(self, features: Tensor, targets: Targets) -> Tensor:
        """The whole head's loss on the global batch, held by every rank (see the module docstring)."""
        assert self.shard is not None
        if isinstance(targets, RaggedLabels) and targets.padded:
            raise ValueError(
                "targets: a class-sharded head takes unpadded labels (they are gathered over ranks)"
            )
        group, share = self.shard.group, 1.0 / self.world_size
        x, gathered = self.gather_batch(features, targets)  # (N * B, D)
        hidden = self._hidden(x)  # (N * B, H)
        every = as_ragged(gathered).to(x.device)
        samples, position = every.sample_ids(), self.label_position[every.indices.long()]  # (L,) each
        rows = fixed_fanin_rows(
            hidden, self.weight, self.index, self.bias, group=self.config.group, loss=self.loss_kind,
            impl=self.config.impl,
        )  # fmt: skip
        if self.loss_kind == "softmax":
            rows = all_reduce_logsumexp(rows, group=group)  # (N * B,) over every rank's tail
        else:
            rows = all_reduce_replicated(rows, group=group)
        tail = position - self.num_dense
        owned = ((tail >= self.tail_start) & (tail < self.tail_stop)).nonzero().squeeze(1)  # (L_r,)
        mine = positive_logits(
            hidden, self.weight, self.index, self.bias, samples[owned], tail[owned] - self.tail_start,
            group=self.config.group,
        )  # fmt: skip
        positive = torch.zeros(position.shape[0], dtype=torch.float32, device=x.device).index_put(
            (owned,), mine
        )
        positive = all_reduce_replicated(positive, group=group)  # (L,) every tail positive
        if self.dense is not None:
            dense_logits = scale_grad(self.dense(hidden).float(), share)  # (N * B, F), replicated
            dense_rows = reference_row_values(dense_logits, self.loss_kind)
            rows = torch.logaddexp(rows, dense_rows) if self.loss_kind == "softmax" else rows + dense_rows
            frequent = (position < self.num_dense).nonzero().squeeze(1)
            positive = positive.index_put((frequent,), dense_logits[samples[frequent], position[frequent]])
        loss = combine_loss(rows, positive, every, self.loss_kind)
        if self.aux_alpha() == 0.0:
            return loss
        main, auxiliary = self.aux_mix
        return main * loss + auxiliary * scale_grad(self._aux_loss(hidden, every), share)

    def _aux_loss(self, hidden: Tensor, targets: RaggedLabels) -> Tensor:
        """BCE of the cluster classifier against the clusters of each sample's labels (summed, batch mean)."""
        assert self.aux is not None
        logits = self.aux(hidden).float()  # (B, clusters): a few thousand columns at most
        count = logits.shape[1]
        target = logits.new_zeros(logits.shape[0], count + 1)  # the last column takes the pads, cut off
        clusters = targets.mask_pads(self.label_cluster[targets.label_ids().long()], count)  # (L,)
        target.index_put_((targets.sample_ids(), clusters), target.new_ones(()))  # a device 1: capturable
        loss = F.binary_cross_entropy_with_logits(logits, target[:, :count], reduction="sum")
        return loss / hidden.shape[0]

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, ids)`` over all labels, scored in chunks; ids are the original label ids;
        sharded: over every rank's labels, the same on every rank."""
        self._check_k(k)
        hidden = self._hidden(features)
        sparse_k = min(k, self.weight.shape[0])
        scores, ids = fixed_fanin_topk(
            hidden, self.weight, self.index, sparse_k, self.bias,
            group=self.config.group, chunk_size=self.config.topk_chunk, impl=self.config.impl,
        )  # fmt: skip
        ids = ids + self.num_dense + self.tail_start  # (B, k_r) positions
        if self.shard is not None:
            if self.dense is not None and self.rank == 0:  # the replicated frequent labels, counted once
                top = self.dense(hidden).float().topk(min(k, self.num_dense), dim=1)
                scores, ids = torch.cat([scores, top.values], 1), torch.cat([ids, top.indices], 1)
            return merge_topk(scores, self.label_order[ids], k, group=self.shard.group)
        if self.dense is not None:
            dense_scores = self.dense(hidden).float()  # (B, F)
            top = dense_scores.topk(min(k, self.num_dense), dim=1)
            scores, ids = torch.cat([scores, top.values], 1), torch.cat([ids, top.indices], 1)
            best = scores.topk(k, dim=1)
            scores, ids = best.values, ids.gather(1, best.indices)
        return scores, self.label_order[ids]

    def after_step(self, step: int, epoch: float, *, lr: float) -> None:
        """Record the epoch (auxiliary weight) and rewire when the schedule says so."""
        self.epoch.fill_(epoch)
        self._set_epoch(float(epoch))
        fraction = rewire_fraction(self.config.dst, step, self._total_steps)
        count = round(fraction * self.config.fan_in)
        if count > 0:
            self.rewire(count)

    def _set_epoch(self, epoch: float) -> None:
        """The host copy of the epoch and the auxiliary mix it sets (filled without a host sync)."""
        self._epoch = epoch
        alpha = self.aux_alpha()
        self.aux_mix[0].fill_(1.0 - alpha)
        self.aux_mix[1].fill_(alpha)

    def capture_blocker(self, *, targets_static: bool) -> str | None:
        """Capturable on one process, with multi-class or padded multi-label targets
        (:meth:`~megaclass.targets.RaggedLabels.pad_to`), except on the reference backend (it sizes a
        tensor from the labels: a host sync)."""
        if self.sharded:
            return "a class-sharded head reduces its loss over ranks inside the step"
        if self.config.impl == "reference":
            return "head.impl=reference sizes a tensor from the labels (a host sync)"
        return None

    def graph_key(self) -> tuple:
        """Whether the auxiliary loss is computed, and the topology's version: a rewiring changes the index
        in place and the kernels' column order of it is rebuilt into new buffers."""
        return (self.aux_alpha() > 0.0, self.index._version)

    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.index.device)
        state = self.dst_rng_state.cpu()
        if state.numel() == generator.get_state().numel():
            generator.set_state(state)
        else:  # first rewiring, or a state saved on another device type
            generator.manual_seed(self._dst_seed + 1 + int(self.dst_rewirings))
        return generator

    @torch.no_grad()
    def rewire(self, count: int) -> None:
        """Prune up to ``count`` connections per index row and regrow as many; reset their optimizer state."""
        dst = self.config.dst
        generator = self._generator()
        threshold = dst.threshold if dst.mode is RewireMode.THRESHOLD else None
        rewired = prune_regrow(
            self.weight.data, self.index, dim=self.hidden_dim, group=self.config.group, count=count,
            threshold=threshold, generator=generator,
        )  # fmt: skip
        self.dst_rng_state = generator.get_state().to(self.dst_rng_state.device)
        self.dst_rewirings += 1
        self.dst_last_fraction.fill_(torch.count_nonzero(rewired) / rewired.numel())  # no float copy of it
        mask = expand_to_labels(rewired, self.config.group, self.weight.shape[0])  # (C_sparse, K)
        if self._track_rewired:
            self._rewired = mask if self._rewired is None else self._rewired | mask
        if dst.reset_optimizer_state and self._optimizer is not None:
            for value in self._optimizer.state.get(self.weight, {}).values():
                if isinstance(value, Tensor) and value.shape == self.weight.shape:
                    value.masked_fill_(mask, 0.0)

    def take_rewired(self) -> dict[str, Tensor]:
        """``{"weight": (C_sparse, K) mask}`` of the connections rewired since the last call (empty if none):
        state kept per weight elsewhere (a weight average) restarts there. The first call starts tracking."""
        self._track_rewired = True
        rewired, self._rewired = self._rewired, None
        return {} if rewired is None else {"weight": rewired}

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing: list,
        unexpected: list, errors: list,
    ) -> None:  # fmt: skip
        key = prefix + "dst_rng_state"
        if key in state_dict:  # its size depends on the device type that saved it
            self.dst_rng_state = state_dict[key].clone()
        clusters = state_dict.get(prefix + "label_cluster")
        if self.aux is None and clusters is not None and self.config.aux_enabled:
            # Built without label features (a run folder reloaded for inference): the saved clusters and
            # the classifier's shape rebuild the auxiliary part, then the values load below.
            num_clusters = state_dict[prefix + "aux.weight"].shape[0]
            self._build_aux(torch.zeros_like(clusters, device=self.index.device), num_clusters)
            self._aux_missing = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + "epoch" in state_dict:
            self._set_epoch(float(state_dict[prefix + "epoch"]))  # one sync, at load time

    def metrics(self) -> dict[str, float]:
        """Sparsity, share of connections rewired last time, rewirings so far, auxiliary weight."""
        return {
            "sparsity": 1.0 - self.config.fan_in / self.hidden_dim,
            "rewired_fraction": float(self.dst_last_fraction),
            "rewirings": float(self.dst_rewirings),
            "aux_alpha": self.aux_alpha(),
        }

    def state_bytes(self) -> dict[str, int]:
        """Bytes held: weights, structure (index, buffers, the index's cached column order), optimizer state
        (measured once bound, else AdamW's two fp32 moments), and what a dense ``C x D`` head with AdamW would
        need."""
        held = super().state_bytes()
        held["structure"] += cached_bytes(self.index)  # the column order its backward pass cached
        params = list(self.parameters())
        if self._optimizer is not None and any(p in self._optimizer.state for p in params):
            optimizer = sum(
                v.numel() * v.element_size()
                for p in params
                for v in self._optimizer.state.get(p, {}).values()
                if isinstance(v, Tensor)
            )
        else:
            optimizer = sum(2 * 4 * p.numel() for p in params)
        dense = self.context.num_classes * (self.context.in_features + 1) * 4
        return {**held, "optimizer": optimizer, "dense_weights": dense, "dense_optimizer": 2 * dense}

    @classmethod
    def planned_bytes(
        cls, config: SparseHeadConfig, context: HeadContext, request: PlanRequest
    ) -> dict[str, PlannedBytes]:
        """``(C, K)`` weights and biases, the intermediate layer, the dense head of frequent labels and the
        auxiliary cluster classifier (the trainer gives it label features) with as many gradients and the
        optimizer's moments; the index rows, label maps and the index's column order that the backward pass
        caches (a connection id each, and column pointers per chunk); per batch the hidden features, one chunk
        of gathered inputs ``(B, chunk, K)`` and the positives' ``B x K`` terms, and on a GPU the kernels'
        input-gradient buffer (a chunk of labels) and the fused pass's per-row partials (a row a tile); after
        a step, a rewiring's masks and scratch."""
        classes, fan_in = context.num_classes, config.fan_in
        hidden = config.intermediate or context.in_features
        tail = classes - config.dense_frequent
        groups = -(-tail // config.group)
        clusters = 0
        if config.aux_enabled and config.aux_clusters == "auto":
            clusters = (
                1 << max(0, math.ceil(math.log2(classes / config.aux_leaf)))
                if classes > config.aux_leaf
                else 1
            )
        elif config.aux_enabled:
            clusters = min(int(config.aux_clusters), classes)
        weights = tail * fan_in + (tail if config.bias else 0)
        if config.intermediate:
            weights += (context.in_features + 1) * hidden
        if config.dense_frequent:
            weights += (hidden + 1) * config.dense_frequent
        if clusters:
            weights += (hidden + 1) * clusters
        params = weights * (2 if request.low_precision else 4)
        index_bytes = 4 if config.index_dtype == "int32" else 8
        maps = 2 * classes * 8 + (classes * 8 if clusters else 0)  # label order, position (and cluster)
        grouped = request.device_type == "cuda" and grouped_tiles(config.group, fan_in)
        connections = (groups if grouped else tail) * fan_in  # the tensor-core kernels order index rows
        chunks = (
            1 if request.device_type == "cuda" else -(-tail // max(1, (1 << 22) // max(1, request.batch)))
        )
        order = connections * (4 if connections < 2**31 else 8) + (chunks * hidden + 1) * 8
        gathered = min(
            request.batch * groups * fan_in, 1 << 22
        )  # a chunk of (B, chunk, K) inputs, as the ops bound it
        activations = (
            3 * request.batch * (hidden + clusters) + 3 * gathered + 2 * request.batch * fan_in
        ) * 4
        if request.device_type == "cuda":  # a chunk of labels' input-gradient buffer in the kernels, in the
            # features' dtype, and the fused pass's per-row partials, a (B,) float32 row a tile of the chunk
            tiles, rows_a_tile = (groups, fan_in) if grouped else (-(-tail // LABEL_TILE), LABEL_TILE)
            chunk_tiles = min(tiles, max(1, CHUNK_ROWS // rows_a_tile))
            activations += request.batch * chunk_tiles * (rows_a_tile * request.feature_bytes + 4)
        scored = request.eval_batch * (hidden + 2 * min(config.topk_chunk, tail)) * 4
        count = round(config.dst.fraction * fan_in) if config.dst.enabled else 0  # the first rewiring's
        smaller = "optim.head_state=bf16_sr" if not request.low_precision else "head.fan_in"
        return {
            "weights": PlannedBytes(params, 0, "head.fan_in"),
            "gradients": PlannedBytes(params, 0, smaller),
            "optimizer": PlannedBytes(request.optimizer_moments * params, 0, smaller),
            "index": PlannedBytes(groups * fan_in * index_bytes + maps + order, 0, "head.group"),
            "activations": PlannedBytes(activations, 0, "train.batch_size"),
            "rewiring": PlannedBytes(
                rewiring_scratch_bytes(tail, fan_in, config.group, count), 0, "head.dst.fraction"
            ),
            "evaluation": PlannedBytes(scored, 0, "head.topk_chunk"),
            "checkpoint": PlannedBytes(0, 0),  # its state dict holds the parameters and buffers themselves
        }
