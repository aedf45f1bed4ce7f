"""HF-Softmax: each mini-batch's softmax over a small set of active classes chosen by a nearest-class index.

    megaclass train ... --head selected --set head.sample_num=1000 --set head.index=gpu \\
        --set head.interval=100 --set head.store=host

Each step the active set is the batch's true classes, each sample's nearest classes by an index over the
weight rows (pooled), and random classes up to exactly ``sample_num`` (Zhang et al., "Accelerated Training
for Massive Classification via Dynamic Class Selection", AAAI 2018). By default about half the budget comes
from the index and the rest is random (``neighbour_share``): the original's rule, ``sample_num // B + 1``
neighbours a sample, fills the whole budget with neighbours at large batches, and classes that are nobody's
neighbour then go untrained as negatives (1.8 points top-1 under dense on deb-files against 0.8 with half,
benchmarks/RESULTS.md).

Only the active rows are pulled from the row store, get a gradient, and are updated in :meth:`after_step`
with the scheduled learning rate and the global step, by a row-sparse optimizer that catches a row up on the
decay and second moment of the steps it sat out (:mod:`megaclass.ops.row_optimizers`; the command line's
recipe makes it ``optim.head``'s optimizer). The index is rebuilt every ``interval`` steps from the current
rows.

Beyond the original, switchable: a GPU index that rebuilds in milliseconds (``index=gpu``); rows in host
memory (``store=host``); a sampling correction ``log(1/q)`` on the randomly filled logits
(``logq_correction``); random classes only for the first ``warmup_random_steps`` steps (neighbours of immature
rows are noise); cosine margins (ArcFace, CosFace); coverage (the share of the full softmax mass the active
set holds) measured exactly every ``coverage_every`` steps and reported by :meth:`metrics`.

``--head partial_fc`` is the same head with the index off and 10% of the classes active: Partial FC's
uniform sampling (An et al., ICCV 2021 workshops), the baseline every selection rule is measured against.

Given a :class:`~megaclass.ops.collectives.ClassShard`, each rank holds its own classes (its own store and
index) and selects ``ceil(sample_num / N)`` of them for the global batch; the normaliser is one
log-sum-exp over the union of the ranks' active sets, and a sample's true classes are always active at their
owners.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from megaclass.heads.base import Head, HeadContext, PlannedBytes, PlanRequest, StateKind
from megaclass.index import ClassSelector, Selection, select_active
from megaclass.index.base import THOROUGH_FACTOR, Metric
from megaclass.index.config import (
    AnnoyIndexConfig,
    ClusterIndexConfig,
    ExactIndexConfig,
    IndexConfig,
    NoIndexConfig,
    build_index,
)
from megaclass.index.kmeans import (
    DEFAULT_PROBES,
    cluster_layout,
    cold_build_scratch_bytes,
    query_scratch_bytes,
)
from megaclass.index.selection import coprime_multipliers
from megaclass.ops.chunked_topk import chunked_topk, scoring_chunk
from megaclass.ops.collectives import (
    ClassShard,
    all_reduce_logsumexp,
    all_reduce_replicated,
    local_targets,
    merge_topk,
    world_of,
)
from megaclass.ops.margins import MarginConfig, margin_logits
from megaclass.ops.row_optimizers import RowOptimizerKind
from megaclass.schema import ConfigError
from megaclass.store import RowOptimizerConfig, RowStore, build_store
from megaclass.store.average import RowAverage
from megaclass.targets import RaggedLabels, Targets, as_ragged

__all__ = ["SelectedHead", "SelectedHeadConfig"]

_READ_BLOCK = 1 << 20  # rows read from the store at once by topk and coverage
_INDEX_TOPK_CLASSES = 10**7  # topk_search=auto searches the index from this many classes
_TOPK_CANDIDATES = 4  # an index topk scores this many times k of the index's classes exactly
# a parameter-server run's trainer holds the index where its snapshot has at most this many row values
_TRAINER_INDEX_VALUES = 1 << 32


PARTIAL_FC_DEFAULTS = {"sample_num": 0.1, "index": {"type": "none"}}
"""What ``type: partial_fc`` changes in the selected head's defaults: random classes, 10% of them."""


