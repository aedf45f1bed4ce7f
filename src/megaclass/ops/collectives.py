"""Class shards and the collectives of the ops' sharded forms, autograd-aware where a gradient flows back.

A :class:`ClassShard` names the contiguous classes ``[start, stop)`` of ``C`` that one rank of a process group
holds; the ops given a shard reduce their per-row statistics over the group with the functions here.

Every collective takes an optional ``group`` and is the identity (no communication, no copy beyond what the
result needs) when the group has one rank or no process group is open, so the same head code runs on one
process.

Two gradient rules appear here:

- :func:`gather_rows` concatenates every rank's rows; its backward sums the incoming gradients over the ranks
  and hands each rank its own rows' part (a reduce-scatter), times ``grad_scale``.
- :func:`all_reduce_replicated` / :func:`all_reduce_logsumexp` build a value every rank then holds identically
  (a replicated loss); their backward stays local: each rank back-propagates its own term's share, and the
  gradients of the sharded parameters are complete on their owner without further communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megaclass.targets import RaggedLabels, Targets

__all__ = [
    "ClassShard",
    "all_reduce_logsumexp",
    "all_reduce_max",
    "all_reduce_replicated",
    "gather_rows",
    "gather_targets",
    "local_targets",
    "merge_topk",
    "scale_grad",
    "shard_range",
    "world_of",
]


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s classes: contiguous, the first ``C mod N`` ranks one class more.

    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    if num_classes < world_size:
        raise ValueError(
            f"a class-sharded head needs C >= world size, got C={num_classes} on {world_size} ranks"
        )
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class ClassShard:
    """The contiguous classes ``[start, stop)`` of ``num_classes`` that this rank holds, over the ranks of
    ``group`` (None: the default group). A whole shard (``[0, C)``) is the single-process problem.

    >>> ClassShard.for_rank(10, 1, 3)
    ClassShard(start=4, stop=7, num_classes=10, group=None)
    >>> ClassShard(0, 10, 10).is_whole
    True
    """

    start: int  # this rank's first class
    stop: int  # one past its last class
    num_classes: int  # C over all ranks
    group: Any = None  # the process group sharing the classes; None: the default group

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {self.num_classes}")
        if not 0 <= self.start < self.stop <= self.num_classes:
            raise ValueError(
                f"shard: expected 0 <= start < stop <= num_classes={self.num_classes}, "
                f"got start={self.start}, stop={self.stop}"
            )

    @classmethod
    def for_rank(cls, num_classes: int, rank: int, world_size: int, group: Any = None) -> ClassShard:
        """Rank ``rank``'s part of ``num_classes`` split over ``world_size`` ranks (:func:`shard_range`)."""
        start, stop = shard_range(num_classes, rank, world_size)
        return cls(start, stop, num_classes, group)

    @property
    def is_whole(self) -> bool:
        """Whether this rank holds every class (world size 1): no collective is needed."""
        return self.start == 0 and self.stop == self.num_classes

    @property
    def size(self) -> int:
        """The number of classes this rank holds, ``stop - start``."""
        return self.stop - self.start


def local_targets(targets: RaggedLabels, start: int, stop: int) -> RaggedLabels:
    """The labels in ``[start, stop)`` of each sample, as ids relative to ``start`` (other labels dropped)."""
    owned = (targets.indices >= start) & (targets.indices < stop)  # (L,)
    counts = torch.zeros(targets.batch_size, dtype=torch.int64, device=owned.device)
    counts.index_add_(0, targets.sample_ids(), owned.to(torch.int64))
    indptr = torch.zeros(targets.batch_size + 1, dtype=torch.int64, device=owned.device)
    indptr[1:] = torch.cumsum(counts, 0)
    return RaggedLabels(indptr, targets.indices[owned] - start)


def world_of(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group`` (the default group), ``(0, 1)`` when no process group is open."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(tensor: Tensor, group: Any) -> Tensor:
    """``(world * n, ...)``: every rank's ``tensor (n, ...)`` (same shape on all ranks), in rank order."""
    import torch.distributed as dist

    tensor = tensor.contiguous()
    _, world = world_of(group)
    if dist.get_backend(group) == "nccl":
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor, group=group)
        return out
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, 0)


