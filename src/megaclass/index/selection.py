"""Choosing a step's active classes: the batch's true classes, pooled index neighbours, and a random fill.

HF-Softmax's rule: true classes first; then each sample's ``n_nbr`` nearest classes (the original's
``sample_num // B + 1``; the selected head's default asks about half the budget), pooled over the batch
(nearest ranks first) and cut to the room left; then uniformly random other classes until exactly
``S = max(sample_num, L)`` are active (``L`` label entries, ``S <= C``). Partial FC's rule is the same
without neighbours.

The selection runs on the device without a host sync and with shapes fixed by ``(B, L, sample_num)``, so a
step never waits for the GPU and can be captured in a CUDA graph. All candidates are laid out in priority
order (sorted labels, neighbours rank by rank, uniform random draws, and an arithmetic progression modulo
``C`` of ``S`` distinct classes that guarantees enough distinct ids), each class keeps its first occurrence
through a scatter-min into a ``(C,)`` int32 mark buffer (no sort of the candidates), and a prefix sum over the
winners gives each kept class its column.

Randomly filled classes stand for all the classes left out; :attr:`Selection.logit_adjust` holds
``log(1 / q)`` for them (``q`` their inclusion probability; 0 for classes included for sure), which added to
the logits makes the active-set softmax normaliser an unbiased-in-expectation estimate of the full one (the
sampled-softmax correction, Bengio & Senecal 2008; Jean et al. 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Selection", "coprime_multipliers", "select_active"]

_UNMARKED = torch.iinfo(torch.int32).max  # a mark buffer entry no candidate holds


@dataclass(frozen=True)
class Selection:
    """A step's active classes; every field lives on the device (reading a count is a host sync).

    Attributes:
        ids: ``(S,)`` int64 unique class ids: positives (sorted), then neighbours, then random ones.
        label_columns: ``(L,)`` int64 column in ``ids`` of each label entry, in the labels' order.
        num_positive: ``()`` int64, how many leading ids are the batch's true classes.
        num_neighbour: ``()`` int64, how many ids after those came from the index.
        logit_adjust: ``(S,)`` float32 to add to the logits for the sampling correction (0 where sure).
    """

    ids: Tensor
    label_columns: Tensor
    num_positive: Tensor
    num_neighbour: Tensor
    logit_adjust: Tensor

    @property
    def num_random(self) -> Tensor:
        return self.ids.numel() - self.num_positive - self.num_neighbour


def coprime_multipliers(num_classes: int, count: int = 64, *, seed: int = 0) -> Tensor:
    """``(count,)`` int64 multipliers ``a`` coprime with ``C``: ``(a * j + b) mod C`` permutes ``[0, C)``.

    Drawn once (host side) from a seeded generator, spread over ``[1, C)``; 1 when ``C <= 2``.
    """
    if num_classes <= 2:
        return torch.ones(count, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    found: list[int] = []
    while len(found) < count:
        for value in torch.randint(1, num_classes, (4 * count,), generator=generator).tolist():
            if math.gcd(value, num_classes) == 1 and len(found) < count:
                found.append(value)
    return torch.tensor(found, dtype=torch.int64)


def _random_candidates(
    total: int, num_classes: int, multipliers: Tensor, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform draws in priority order, then ``total`` distinct ids of a random progression (the backstop)."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if num_classes <= 4 * total:  # dense regime: a permutation of all classes is cheap and exactly uniform
        return torch.randperm(num_classes, generator=generator, device=draw_device).to(device)
    # 2 S + 64 uniform draws hold >= S distinct classes outside any S fixed ones with overwhelming odds
    draws = torch.randint(num_classes, (2 * total + 66,), generator=generator, device=draw_device).to(device)
    # a random multiplier and offset, kept as (1,) tensors: indexing with a 0-d tensor would sync
    step = multipliers.to(device).index_select(0, draws[-2:-1] % multipliers.numel())  # (1,)
    progression = (step * torch.arange(total, device=device) + draws[-1:]) % num_classes  # (S,) distinct
    return torch.cat([draws[:-2], progression])


def select_active(
    labels: Tensor,
    neighbours: Tensor | None,
    *,
    sample_num: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    mark: Tensor | None = None,
    multipliers: Tensor | None = None,
) -> Selection:
    """The active classes of a step: ``labels``' classes, then pooled ``neighbours``, then a random fill.

    Args:
        labels: ``(L,)`` int64 true class ids of the batch's label entries (repeats allowed); all kept.
        neighbours: ``(B, n)`` nearest class ids per sample from an index (``-1``: none), or None for
            Partial FC's rule (positives plus random classes).
        sample_num: active classes wanted; the result has ``S = min(C, max(sample_num, L))`` ids.
        num_classes: ``C``.
        generator: draws the random fill (on its own device, the CPU by default).
        mark: ``(C,)`` int32 scratch filled with ``int32 max`` (left so on return); allocated when None.
        multipliers: from :func:`coprime_multipliers` (computed when None).

    >>> s = select_active(torch.tensor([3]), torch.tensor([[3, 5], [7, 5]]), sample_num=4, num_classes=10)
    >>> s.ids[:3].tolist(), int(s.num_neighbour), int(s.num_random)
    ([3, 7, 5], 2, 1)
    """
    device = labels.device
    total = min(max(sample_num, labels.numel()), num_classes)
    if mark is None:
        mark = torch.full((num_classes,), _UNMARKED, dtype=torch.int32, device=device)
    if multipliers is None:
        multipliers = coprime_multipliers(num_classes)
    if neighbours is None:
        neighbours = labels.new_empty(0, 0)
    near = neighbours.to(device).T.reshape(-1)  # (n * B,): all rank-0 neighbours, then rank 1, ...
    random = _random_candidates(total, num_classes, multipliers, generator, device)
    candidates = torch.cat([torch.sort(labels).values, near, random])  # (M,) in priority order
    count, fixed_end = candidates.numel(), labels.numel() + near.numel()
    position = torch.arange(count, dtype=torch.int32, device=device)
    valid = candidates >= 0
    safe = torch.where(valid, candidates, 0)
    mark.scatter_reduce_(0, safe, torch.where(valid, position, count), reduce="amin")
    first = mark[safe]  # (M,) position of each candidate's class's first occurrence
    winner = valid & (first == position)
    slot = torch.cumsum(winner, 0) - 1  # (M,) column of each winner
    keep = winner & (slot < total)
    ids = candidates.new_empty(total + 1).scatter_(0, torch.where(keep, slot, total), candidates)[:total]
    label_columns = slot[mark[labels].long()]  # (L,) in the labels' own order
    mark.index_fill_(0, safe, _UNMARKED)  # leave the buffer clean for the next step
    num_positive = winner[: labels.numel()].sum()
    num_neighbour = keep[labels.numel() : fixed_end].sum()
    fixed = num_positive + num_neighbour
    drawn = (total - fixed).clamp_min(1)
    # each of the C - |fixed| other classes is included with probability |random| / (C - |fixed|)
    adjust = torch.log((num_classes - fixed).clamp_min(1).float() / drawn.float())
    columns = torch.arange(total, device=device)
    logit_adjust = torch.where(columns >= fixed, adjust, 0.0).float()
    return Selection(ids, label_columns, num_positive, num_neighbour, logit_adjust)
