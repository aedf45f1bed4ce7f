"""Triton kernel and launcher of the fused score top-k: ``x @ y.T`` tile by tile, each row's best ``k`` kept
in registers, merged into a running ``(values, ids)`` table; the ``(M, P)`` scores never reach memory.

A program owns ``BLOCK_M`` rows of one batch entry and one span of ``y``'s rows (a split). It loads its rows'
running best ``k`` (slots past ``k`` of the power-of-two register width ``R`` hold ``+inf``: never the
smallest, never replaced), then for each ``(BLOCK_M, BLOCK_P)`` tile of scores (``tl.dot``, fp32
accumulation) takes the tile's maximum ``R`` times: where it beats the row's smallest kept value it replaces
it, and the column is masked. A tile holds at most ``R`` of the row's new best, so ``R`` rounds find them all;
a tile takes as many rounds as its rows have scores above their smallest kept value (none, mostly, once the
first tiles have filled the rows).
At the end the ``k`` kept values are sorted descending by ``k`` rounds of maxima and stored. Reductions over
``BLOCK_P`` columns in registers replace a ``torch.topk`` of many short slices, which took most of the index's
cold build on a GPU, and the scores' round trip through memory (benchmarks/RESULTS.md).

Float32 operands are multiplied as three tf32 products (``tf32x3``): about float32's precision, on tensor
cores, 3.6x faster than plain float32 products over 10^6 rows of D 512 (benchmarks/RESULTS.md).

Offsets into the table and ``y`` are int64 (``N k`` and ``P D`` may pass 2^31); ids are ``id_offset + b P +
p``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["column_splits", "merge_topk_scores_triton_"]

_BLOCK_M = 64  # rows per program
_BLOCK_P = 64  # columns per tile
_MIN_PROGRAMS = 1024  # programs a launch keeps busy at least, by splitting the columns (some 8 per SM)
_MIN_SPAN = 4096  # columns a split scans at least: its running best is loaded and stored once


# the sizes and offsets that change from call to call (a chunk's rows, a block's clusters and its widest,
# a search's column splits) are not specialised on: each value's divisibility by 16 would be a compilation
# of its own, some seconds of a run's first steps on a GPU
@triton.jit(do_not_specialize=["stride_rb", "M", "P", "span", "id_offset", "splits"])
def _merge_topk_scores_kernel(
    X_ptr, Y_ptr, V_ptr, I_ptr, Rows_ptr, Scale_ptr, Bias_ptr,
    stride_xb, stride_xm, stride_xd, stride_yb, stride_yp, stride_yd, stride_rb, stride_rm,
    M, P, D, K, span, id_offset, splits,
    HAS_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Table row ``rows[b, m] * splits + split`` := the best ``K`` of itself and ``x[b, m] . y[b, p] (*
    scale[p]) (+ bias[p])`` over the split's columns ``p``, descending (ids ``-1`` where fewer than ``K``
    are finite)."""
    m_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if HAS_ROWS:
        rows = tl.load(Rows_ptr + batch * stride_rb + offs_m * stride_rm, mask=mask_m, other=0)
    else:
        rows = batch * M + offs_m
    state = rows.to(tl.int64) * splits + split  # (BLOCK_M,) table rows, (N * splits, K) contiguous
    slots = tl.arange(0, R)
    live = slots < K
    at_state = state[:, None] * K + slots[None, :]
    mask_state = mask_m[:, None] & live[None, :]
    best = tl.load(V_ptr + at_state, mask=mask_state, other=-float("inf"))
    best = tl.where(live[None, :], best, float("inf"))  # padding slots: never the smallest
    best_ids = tl.load(I_ptr + at_state, mask=mask_state, other=-1).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_P)
    x_rows = X_ptr + batch * stride_xb + offs_m.to(tl.int64)[:, None] * stride_xm
    start = split * span
    stop = tl.minimum(P, start + span)
    for p0 in range(start, stop, BLOCK_P):
        offs_p = p0 + cols
        mask_p = offs_p < stop
        y_rows = Y_ptr + batch * stride_yb + offs_p.to(tl.int64)[:, None] * stride_yp
        scores = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = d0 + offs_d < D
            xt = tl.load(
                x_rows + (d0 + offs_d)[None, :] * stride_xd, mask=mask_m[:, None] & mask_d[None, :], other=0.0
            )
            yt = tl.load(
                y_rows + (d0 + offs_d)[None, :] * stride_yd, mask=mask_p[:, None] & mask_d[None, :], other=0.0
            )
            if UPCAST:  # the CPU interpreter's bf16 tl.dot is wrong; bf16 products are exact in fp32
                scores = tl.dot(
                    xt.to(tl.float32), tl.trans(yt.to(tl.float32)), scores, input_precision="ieee"
                )
            else:
                scores = tl.dot(xt, tl.trans(yt), scores, input_precision=PRECISION)
        if HAS_SCALE:
            scores *= tl.load(Scale_ptr + offs_p, mask=mask_p, other=0.0)[None, :]
        if HAS_BIAS:
            scores += tl.load(Bias_ptr + offs_p, mask=mask_p, other=0.0)[None, :]
        scores = tl.where(mask_p[None, :], scores, -float("inf"))
        # the tile's best, one at a time: each replaces the row's smallest kept value where it beats it; as
        # many rounds as a row has scores above its smallest kept value (at most R; after the first tiles,
        # mostly none)
        beats = tl.sum((scores > tl.min(best, axis=1)[:, None]).to(tl.int32), axis=1)
        for _ in range(0, tl.minimum(tl.max(beats, axis=0), R)):
            top = tl.max(scores, axis=1)
            top_at = tl.argmax(scores, axis=1)
            low = tl.min(best, axis=1)
            low_at = tl.argmin(best, axis=1)
            replace = (slots[None, :] == low_at[:, None]) & (top > low)[:, None]
            best = tl.where(replace, top[:, None], best)
            top_id = id_offset + batch * P + (p0 + top_at).to(tl.int64)
            best_ids = tl.where(replace, top_id[:, None], best_ids)
            scores = tl.where(cols[None, :] == top_at[:, None], -float("inf"), scores)

    # sorted descending, K rounds of maxima; a slot that holds no finite value gets id -1 (a loop, not R
    # unrolled copies: it runs once a program, and unrolled it grows the compilation with R)
    rest = tl.where(live[None, :], best, -float("inf"))
    out = tl.full((BLOCK_M, R), -float("inf"), tl.float32)
    out_ids = tl.full((BLOCK_M, R), -1, tl.int64)
    for slot in range(R):
        top = tl.max(rest, axis=1)
        top_at = tl.argmax(rest, axis=1)
        chosen = slots[None, :] == top_at[:, None]
        top_id = tl.sum(tl.where(chosen, best_ids, 0), axis=1)
        top_id = tl.where(top > -float("inf"), top_id, -1)
        out = tl.where(slots[None, :] == slot, top[:, None], out)
        out_ids = tl.where(slots[None, :] == slot, top_id[:, None], out_ids)
        rest = tl.where(chosen, -float("inf"), rest)
    tl.store(V_ptr + at_state, out, mask=mask_state)
    tl.store(I_ptr + at_state, out_ids, mask=mask_state)


