"""Fixed fan-in topology: random initialisation and magnitude prune + random regrowth (SET, Mocanu et al.
2018, arXiv 1707.04780; SPARTEX, NeurIPS 2024) that keeps every index row at exactly ``K`` connections.

An index row serves ``G`` labels (``G = 1``: one label). A connection's magnitude is the L2 norm of the ``G``
weights that use it. New columns are drawn uniformly among those the row does not use, so a row never holds
a column twice when ``D >= K``; when ``D - K`` leaves room, recently pruned columns are excluded as well.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["connection_magnitude", "prune_regrow", "random_fanin_index", "sample_new_columns"]

_ROW_CHUNK = 1 << 18  # index rows handled at once by the samplers
_REJECTION_ROUNDS = 32  # resampling rounds before the exact per-row fallback


_PAIRWISE_LIMIT = 4096  # compare all pairs when a row has at most this many (candidate, other) pairs


def _conflicts(candidates: Tensor, excluded: Tensor) -> Tensor:
    """``(R, m)`` bool: candidate already in its row of ``excluded``, or a repeat of an earlier candidate.

    Short rows compare all pairs (sorting many short rows is slow on the CPU); long rows sort.
    """
    count, taken = candidates.shape[1], excluded.shape[1]
    if count * (count + taken) <= _PAIRWISE_LIMIT:
        earlier = torch.ones(count, count, dtype=torch.bool, device=candidates.device).tril(-1)
        bad = ((candidates[:, :, None] == candidates[:, None, :]) & earlier).any(2)  # (R, m, m) -> (R, m)
        if taken:
            bad |= (candidates[:, :, None] == excluded[:, None, :]).any(2)  # (R, m, E) -> (R, m)
        return bad
    bad = torch.zeros_like(candidates, dtype=torch.bool)
    if taken:
        excluded_sorted = excluded.sort(dim=1).values
        position = torch.searchsorted(excluded_sorted, candidates).clamp_max(taken - 1)
        bad |= excluded_sorted.gather(1, position) == candidates
    ordered, order = candidates.sort(dim=1, stable=True)
    repeat = torch.zeros_like(bad)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    bad.scatter_(1, order, bad.gather(1, order) | repeat)
    return bad


def _exact_rows(excluded: Tensor, dim: int, count: int, generator: torch.Generator) -> Tensor:
    """``(R, count)`` distinct columns outside ``excluded`` (``-1`` = no column), by ranking random keys."""
    keys = torch.rand(excluded.shape[0], dim + 1, generator=generator, device=excluded.device)
    keys.scatter_(1, excluded.long() + 1, float("inf"))  # column -1 lands in the spare slot 0
    keys[:, 0] = float("inf")
    return keys.topk(count, dim=1, largest=False).indices - 1


def sample_new_columns(excluded: Tensor, dim: int, count: int, generator: torch.Generator) -> Tensor:
    """``(R, count)`` int64 columns in ``[0, dim)``, distinct in a row and outside its row of ``excluded``.

    Args:
        excluded: ``(R, E)`` columns each row must avoid; ``-1`` entries are ignored.
        dim: ``D``, the number of input columns. Needs ``dim - (entries >= 0) >= count`` (else duplicates
            may occur).
        generator: drives every draw (on ``excluded``'s device), so the result is reproducible.
    """
    rows, device = excluded.shape[0], excluded.device
    if count == 0 or rows == 0:
        return torch.empty(rows, count, dtype=torch.int64, device=device)
    taken = int((excluded >= 0).sum(1).max()) if excluded.numel() else 0  # host sync: rare call
    if dim - taken < count:  # infeasible: independent draws
        return torch.randint(0, dim, (rows, count), generator=generator, device=device)
    if dim <= 4 * (excluded.shape[1] + count):  # dense rows: ranking D random keys beats rejection
        return _exact_rows(excluded, dim, count, generator)
    excluded = excluded.long()
    candidates = torch.randint(0, dim, (rows, count), generator=generator, device=device)
    active = torch.arange(rows, device=device)  # rows that may still hold a conflict
    for _ in range(_REJECTION_ROUNDS):
        bad = _conflicts(candidates[active], excluded[active])
        active = active[bad.any(1)]
        redraw = int(active.numel())  # host sync: sampling is rare, and the loop needs the count
        if redraw == 0:
            return candidates
        bad = bad[bad.any(1)]
        block = candidates[active]
        block[bad] = torch.randint(0, dim, (int(bad.sum()),), generator=generator, device=device)
        candidates[active] = block
    stuck = active[_conflicts(candidates[active], excluded[active]).any(1)]
    candidates[stuck] = _exact_rows(excluded[stuck], dim, count, generator)
    return candidates


def random_fanin_index(
    rows: int,
    dim: int,
    fan_in: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.int32,
    keep: tuple[int, int] | None = None,
) -> Tensor:
    """``(rows, fan_in)`` random input columns, distinct within a row when ``fan_in <= dim``, on the
    generator's device; chunked over rows so ten million rows need a few chunks of scratch memory only.

    ``keep=(first, last)``: return only rows ``[first, last)`` of the same draw (every row is still drawn, so
    the kept rows equal those of the whole matrix; memory is the kept rows plus one chunk).
    """
    first, last = keep if keep is not None else (0, rows)
    if not 0 <= first <= last <= rows:
        raise ValueError(f"keep: expected 0 <= first <= last <= {rows}, got {keep}")
    device = generator.device
    out = torch.empty(last - first, fan_in, dtype=dtype, device=device)
    for start in range(0, rows, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, rows)
        none = torch.empty(stop - start, 0, dtype=torch.int64, device=device)
        chunk = sample_new_columns(none, dim, fan_in, generator).sort(dim=1).values.to(dtype)
        lo, hi = max(start, first), min(stop, last)
        if lo < hi:
            out[lo - first : hi - first] = chunk[lo - start : hi - start]
    return out


def connection_magnitude(weight: Tensor, group: int) -> Tensor:
    """``(ceil(C / G), K)`` fp32 L2 norm over the ``G`` labels of each index row's connections."""
    classes, fan_in = weight.shape
    groups = -(-classes // group)
    squares = weight.float().square()
    if groups * group != classes:  # the last group is partial: pad with zeros
        squares = torch.cat([squares, squares.new_zeros(groups * group - classes, fan_in)])
    return squares.view(groups, group, fan_in).sum(1).sqrt()  # (C/G, G, K) -> (C/G, K)


@torch.no_grad()
def prune_regrow(
    weight: Tensor,
    index: Tensor,
    *,
    dim: int,
    group: int,
    count: int,
    threshold: float | None,
    generator: torch.Generator,
) -> Tensor:
    """Rewire in place: per index row drop the ``count`` weakest connections (only those below ``threshold``
    when given) and connect as many new random columns, whose weights start at zero.

    Args:
        weight: ``(C, K)`` weights, zeroed at rewired connections.
        index: ``(ceil(C / G), K)`` columns, rewired in place.
        dim: ``D``, the number of input columns.
        count: most connections rewired per row.
        threshold: prune only magnitudes below it (``None``: exactly ``count`` per row).

    Returns:
        ``(ceil(C / G), K)`` bool mask of the rewired connections.
    """
    groups, fan_in = index.shape
    count = min(count, fan_in)
    rewired = torch.zeros(groups, fan_in, dtype=torch.bool, device=index.device)
    if count == 0:
        return rewired
    for start in range(0, groups, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, groups)
        label_rows = slice(start * group, min(stop * group, weight.shape[0]))
        magnitude = connection_magnitude(weight[label_rows], group)  # (R, K)
        weakest = magnitude.argsort(dim=1, stable=True)[:, :count]  # (R, count)
        chosen = torch.ones_like(weakest, dtype=torch.bool)
        if threshold is not None:
            chosen = magnitude.gather(1, weakest) < threshold
        block = index[start:stop].long()
        exclude_all = dim - fan_in >= count  # room to avoid the just-pruned columns as well
        excluded = (
            block
            if exclude_all
            else block.scatter(1, weakest, torch.where(chosen, -1, block.gather(1, weakest)))
        )
        new = sample_new_columns(excluded, dim, count, generator).to(weakest.device)
        block.scatter_(1, weakest, torch.where(chosen, new, block.gather(1, weakest)))
        index[start:stop] = block.to(index.dtype)
        rewired[start:stop].scatter_(1, weakest, chosen)
        labels = label_rows.stop - label_rows.start
        weight[label_rows].masked_fill_(expand_to_labels(rewired[start:stop], group, labels), 0.0)
    return rewired


def rewiring_scratch_bytes(classes: int, fan_in: int, group: int, count: int) -> int:
    """Bytes a :func:`prune_regrow` of ``count`` connections a row, and the label mask its caller expands,
    hold beside the weights of ``classes`` labels in index rows of ``group``: the rewired mask (a byte a
    connection, and one a label's connection where ``G > 1``) and one chunk of index rows at a time (the
    magnitudes, their sort, the rows' columns and the new columns' conflicts, or with ``G > 1`` the squared
    weights of a row's labels). Fitted to the C heap's peak on a CPU at ``K`` 8 to 64 and ``G`` 1 and 16
    (up to 20% over)."""
    if count <= 0:
        return 0
    rows = -(-classes // group)
    grouped = 3 * group * fan_in // 2 if group > 1 else 0
    chunk = min(rows, _ROW_CHUNK) * (32 * fan_in + max(grouped, count * (fan_in + count + 24)))
    return chunk + rows * fan_in + (classes * fan_in if group > 1 else 0)


def expand_to_labels(mask: Tensor, group: int, classes: int) -> Tensor:
    """``(C, K)``: each index row's mask repeated for its ``G`` labels (``mask`` itself where ``G`` is 1)."""
    if group == 1:
        return mask[:classes]
    return mask.repeat_interleave(group, dim=0)[:classes]