def _sum_own_rows(grad: Tensor, rows: int, group: Any) -> Tensor:
    """``(rows, ...)`` this rank's slice of the sum over ranks of ``grad (world * rows, ...)``."""
    import torch.distributed as dist

    rank, _ = world_of(group)
    grad = grad.contiguous()
    if dist.get_backend(group) == "nccl":
        out = grad.new_empty((rows, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out
    dist.all_reduce(grad, group=group)  # gloo has no reduce-scatter of one tensor
    return grad[rank * rows : (rank + 1) * rows]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.rows, ctx.group, ctx.grad_scale = x.shape[0], group, grad_scale
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        own = _sum_own_rows(grad.clone(), ctx.rows, ctx.group)
        return own * ctx.grad_scale if ctx.grad_scale != 1.0 else own, None, None


def gather_rows(x: Tensor, *, group: Any = None, grad_scale: float = 1.0) -> Tensor:
    """All ranks' ``x (B, ...)`` stacked in rank order: ``(world * B, ...)``; differentiable.

    Every rank must pass the same shape. The gradient that reaches ``x`` is the sum over ranks of the
    gradient of their copy's rows of this rank, times ``grad_scale`` (the world size makes a data-parallel
    mean of the encoder's gradients, as DDP and FSDP take, their sum).
    """
    _, world = world_of(group)
    if world == 1:
        return x
    return _GatherRows.apply(x, group, grad_scale)


def gather_targets(targets: Targets, *, group: Any = None) -> Targets:
    """All ranks' targets in rank order: a ``LongTensor (world * B,)`` or :class:`RaggedLabels` of them all.

    Ragged targets may hold a different number of labels on each rank.
    """
    _, world = world_of(group)
    if world == 1:
        return targets
    if isinstance(targets, Tensor):
        return _all_gather(targets, group)
    lengths = _all_gather(targets.lengths(), group)  # (world * B,)
    counts = _all_gather(targets.indices.new_tensor([targets.indices.numel()]), group)  # (world,)
    most = int(counts.max())  # host sync: the padded width of the label exchange
    padded = targets.indices.new_zeros(most)
    padded[: targets.indices.numel()] = targets.indices
    every = _all_gather(padded[None], group)  # (world, most)
    keep = torch.arange(most, device=every.device)[None, :] < counts[:, None]
    indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    indptr[1:] = torch.cumsum(lengths, 0)
    return RaggedLabels(indptr, every[keep])


class _AllReduceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def all_reduce_replicated(x: Tensor, *, group: Any = None) -> Tensor:
    """The sum over ranks of ``x``, held by every rank; backward passes each rank's gradient to its own term.

    Use it where every rank goes on to compute the same loss from the sum (a replicated loss).
    """
    _, world = world_of(group)
    return x if world == 1 else _AllReduceReplicated.apply(x, group)


def all_reduce_max(x: Tensor, *, group: Any = None) -> Tensor:
    """The elementwise maximum over ranks of ``x`` (no gradient), gathered and reduced locally."""
    import torch.distributed as dist

    _, world = world_of(group)
    if world == 1:
        return x.detach().clone()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.stack(parts).amax(0)


def _logsumexp_values(x: Tensor, group: Any) -> Tensor:
    import torch.distributed as dist

    top = all_reduce_max(x, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with no class anywhere
    total = torch.exp(x.detach() - top)
    dist.all_reduce(total, group=group)
    return top + torch.log(total)


class _AllReduceLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        out = _logsumexp_values(x, group)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, out = ctx.saved_tensors
        return grad * torch.exp(x - out), None  # d lse / d x_r = exp(x_r - lse)


def all_reduce_logsumexp(x: Tensor, *, group: Any = None) -> Tensor:
    """``log sum_r exp(x_r)`` over ranks, elementwise, held by every rank (stable: the max is reduced first).

    Differentiable with the replicated-loss rule: each rank's gradient is ``grad * exp(x_r - lse)``.
    """
    _, world = world_of(group)
    return x if world == 1 else _AllReduceLogSumExp.apply(x, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged, its gradient times ``scale``: a term every rank computes alike (a replicated part of a
    sharded loss) back-propagates ``1 / N`` of its gradient on each of ``N`` ranks, summed afterwards."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


@torch.no_grad()
def merge_topk(scores: Tensor, ids: Tensor, k: int, *, group: Any = None) -> tuple[Tensor, Tensor]:
    """Merge every rank's ``(scores, ids)`` of the same rows (each ``(B, k_r)``, any ``k_r``, global ids) into
    the top-``k``, ``(B, k)`` each. Ranks with fewer than ``k`` candidates pad with ``-inf`` scores.
    """
    _, world = world_of(group)
    if world > 1:
        if scores.shape[1] > k:
            scores, order = scores.topk(k, dim=1)  # (B, k)
            ids = ids.gather(1, order)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), -torch.inf)], 1)  # (B, k)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)  # (B, k)
        rows = scores.shape[0]
        scores = (
            _all_gather(scores.float(), group).reshape(world, rows, -1).permute(1, 0, 2).reshape(rows, -1)
        )
        ids = (
            _all_gather(ids, group).reshape(world, rows, -1).permute(1, 0, 2).reshape(rows, -1)
        )  # (B, world*k)
    best, order = scores.topk(min(k, scores.shape[1]), dim=1)  # (B, k)
    return best, ids.gather(1, order)