def merge_topk_scores_triton_(
    x: torch.Tensor,
    y: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor | None,
    id_offset: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    splits: int = 1,
) -> None:
    """Launch the kernel over ``x (Bt, M, D)``, ``y (Bt, P, D)`` (one dtype) into ``values (N * splits, k)``
    float32 and ``ids`` (int64 or int32), contiguous; the table row of ``(b, m)`` and split ``s`` is
    ``rows[b, m] * splits + s`` (``rows`` None: ``b M + m``); ``scale``, ``bias``: contiguous float32
    ``(P,)`` or None. Checked by the caller."""
    batch, m, dim = x.shape
    p, k = y.shape[1], values.shape[1]
    if batch == 0 or m == 0 or p == 0:
        return
    span = triton.cdiv(p, splits)
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(m, _BLOCK_M), batch, splits)
    _merge_topk_scores_kernel[grid](
        x, y, values, ids, *(t if t is not None else values for t in (rows, scale, bias)),
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        *(rows.stride() if rows is not None else (0, 0)),
        m, p, dim, k, span, id_offset, splits,
        HAS_ROWS=rows is not None, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        R=triton.next_power_of_2(k),
        BLOCK_M=_BLOCK_M, BLOCK_P=_BLOCK_P, BLOCK_D=min(64, max(16, triton.next_power_of_2(dim))),
        PRECISION=precision, UPCAST=os.environ.get("TRITON_INTERPRET", "0") == "1",
        num_warps=4,
    )  # fmt: skip


def column_splits(batch: int, m: int, p: int) -> int:
    """Splits of ``P`` columns that keep ``_MIN_PROGRAMS`` programs busy, each scanning ``_MIN_SPAN`` columns
    at least."""
    programs = batch * triton.cdiv(m, _BLOCK_M)
    wanted = triton.cdiv(_MIN_PROGRAMS, programs)
    return max(1, min(wanted, p // _MIN_SPAN))
