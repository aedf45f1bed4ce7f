"""Choosing a step's active classes: the batch's true classes, pooled index neighbours, and a random fill.

HF-Softmax's rule (the default): true classes first; then each sample's ``n_nbr = sample_num // B + 1``
nearest classes, pooled over the batch (nearest ranks first) and cut to the room left; then uniformly random
other classes until exactly ``sample_num`` are active. Partial FC's rule is the same without neighbours.

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

__all__ = ["Selection", "fill_random", "pool_neighbours", "select_active"]


@dataclass(frozen=True)
class Selection:
    """A step's active classes.

    Attributes:
        ids: ``(S,)`` int64 unique class ids: positives, then neighbours, then random ones.
        num_positive: how many leading ids are the batch's true classes.
        num_neighbour: how many ids after those came from the index.
        logit_adjust: ``(S,)`` float32 to add to the logits for the sampling correction (0 where sure).
    """

    ids: Tensor
    num_positive: int
    num_neighbour: int
    logit_adjust: Tensor

    @property
    def num_random(self) -> int:
        return self.ids.numel() - self.num_positive - self.num_neighbour


def pool_neighbours(neighbours: Tensor, exclude: Tensor, room: int, num_classes: int) -> Tensor:
    """Up to ``room`` unique ids from ``neighbours (B, n)``, nearest ranks first, none of ``exclude``.

    Entries ``-1`` (an index that found fewer) are skipped. Among equal ranks, lower sample index first.
    """
    if room <= 0 or neighbours.numel() == 0:
        return neighbours.new_empty(0)
    flat = neighbours.T.reshape(-1)  # (n * B,): all rank-0 neighbours, then rank 1, ...
    flat = flat[flat >= 0]
    taken = torch.zeros(num_classes, dtype=torch.bool, device=flat.device)
    taken[exclude] = True
    # first occurrence of each id in rank order
    unique, inverse = torch.unique(flat, return_inverse=True)
    first = torch.full((unique.numel(),), flat.numel(), dtype=torch.int64, device=flat.device)
    first.scatter_reduce_(0, inverse, torch.arange(flat.numel(), device=flat.device), reduce="amin")
    keep = ~taken[unique]
    unique, first = unique[keep], first[keep]
    return unique[torch.argsort(first)][:room]


def fill_random(
    active: Tensor, count: int, num_classes: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """``count`` distinct class ids drawn uniformly from those not in ``active``, on ``active``'s device.

    Draws on the generator's device (the CPU by default) for reproducibility, in rounds of oversampled
    candidates; one round nearly always suffices.
    """
    if count <= 0:
        return active.new_empty(0)
    if count > num_classes - active.numel():
        raise ValueError(f"cannot draw {count} random classes: only {num_classes - active.numel()} left")
    device = active.device
    draw_device = generator.device if generator is not None else torch.device("cpu")
    taken = torch.zeros(num_classes, dtype=torch.bool, device=device)
    taken[active] = True
    left = num_classes - active.numel()
    if count * 4 >= left:  # dense regime: a permutation of what is left is cheapest
        remaining = torch.nonzero(~taken).squeeze(1)
        order = torch.randperm(remaining.numel(), generator=generator, device=draw_device).to(device)
        return remaining[order[:count]]
    chosen = []
    needed = count
    while needed > 0:
        draw = math.ceil(needed * num_classes / left * 1.2) + 16
        candidates = torch.randint(num_classes, (draw,), generator=generator, device=draw_device).to(device)
        candidates = candidates[~taken[candidates]]
        # keep the first occurrence of each candidate, in draw order, so the draw stays uniform
        unique, inverse = torch.unique(candidates, return_inverse=True)
        first = torch.full((unique.numel(),), candidates.numel(), dtype=torch.int64, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(candidates.numel(), device=device), reduce="amin")
        fresh = unique[torch.argsort(first)][:needed]
        taken[fresh] = True
        chosen.append(fresh)
        needed -= fresh.numel()
    return torch.cat(chosen)


def select_active(
    positives: Tensor,
    neighbours: Tensor | None,
    *,
    sample_num: int,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> Selection:
    """The active classes of a step: ``positives``, then pooled ``neighbours``, then a random fill.

    Args:
        positives: ``(P,)`` unique true class ids of the batch (all kept, even when ``P > sample_num``).
        neighbours: ``(B, n)`` nearest class ids per sample from an index (``-1`` allowed), or None for
            Partial FC's rule (positives plus random classes).
        sample_num: active classes wanted; the result has ``max(sample_num, P)`` ids (at most ``C``).
        num_classes: ``C``.
        generator: draws the random fill.

    >>> s = select_active(torch.tensor([3]), torch.tensor([[3, 5], [7, 5]]), sample_num=4, num_classes=10)
    >>> s.ids[:3].tolist(), s.num_neighbour, s.num_random
    ([3, 7, 5], 2, 1)
    """
    total = min(max(sample_num, positives.numel()), num_classes)
    room = total - positives.numel()
    if neighbours is not None:
        near = pool_neighbours(neighbours.to(positives.device), positives, room, num_classes)
    else:
        near = positives.new_empty(0)
    fixed = torch.cat([positives, near])
    random = fill_random(fixed, total - fixed.numel(), num_classes, generator=generator)
    adjust = torch.zeros(total, dtype=torch.float32, device=positives.device)
    if random.numel():
        # each of the C - |fixed| other classes is included with probability |random| / (C - |fixed|)
        adjust[fixed.numel() :] = math.log((num_classes - fixed.numel()) / random.numel())
    return Selection(torch.cat([fixed, random]), positives.numel(), near.numel(), adjust)