@dataclass(frozen=True)
class SelectedHeadConfig:
    """Options of :class:`SelectedHead` (``type: selected``: the original's, but half the budget random;
    ``type: partial_fc``: :data:`PARTIAL_FC_DEFAULTS`)."""

    type: Literal["selected", "partial_fc"] = "selected"
    sample_num: int | float = 1000  # active classes per step: a count, or a fraction in (0, 1) of the classes
    # (all of a batch's true classes are kept even beyond it)
    index: IndexConfig = field(default_factory=ClusterIndexConfig)  # gpu, annoy, exact or none
    interval: int = 100  # steps between index rebuilds
    neighbours: int = 0  # nearest classes asked per sample; 0: from neighbour_share
    neighbour_share: float = 0.5  # about this share of sample_num from the index (round(share * sample_num
    # / B) per sample), the rest random; 1: the original's sample_num // B + 1 per sample
    metric: Literal["cosine", "dot"] = "cosine"  # index similarity (annoy is always angular)
    store: str = "gpu"  # where rows live: gpu (the compute device), host (host memory) or ps://...
    # where a parameter-server run's cluster index lives: the trainer (a snapshot on its device, refreshed
    # from the rows it pushed), the shards (each over its own rows, asked every step); auto: the trainer
    # where the snapshot holds at most 2^32 row values (8 GiB in bf16)
    index_on: Literal["auto", "trainer", "shards"] = "auto"
    store_dtype: Literal["float32", "bf16_sr"] = "float32"  # bf16_sr: rows and row-optimizer state in bf16,
    # updated with stochastic rounding (half the bytes; ps://: the shards' --dtype, which must match)
    optimizer: RowOptimizerConfig = field(default_factory=RowOptimizerConfig)  # row-sparse, on the store
    # (the command line's recipe sets optim.head's: the rows get its lr)
    margin: MarginConfig = field(default_factory=MarginConfig)  # ArcFace / CosFace over the active set
    warmup_random_steps: int = 0  # steps with random classes only, before the first index build
    logq_correction: bool = False  # add log(1/q) to randomly filled logits (sampled-softmax correction)
    coverage_every: int = 1000  # steps between exact coverage measurements (0: never); one full pass each
    chunk_size: int = 8192  # classes scored at once in topk and coverage
    # prediction and evaluation top-k: exact (every row scored), index (4k of the index's classes scored
    # exactly); auto: index from 10^7 classes, where a scan of every row per batch dominates evaluation
    topk_search: Literal["auto", "exact", "index"] = "auto"
    init_bound: float | None = None  # rows start U(-b, b); None: 1 / sqrt(D)
    seed: int = 0  # seeds the rows, the index and the random fill

    def __post_init__(self) -> None:
        fraction = isinstance(self.sample_num, float)
        if (fraction and not 0 < self.sample_num < 1) or (not fraction and self.sample_num < 1):
            raise ConfigError(
                f"head.sample_num: expected a count >= 1 or a fraction in (0, 1), got {self.sample_num}"
            )
        for name in ("interval", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"head.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("neighbours", "warmup_random_steps", "coverage_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"head.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.neighbour_share <= 1:
            raise ConfigError(f"head.neighbour_share must be in [0, 1], got {self.neighbour_share}")
        if self.init_bound is not None and self.init_bound < 0:
            raise ConfigError(f"head.init_bound must be >= 0, got {self.init_bound}")
        if not isinstance(self.index, IndexConfig):
            raise ConfigError(
                f"head.index: expected an index config (ClusterIndexConfig(), ExactIndexConfig(), ...), got "
                f"{self.index!r}; in YAML or --set a name does: index: exact"
            )
        if self.topk_search not in ("auto", "exact", "index"):
            raise ConfigError(f"head.topk_search: expected auto, exact or index, got {self.topk_search!r}")
        if self.topk_search == "index" and isinstance(self.index, NoIndexConfig):
            raise ConfigError("head.topk_search=index needs an index (head.index: gpu, annoy or exact)")
        if self.index_on not in ("auto", "trainer", "shards"):
            raise ConfigError(f"head.index_on: expected auto, trainer or shards, got {self.index_on!r}")
        ps_trainer = self.index_on == "trainer" and self.store.startswith("ps://")
        if ps_trainer and not isinstance(self.index, ClusterIndexConfig):
            raise ConfigError(
                f"head.index_on=trainer: a parameter-server run's trainer holds a cluster index only "
                f"(head.index=gpu), got {self.index.type!r}"
            )
        if self.type == "partial_fc" and not isinstance(self.index, NoIndexConfig):
            raise ConfigError(
                f"head.index: partial_fc draws its classes at random (index none), got {self.index.type!r}; "
                "use head.type=selected for an index"
            )

    def index_on_trainer(self, num_classes: int, dim: int) -> bool:
        """Whether the trainer holds the index over ``num_classes`` rows of width ``dim`` (it always does
        but with a parameter-server store, whose shards answer where ``index_on`` says so; an exact scan
        and Annoy stay on the shards)."""
        if not self.store.startswith("ps://"):
            return True
        if self.index_on == "auto":
            return isinstance(self.index, ClusterIndexConfig) and num_classes * dim <= _TRAINER_INDEX_VALUES
        return self.index_on == "trainer"

    def active_classes(self, num_classes: int) -> int:
        """The active-set size over ``num_classes`` classes: the count, or the fraction's (at least 1)."""
        if isinstance(self.sample_num, float):
            return max(1, math.ceil(self.sample_num * num_classes))
        return self.sample_num


class SelectedHead(Head):
    """Softmax over a per-step active set of classes whose rows live in a :class:`~megaclass.store.RowStore`.

    The store and the index are created on the head's device at first use (after ``head.to(device)``).
    One :meth:`forward` per optimizer step: its rows' gradients are applied in the next :meth:`after_step`.

    Args:
        config: selection, index, store and loss options.
        context: ``in_features`` (D), ``num_classes`` (C), ``multilabel``.
        shard: the class range this process holds (None: all classes).

    >>> head = SelectedHead(SelectedHeadConfig(sample_num=8, index=ExactIndexConfig()),
    ...                     HeadContext(in_features=4, num_classes=50, multilabel=False))
    >>> loss = head(torch.randn(3, 4), torch.tensor([1, 2, 49]))
    >>> loss.backward(); head.after_step(1, 0.0, lr=0.1)
    >>> head.topk(torch.randn(3, 4), 5)[1].shape
    torch.Size([3, 5])
    """

    def __init__(
        self, config: SelectedHeadConfig, context: HeadContext, shard: ClassShard | None = None
    ) -> None:
        super().__init__(context, shard)
        if config.margin.enabled and context.multilabel:
            raise ConfigError(
                "head.margin needs multi-class data (one label per sample), the data is multi-label"
            )
        self.config = config
        start, stop, _ = self.row_range()
        self.num_rows = stop - start  # the rows held here
        rank, world = (0, 1) if shard is None else world_of(shard.group)
        self.sample_num = -(-config.active_classes(context.num_classes) // world)  # this rank's share
        self.seed = config.seed + 7919 * rank  # the rank's own rows, index and random fill
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)
        self.store: RowStore | None = None
        self.selector: ClassSelector | None = None
        self._generator = torch.Generator().manual_seed(self.seed)  # moves to the head's device
        self._step = 0
        self._pending: tuple[Tensor, Tensor] | None = None  # (ids (S,), rows (S, D) leaf with .grad)
        self._dirty = torch.zeros(
            0, dtype=torch.bool
        )  # (C_r,) once materialised: rows pushed since the build
        self._mark = torch.zeros(0, dtype=torch.int32)  # (C_r,) once materialised: selection scratch
        self._multipliers = coprime_multipliers(self.num_rows, seed=self.seed)
        self._metrics: dict[str, float] = {}
        self._counts: dict[str, Tensor] = {}  # device counts of the last selection, read by metrics()
        self._index_builds = 0  # a rebuilt index may hold new buffers: a captured step is captured again
        self._captured: tuple[Tensor, Selection, Tensor] | None = None  # (features, selection, rows)

    # ------------------------------------------------------------------ parts, built on the head's device
    def materialize(self) -> RowStore:
        """Create the store and the index on the head's device now (else done at first use); the store."""
        if self.store is None:
            config, device = self.config, self._anchor.device
            self.store = build_store(
                config.store,
                num_rows=self.num_rows,
                dim=self.context.in_features,
                device=device,
                optimizer=config.optimizer,
                seed=self.seed,
                init_bound=config.init_bound,
                dtype=config.store_dtype,
            )
            # where the parameter-server shards answer nearest-row queries, the trainer holds no index
            self.selector = None
            if self._store_query() is None:
                self.selector = build_index(
                    config.index,
                    metric=self._metric(),
                    device=device,
                    seed=self.seed,
                    chunk_size=config.chunk_size,
                )
            # rows updated since the last index build: a snapshot index refreshes only those
            self._dirty = torch.zeros(self.num_rows, dtype=torch.bool, device=device)
            self._mark = torch.full(
                (self.num_rows,), torch.iinfo(torch.int32).max, dtype=torch.int32, device=device
            )
            self._multipliers = self._multipliers.to(device)
            # the random fill draws on the device: a host draw would need a synchronising copy each step
            generator = torch.Generator(device=device).manual_seed(self.seed)
            if generator.device.type == self._generator.device.type:
                generator.set_state(self._generator.get_state())  # a state loaded before materialising
            self._generator = generator
        return self.store

    def _metric(self) -> str:
        return "cosine" if self.config.margin.enabled else self.config.metric

    def rebuild_index(self) -> None:
        """Rebuild the index from the current rows now (refreshing the rows updated since the last build)."""
        store = self.materialize()
        if self.selector is None:
            return
        changed = None
        if self.selector.is_built:
            changed = torch.nonzero(self._dirty).squeeze(
                1
            )  # (n,) ids; host sync: the count sizes the refresh
        self._dirty.zero_()
        self.selector.build(store.rows(), changed=changed)
        self._index_builds += 1

    def _store_query(self) -> Any:
        """The store's own nearest-row query (``store=ps``: each shard answers for its rows, where the
        trainer holds no index), or None."""
        config = self.config
        if isinstance(config.index, NoIndexConfig):
            return None
        if config.index_on_trainer(self.num_rows, self.context.in_features):
            return None
        return getattr(self.store, "query_nearest", None)

    def _uses_index(self) -> bool:
        has_index = self.selector is not None or self._store_query() is not None
        return has_index and self._step >= self.config.warmup_random_steps

    def _neighbours(
        self, features: Tensor, count: int, *, metric: str | None = None, thorough: bool = False
    ) -> Tensor:
        """``(B, count)`` nearest class ids (``-1``: none) from the local index or the store's shards, ranked
        by ``metric`` where the index can (None: the selection's); ``thorough``: the wider search evaluation
        makes (the shards search ``THOROUGH_FACTOR`` times the clusters, their indexes refreshed with every
        update first)."""
        store_query = self._store_query()
        if store_query is None:
            if metric is not None and Metric(metric) not in self.selector.ranks_by:
                metric = None
            return self.selector.query(features, count, metric=metric, thorough=thorough)
        index = self.config.index
        # the shards' cluster indexes lag the rows by at most `interval` steps like a local one (a thorough
        # search, by none: a ranking wants the rows as they are); exact: a scan
        age = 0 if isinstance(index, ExactIndexConfig) else 1 if thorough else self.config.interval
        # the shards split the index's probes between them: as many clusters searched as a local index's
        probes = (
            index.probes
            if isinstance(index, ClusterIndexConfig) and index.probes != "auto"
            else DEFAULT_PROBES
        )
        metric = metric or self._metric()
        probes *= THOROUGH_FACTOR if thorough else 1
        return store_query(features, count, metric=metric, max_index_age=age, probes=probes)[1]

    # ------------------------------------------------------------------ selection
    def select(self, features: Tensor, targets: Targets) -> Selection:
        """The active classes for ``features (B, D)`` and their ``targets`` (true classes first).

        No host sync: ``S = min(C, max(sample_num, L))`` classes for ``L`` label entries.
        """
        self.materialize()
        labels = as_ragged(targets).indices.to(features.device)  # (L,)
        neighbours = None
        if self._uses_index():
            if self.selector is not None and not self.selector.is_built:
                self.rebuild_index()
            count = min(self._neighbour_count(features.shape[0]), self.num_rows)
            if count > 0:
                neighbours = self._neighbours(features.detach(), count)
        return select_active(
            labels,
            neighbours,
            sample_num=self.sample_num,
            num_classes=self.num_rows,
            generator=self._generator,
            mark=self._mark,
            multipliers=self._multipliers,
        )

    def _neighbour_count(self, batch: int) -> int:
        config, batch = self.config, max(1, batch)
        if config.neighbours:
            return config.neighbours
        if config.neighbour_share == 1:
            return self.sample_num // batch + 1
        return round(config.neighbour_share * self.sample_num / batch)

    def pull_active(self, ids: Tensor) -> Tensor:
        """``(S, D)`` rows of ``ids``: a leaf whose gradient the next :meth:`after_step` pushes."""
        rows = self.materialize().pull(ids).detach().requires_grad_(torch.is_grad_enabled())  # (S, D)
        self._pending = (ids, rows)
        return rows

    # ------------------------------------------------------------------ loss
    def _check_inputs(self, features: Tensor, targets: Targets) -> RaggedLabels:
        self._check_features(features)
        if not self.context.multilabel and not isinstance(targets, Tensor):
            raise ValueError("targets: multi-class data expects a LongTensor (B,) of class ids")
        ragged = as_ragged(targets)
        if ragged.batch_size != features.shape[0]:
            raise ValueError(f"targets: {ragged.batch_size} samples for {features.shape[0]} feature rows")
        return ragged

    def _logits(
        self,
        features: Tensor,
        rows: Tensor,
        target_position: Tensor | None,
        *,
        margin_everywhere: bool = False,
    ) -> Tensor:
        """``(B, S)`` logits of ``features (B, D)`` against ``rows (S, D)`` (scaled cosines with a margin;
        ``target_position (B,)``: each row's target column, ``-1`` for none when ``margin_everywhere``)."""
        if not self.config.margin.enabled:
            return features.float() @ rows.float().T
        normalise = torch.nn.functional.normalize
        cosine = normalise(features.float(), dim=1) @ normalise(rows.float(), dim=1).T  # (B, S)
        if target_position is None and not margin_everywhere:
            return cosine * self.config.margin.scale
        return margin_logits(cosine, target_position, self.config.margin)

    def forward(self, features: Tensor, targets: Targets) -> Tensor:
        """Mean softmax cross-entropy over the active set (multi-label: mean over each sample's labels);
        sharded: the global batch's, over the union of the ranks' active sets, held by every rank."""
        ragged = self._check_inputs(features, targets)
        if self.shard is not None:
            return self._sharded_loss(features, targets)
        selection = self.select(features, targets)
        rows = self.pull_active(selection.ids)  # (S, D)
        columns = selection.label_columns  # (L,) column of each label entry
        single = None if self.context.multilabel else columns
        logits = self._logits(features, rows, single)  # (B, S)
        if self.config.logq_correction:
            logits = logits + selection.logit_adjust
        log_probs = torch.log_softmax(logits, dim=1)
        if features.is_cuda and torch.cuda.is_current_stream_capturing():
            self._captured = (features.detach(), selection, rows)  # recorded by after_replay, each replay
        else:
            self._record(features.detach(), selection, rows.detach())
        if single is not None:
            return -log_probs.gather(1, single[:, None]).mean()
        sample = ragged.sample_ids().to(features.device)  # (L,)
        lengths = ragged.lengths().to(features.device)
        weight = 1.0 / lengths[sample].clamp_min(1)  # each sample's labels share one unit of loss
        labelled = (lengths > 0).sum().clamp_min(1)  # the mean's denominator, kept on the device
        return -(log_probs[sample, columns] * weight).sum() / labelled

    def _record(self, features: Tensor, selection: Selection, rows: Tensor) -> None:
        """The host side of a step: coverage when due (a full pass, never inside a captured step) and the
        selection's counts for :meth:`metrics`."""
        if self.config.coverage_every and (self._step + 1) % self.config.coverage_every == 0:
            self._metrics["coverage"] = self._coverage(features, rows)
        self._metrics["active_classes"] = float(selection.ids.numel())
        self._counts = {"neighbour_classes": selection.num_neighbour}

    # ------------------------------------------------------------------ CUDA graph capture
    def capture_blocker(self, *, targets_static: bool) -> str | None:
        """Capturable with multi-class targets, rows the GPU reads in place (the device store, or host rows
        mapped for it) and an index queried on the device (``none``, ``exact``, ``gpu``): the selection has
        fixed shapes and never syncs."""
        if self.sharded:
            return "a class-sharded head reduces its loss over ranks inside the step"
        if not targets_static:
            return "multi-label targets are ragged: their size changes every step"
        if not self.materialize().capturable:
            if self.config.store == "host":  # rows CUDA would not lock, or a weight average (HostStore)
                return "head.store=host: each step's rows are gathered on the host, not mapped for the GPU"
            return f"head.store={self.config.store}: rows are pulled over the network"
        if not isinstance(self.config.index, (NoIndexConfig, ExactIndexConfig, ClusterIndexConfig)):
            return f"head.index={self.config.index.type} is queried on the host"
        if self.config.margin.enabled:
            return "head.margin: the target logits are placed with a data-dependent size (a host sync)"
        if isinstance(self.config.index, ClusterIndexConfig) and self.config.index.background is True:
            return "head.index.background=true: a build swapped in between steps replaces the index's buffers"
        return None

    def graph_generators(self) -> list[torch.Generator]:
        """The device generator of the random fill."""
        self.materialize()  # the generator moves to the head's device with the store
        return [self._generator]

    def graph_key(self) -> tuple:
        """Whether the index is queried yet, and its builds: a rebuild may replace its buffers."""
        return (self._uses_index(), self._index_builds)

    def after_replay(self) -> None:
        """Hand the replayed step's rows to :meth:`after_step` and record the step (coverage when due)."""
        features, selection, rows = self._captured
        self._pending = (selection.ids, rows)
        self._record(features, selection, rows.detach())

    def close(self, *, wait: bool = True) -> None:
        """Close the row store, if made (its updates applied first, unless not ``wait``)."""
        if self.store is not None:
            self.store.close(wait=wait)

    def _sharded_loss(self, features: Tensor, targets: Targets) -> Tensor:
        """The loss of the global batch over the union of every rank's active set (see the module)."""
        assert self.shard is not None
        x, gathered = self.gather_batch(features, targets)  # (N * B, D)
        every = as_ragged(gathered).to(x.device)
        local = local_targets(every, self.shard.start, self.shard.stop)
        selection = self.select(x, local)
        rows = self.pull_active(selection.ids)  # (S_r, D)
        columns = torch.searchsorted(selection.ids[: selection.num_positive], local.indices)  # (L_r,)
        sample = local.sample_ids()  # (L_r,)
        position = None
        if self.config.margin.enabled:  # -1: the target is another rank's
            position = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device).index_put(
                (sample,), columns
            )
        logits = self._logits(x, rows, position, margin_everywhere=True)  # (N * B, S_r)
        if self.config.logq_correction:
            logits = logits + selection.logit_adjust
        self._metrics["active_classes"] = float(selection.ids.numel())
        self._counts = {"neighbour_classes": selection.num_neighbour}
        group = self.shard.group
        lse = all_reduce_logsumexp(torch.logsumexp(logits, dim=1), group=group)  # (N * B,) over the union
        lengths = every.lengths().clamp_min(1).to(torch.float32)  # (N * B,) global label counts
        owned = logits[sample, columns] / lengths[sample]  # (L_r,) each label's share of its sample's loss
        positive = all_reduce_replicated(torch.zeros_like(lse).index_add(0, sample, owned), group=group)
        labelled = (every.lengths() > 0).to(torch.float32)
        return ((lse - positive) * labelled).sum() / labelled.sum().clamp_min(1.0)

    # ------------------------------------------------------------------ between steps
    def after_step(self, step: int, epoch: float, *, lr: float) -> None:
        """Apply the pending row gradients with ``lr``; rebuild the index every ``interval`` steps."""
        if self._pending is not None:
            ids, rows = self._pending
            self._pending = None
            if rows.grad is not None:
                self.store.push(ids, rows.grad, step=step, lr=lr)
                self._dirty.index_fill_(0, ids, True)
        self._step = step
        if self.selector is not None and self._uses_index() and step % self.config.interval == 0:
            self.rebuild_index()

    def average_rows(self, decay: float) -> dict[str, RowAverage]:
        """The store's rows (``store.weight``), averaged by the store: ``gpu``, ``host``, and parameter
        servers started with ``--average-decay`` (none on those without). Before the average takes the rows'
        place, the index is brought up to the trained rows: an evaluation through it then refreshes nothing
        from the average."""
        average = self.materialize().start_average(decay, before_swap=self._before_average)
        return {} if average is None else {"store.weight": average}

    def _before_average(self) -> None:
        """Before the average takes the rows' place for an evaluation: the index that evaluation searches is
        brought up to the trained rows, as the evaluation would bring it (so training goes on as without
        an average)."""
        if self.selector is not None and self.topk_is_approximate():
            self._index_up_to_date()

    def _index_up_to_date(self) -> None:
        """Build the index, or refresh it with the rows updated since its last build (host sync: their
        count)."""
        if not self.selector.is_built or bool(self._dirty.any()):
            self.rebuild_index()

    def state_bytes(self) -> dict[str, int]:
        """Bytes held: the store's rows (``weights``), their row optimizer state (``row_optimizer``), and the
        index and selection buffers (``structure``)."""
        rows, optimizer = self.materialize().held_bytes()
        structure = sum(t.numel() * t.element_size() for t in (self._dirty, self._mark, self._multipliers))
        if self.selector is not None:
            structure += sum(t.numel() * t.element_size() for t in self.selector.state_dict().values())
        return {"weights": rows, "structure": structure, "row_optimizer": optimizer}

    def metrics(self) -> dict[str, float]:
        """Coverage (last measured), active and neighbour class counts, index build time (ms)."""
        metrics = dict(self._metrics)
        metrics.update({name: float(count) for name, count in self._counts.items()})  # host sync: a log
        if self.selector is not None:
            metrics.update(self.selector.metrics())
        return metrics

    # ------------------------------------------------------------------ all classes, chunked
    def _blocks(self) -> Iterator[tuple[int, Tensor]]:
        return self.materialize().blocks(_READ_BLOCK)

    @torch.no_grad()
    def _coverage(self, features: Tensor, active_rows: Tensor) -> float:
        """Mean over the batch of ``sum_active exp(z) / sum_all exp(z)`` with the exact logits (no margin)."""
        active = torch.logsumexp(self._logits(features, active_rows, None), dim=1)  # (B,)
        total = torch.full_like(active, -math.inf)
        for _, block in self._blocks():
            for begin in range(0, block.shape[0], self.config.chunk_size):
                chunk = self._logits(features, block[begin : begin + self.config.chunk_size], None)  # (B, c)
                total = torch.logaddexp(total, torch.logsumexp(chunk, dim=1))
        return float(torch.exp(active - total).mean())  # host sync: a logged number

    def topk_is_approximate(self) -> bool:
        """Whether :meth:`topk` searches the index (``head.topk_search``; ``auto``: from ``10^7`` classes;
        with an index, unsharded) rather than scoring every row."""
        search = self.config.topk_search
        if search == "exact" or isinstance(self.config.index, NoIndexConfig) or self.shard is not None:
            return False
        return search == "index" or self.num_rows >= _INDEX_TOPK_CLASSES

    @torch.no_grad()
    def topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, ids)`` each ``(B, k)``: logits (scaled cosines with a margin); sharded: over
        all ranks' classes, the same on every rank. Through the index where :meth:`topk_is_approximate`:
        its ``4k`` nearest classes scored exactly (ids ``-1``, scores ``-inf`` where it found fewer)."""
        self._check_k(k)
        if self.topk_is_approximate():
            return self._index_topk(features, k)
        return self._exact_topk(features, k)

    @torch.no_grad()
    def topk_recall(self, features: Tensor, k: int) -> float | None:
        """Share of the exact top-``k`` that :meth:`topk` finds for ``features``; None where it is exact.

        Both rankings score in fp32 (no autocast): what is measured is the search, not rounding.
        """
        if not self.topk_is_approximate():
            return None
        self._check_k(k)
        with torch.autocast(features.device.type, enabled=False):
            truth = self._exact_topk(features, k)[1]  # (B, k)
            found = self._index_topk(features, k)[1]  # (B, k)
        return float((found[:, :, None] == truth[:, None, :]).any(2).sum()) / max(1, truth.numel())

    def _index_topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The index's (or the shards') ``4k`` nearest classes of each sample by their thorough search, ranked
        there by the logits' metric and scored by the head's logits; a local index is refreshed first with
        the rows updated since its last build."""
        store = self.materialize()
        if self.selector is not None:
            # the rows updated since the last build are refreshed first: an index lags the rows by up to
            # `interval` steps, which selection allows and a ranking does not (host sync: evaluation)
            self._index_up_to_date()
            self.selector.wait()  # a background build under way: its index, not none
        # ranked by what the logits are (dot products without a margin), whatever the index trains with
        logits = "cosine" if self.config.margin.enabled else "dot"
        count = min(self.num_rows, _TOPK_CANDIDATES * k)
        candidates = self._neighbours(features, count, metric=logits, thorough=True).to(features.device)
        scores = torch.empty(candidates.shape, dtype=torch.float32, device=features.device)  # (B, n)
        block = max(1, (1 << 26) // (candidates.shape[1] * self.context.in_features))  # (b, n, D) at once
        for start in range(0, len(candidates), block):
            ids = candidates[start : start + block]  # (b, n)
            rows = store.pull(ids.flatten().clamp_min(0)).view(*ids.shape, -1)  # (b, n, D)
            part = features[start : start + block].float()
            if self.config.margin.enabled:
                normalise = torch.nn.functional.normalize
                part, rows = normalise(part, dim=1), normalise(rows.float(), dim=2)
            logits = torch.bmm(rows.float(), part[:, :, None]).squeeze(2)  # (b, n)
            if self.config.margin.enabled:
                logits = logits * self.config.margin.scale
            scores[start : start + block] = logits.masked_fill(ids < 0, float("-inf"))
        top = scores.topk(k, dim=1)
        return top.values, candidates.gather(1, top.indices).masked_fill(torch.isinf(top.values), -1)

    def _exact_topk(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        margin = self.config.margin
        best_scores = features.new_empty(features.shape[0], 0, dtype=torch.float32)
        best_ids = torch.empty(features.shape[0], 0, dtype=torch.int64, device=features.device)
        for start, block in self._blocks():
            scores, ids = chunked_topk(
                features.float(),
                block,
                min(k, block.shape[0]),
                cosine=margin.enabled,
                scale=margin.scale,
                chunk_size=self.config.chunk_size,
            )
            scores, ids = torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids + start], 1)
            best_scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
            best_ids = ids.gather(1, order)
        if self.shard is None:
            return best_scores, best_ids
        return merge_topk(best_scores, best_ids + self.shard.start, k, group=self.shard.group)

    # ------------------------------------------------------------------ checkpoint
    def state_layout(self) -> dict[str, StateKind]:
        """Store rows, their optimizer state and rebuild marks split by rows; index and RNG per rank."""
        layout: dict[str, StateKind] = {"selection.dirty": "rows", "selection.rng": "rank"}
        for name in self.materialize().state_dict():
            layout[f"store.{name}"] = "rows"
        if self.selector is not None:
            layout.update({f"index.{name}": "rank" for name in self.selector.state_dict()})
            layout["index.built"] = "rank"
        return layout

    def weights_state_dict(self) -> dict[str, Any]:
        """The rows alone (with the module's own entries): no row optimizer state, selection state or index,
        which inference rebuilds where it searches one (a 10^8-row head's kept weights: 6 of 28 GiB)."""
        training_only = ("store.optim.", "selection.", "index.")
        return {key: value for key, value in self.state_dict().items() if not key.startswith(training_only)}

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        store = self.materialize()
        for name, tensor in store.state_dict().items():
            destination[f"{prefix}store.{name}"] = tensor
        if self.selector is not None and self.selector.is_built:
            destination[f"{prefix}index.built"] = torch.tensor(1)
            for name, tensor in self.selector.state_dict().items():
                destination[f"{prefix}index.{name}"] = tensor
        destination[f"{prefix}selection.rng"] = self._generator.get_state()
        destination[f"{prefix}selection.step"] = torch.tensor(self._step)
        destination[f"{prefix}selection.dirty"] = self._dirty  # streamed from where it lives, as the rows

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        store = self.materialize()
        ours = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if set(ours) == {"store.weight"}:  # weights alone (weights_state_dict)
            store.load_rows(ours["store.weight"])
            self._dirty.fill_(True)  # every row moved: an index built is refreshed, else built at first use
            if self.selector is not None and self.selector.is_built:
                self.rebuild_index()
            return
        for key in ("selection.rng", "selection.step", "selection.dirty"):
            if key not in ours:
                missing_keys.append(prefix + key)
                return
        store.load_state_dict({k[len("store.") :]: v for k, v in ours.items() if k.startswith("store.")})
        index_state = {k[len("index.") :]: v for k, v in ours.items() if k.startswith("index.")}
        if self.selector is not None and index_state.pop("built", None) is not None:
            if index_state:
                self.selector.load_state_dict(index_state)
            else:  # an index that keeps no state (exact) serves straight from the rows
                self.selector.build(store.rows())
        elif index_state:
            unexpected_keys.extend(prefix + "index." + key for key in index_state)
        try:
            self._generator.set_state(ours["selection.rng"])
        except RuntimeError:  # saved on another device type: the draws restart from a derived seed
            self._generator.manual_seed(self.seed + int(ours["selection.step"]))
        self._step = int(ours["selection.step"])
        self._dirty.copy_(ours["selection.dirty"])
        self._pending = None
        self._index_builds += 1  # the index was loaded into new buffers

    def extra_repr(self) -> str:
        c = self.config
        start, stop, classes = self.row_range()
        return (
            f"in_features={self.context.in_features}, classes=[{start}, {stop}) of {classes}, "
            f"sample_num={self.sample_num}, index={c.index.type}, store={c.store}, interval={c.interval}"
        )

    @classmethod
    def planned_bytes(
        cls, config: SelectedHeadConfig, context: HeadContext, request: PlanRequest
    ) -> dict[str, PlannedBytes]:
        """The store's fp32 rows and row-optimizer state where ``head.store`` puts them (``ps://``: on the
        servers; 2 bytes a value with ``store_dtype: bf16_sr``), the selection buffers and the
        index (where the trainer holds it), the active rows' gradients, ``B x S`` logits and the index's
        search per batch."""
        classes, dim = context.num_classes, context.in_features
        element = 2 if config.store_dtype == "bf16_sr" else 4  # per-row step counts stay fp32
        shapes = config.optimizer.state_shapes(dim).values()
        rows = classes * dim * element
        state = sum(classes * math.prod(shape) * (element if shape else 4) for shape in shapes)
        # the parameter servers' rows and state reach a checkpoint as float32
        saved_rows, saved_state = classes * dim * 4, sum(classes * math.prod(shape) * 4 for shape in shapes)
        on_device = config.store in ("gpu", "device")
        local = config.store in ("gpu", "device", "host")

        def placed(count: int, saved: int, setting: str) -> PlannedBytes:
            """``count`` bytes where the store holds them; on parameter servers, ``saved`` (float32) bytes
            written to checkpoints from there."""
            if not local:
                return PlannedBytes(0, 0, setting, saved)
            return PlannedBytes(count, 0, setting) if on_device else PlannedBytes(0, count, setting)

        active = min(
            classes, max(config.active_classes(classes), request.batch)
        )  # S: at least the batch's labels
        on_trainer = config.index_on_trainer(classes, dim)  # else the parameter servers' shards hold it
        index = (
            _planned_index_bytes(config.index, classes, dim, device_type=request.device_type)
            if on_trainer
            else (0, 0, 0)
        )
        selection = classes * (1 + 4) + 64 * 8  # rows updated since the build, selection marks, multipliers
        logits = 3 * request.batch * active * 4  # (B, S) logits, log-probabilities, their gradient
        pulled = active * dim * 4 * (2 if config.margin.enabled else 1)  # (S, D) rows (normalised too)
        # pinned rows out, gradients back, where host rows are gathered on the host (not mapped for the GPU:
        # a weight average, or a lock CUDA refused); counted for every host store
        staged = 2 * active * dim * 4 if config.store == "host" else 0
        block = 0 if on_device else min(classes, _READ_BLOCK) * dim * 4  # rows read to the device to score
        query = (  # the index's search for the batch's neighbours: the member rows it gathers and scores
            query_scratch_bytes(classes, dim, request.batch, device_type=request.device_type)
            if isinstance(config.index, ClusterIndexConfig) and on_trainer
            else 0
        )
        index_setting = (
            "head.index.dtype=int8" if isinstance(config.index, ClusterIndexConfig) else "head.index=none"
        )
        if on_device:
            optimizer_setting = "head.store=host"
        elif RowOptimizerKind(config.optimizer.kind) is RowOptimizerKind.SGD:
            optimizer_setting = "head.optimizer.momentum=0"
        elif config.store_dtype != "bf16_sr":
            optimizer_setting = "head.store_dtype=bf16_sr"
        else:
            optimizer_setting = "head.optimizer.kind=sgd"
        return {
            "weights": placed(rows, saved_rows, "head.store=host" if on_device else "head.store=ps://..."),
            "gradients": PlannedBytes(active * dim * 4, 0, "head.sample_num"),
            "optimizer": placed(state, saved_state, optimizer_setting),
            "index": PlannedBytes(index[0] + selection, index[1], index_setting),
            "index build": PlannedBytes(index[2], 0, "head.index=none"),
            "activations": PlannedBytes(
                logits + pulled + query + request.batch * dim * 4, staged, "head.sample_num"
            ),
            "evaluation": PlannedBytes(  # a chunk of (B, chunk) fp32 logits (and their cosines) and its top-k
                block
                + (1 + config.margin.enabled)
                * request.eval_batch
                * min(classes, scoring_chunk(config.chunk_size, request.eval_batch, dim, request.device_type))
                * 4,
                0,
                "eval.batch_size",
            ),
            # rows and their state stream to the checkpoint's files from the device, host memory or the
            # parameter servers, a block at a time (the trainer's block)
            "checkpoint": PlannedBytes(0, 0, "head.optimizer.momentum=0"),
        }


def _planned_index_bytes(
    config: IndexConfig, classes: int, dim: int, *, device_type: str
) -> tuple[int, int, int]:
    """``(device, host, build)`` bytes of the index over ``classes`` rows of width ``dim``, once built, and
    what its cold builds hold beyond it on the device (:func:`~megaclass.index.kmeans.
    cold_build_scratch_bytes`; less the index itself where builds are synchronous, as on a GPU by
    default)."""
    if isinstance(config, ClusterIndexConfig):
        row_bytes = {"auto": 2 if device_type == "cuda" else 4, "float32": 4, "bfloat16": 2, "int8": 1}[
            config.dtype
        ]
        groups, per_group, width = cluster_layout(
            classes, None if config.leaf_size == "auto" else config.leaf_size
        )
        clusters = groups * per_group  # the index's clusters and their padded width (index.kmeans)
        snapshot = classes * (dim * row_bytes + 4 + 4 + 8)  # rows, norms, scales, assignment
        structure = clusters * (
            width * 8 + 2 * dim * 4 + min(16, clusters) * 8
        )  # members, sums, centroids, near
        build = cold_build_scratch_bytes(classes, dim, row_bytes=row_bytes, device_type=device_type)
        background = config.background if config.background != "auto" else device_type != "cuda"
        if not background:  # a synchronous build drops the index it replaces before its snapshot is taken
            build = max(0, build - snapshot - structure)
        return snapshot + structure, 0, build
    if isinstance(config, AnnoyIndexConfig):  # Annoy's angular nodes: 12 + 4 D bytes, items and splits
        nodes = classes + config.ntrees * 2 * classes // (dim + 2)
        return 0, nodes * (12 + 4 * dim), 0
    return 0, 0, 0  # exact: a scan of the rows; none: no index
