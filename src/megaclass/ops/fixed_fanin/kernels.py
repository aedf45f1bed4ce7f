"""Triton kernels and launchers of the fixed fan-in layer ``y[b, c] = sum_k x[b, idx[c // G, k]] * w[c, k]``.

The kernels work on ``xT (D, B)``, the inputs transposed once per call, so every gathered input column is
``B`` contiguous values (one coalesced read) and a tile of logits is ``zT (labels, B)``.

* Per-label indices (``DOT=False``): a tile is ``BLOCK_C`` labels; for each ``k`` it gathers the rows
  ``xT[idx[c, k], :]`` of its labels and accumulates ``w[c, k] * xT[idx[c, k], b]`` on CUDA cores (SPARTEX).
* Grouped indices (``DOT=True``: ``G >= 16`` a power of two, ``K <= 256``): a tile is one group of ``G``
  labels sharing one index row, so its ``(G, K)`` weight tile meets the ``(K, B)`` gathered inputs in one
  ``tl.dot`` on tensor cores in the inputs' precision (bf16 features under autocast meet fp32 master weights
  cast to bf16; fp32 accumulation; HASTE's grouping). fp32 features keep an exact fp32 dot.

A program of a forward pass without gradients serves ``TILES`` consecutive tiles (``tiles_per_program``:
more work per program and a tile loop the compiler pipelines, the next tile's gathers in flight while this
one computes) and keeps its per-row partials in registers across them: one ``(B,)`` row per program, not per
tile. Passes that write gradients (the fused BCE / hinge pass, the backward passes) serve one tile a program:
on an H100 their grouped tiles ran 23 to 37% faster so (``K`` 32, ``G`` 16 and 32, ``B`` 128). The fused
pass's partials are then a ``(B,)`` row a tile, summed chunk by chunk of labels (at most ``4B`` bytes a tile
of a chunk: 8 MB at ``B`` 128 and ``K`` 32).

Where the bytes go (fp32 weights, bf16 features, ``B`` 128, ``K = G`` 32): per label the weights are ``4K``
bytes, the index ``4K / G``, the gathered inputs ``2KB / G`` from L2 (``xT`` is ``2DB`` bytes, L2-resident),
the input-gradient buffer ``2KB / G`` written and read again. The floor of a fused BCE step is one read of the
weights and one write of their gradient (``8CK`` bytes) plus the buffer (``4CKB / G``): 0.5 GB at
``C`` 2.8M, some 0.12 ms on an H200. BCE and squared hinge therefore compute everything in the forward pass
(``fixed_fanin_fwd_grad``): logits, the row values, ``dL/dz = r * l'(z, 0)`` at the row gradient ``r`` the
caller expects (the mean over samples: ``1 / B``), the weight and bias gradients and the input-gradient
buffer, reduced to ``dx`` before the pass returns; the weights and gathers are read once. Backward
(``fixed_fanin_grad_finish``) scales ``dx`` by ``actual / expected`` per row (exact for any row gradient,
``dx`` is linear in each row's ``dL/dz``) and, decided on the device without a host sync: nothing when the
row gradient is the expected one, one scaling pass over the weight gradient when it is uniform but another
value, a recomputation of the weight gradient when it differs between rows. Softmax needs the log-sum-exp
first: its forward writes per-(program, row) partials (running max and sum of exponentials, merged as in
online softmax, arXiv 1805.02867) and its backward recomputes each tile's logits (``fixed_fanin_bwd``).
Positive targets are a sparse correction done outside (``L`` entries).

Input gradient, without atomics: a tile writes one buffer row per connection, the group's ``gxT[k, b] =
sum_j w[gG + j, k] dz[b, gG + j]`` (grouped) or the label's ``dz[b, c]`` (per-label); a second kernel reduces
the buffer by input column over the connections sorted by column (``columns.py``, cached per topology):
``dx[b, d] = sum_{(r, k) -> d} scale * buf[r, b]``, a deterministic segmented sum. Labels go through the
buffer in chunks of at most ``CHUNK_ROWS`` rows, which bounds its memory. Offsets into the weights, the
index and the buffer are int64: nothing assumes ``C * K < 2^31``; gathers from ``xT`` use int32 (the launchers
require ``B * D < 2^31``). Weight and bias gradients are written once per tile in the parameters' dtype
(bf16 weights get bf16 gradients without an fp32 copy), from fp32 accumulators.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megaclass.ops import autotune_enabled
from megaclass.ops.fixed_fanin.columns import CHUNK_ROWS, LABEL_TILE, column_order, grouped_tiles

__all__ = [
    "LOSS_CODES",
    "fixed_fanin_bwd",
    "fixed_fanin_fwd",
    "fixed_fanin_fwd_grad",
    "fixed_fanin_grad_finish",
    "tiles_per_program",
]

LOSS_CODES = {"none": 0, "bce": 1, "hinge": 2, "softmax": 3}
_MAX_BLOCK_B = 128  # batch rows per block of a tile
_MAX_TILES = 8  # tiles per program, at most
_GRADIENT_TILES = 1  # tiles per program of the passes that write gradients
_MIN_PROGRAMS = 4096  # programs kept when grouping tiles: some 2 waves of 16 programs on 132 SMs
_BLOCK_J = 32  # connections per step of the input-gradient reduction
_SCALE_BLOCK = 4096  # elements per program of the gated scaling
# untuned launch configs: 4 warps for the tiles (2 stages: the tile loop keeps the next gathers in flight),
# what MEGACLASS_AUTOTUNE=1 picked on an H100 for the column reduction (8 warps)
_TILE_LAUNCH = {"num_warps": 4, "num_stages": 2}
_DX_LAUNCH = {"BLOCK_J": _BLOCK_J, "num_warps": 8, "num_stages": 3}


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST computes bf16 operands in fp32 (exact: bf16 products fit
    fp32), for Triton's CPU interpreter, whose bf16 tl.dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even; UPCAST (the CPU interpreter, whose fp32 -> bf16 cast truncates)
    rounds the bits first, as the GPU's cast does."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot_mask_k(tile, label_stop, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """A grouped tile's fan-in slots in use: ``k < K``, none for a tile past the launch."""
    offs_k = tl.arange(0, BLOCK_K)
    return (offs_k < K) & (tile * BLOCK_C + offs_k * 0 < label_stop)


@triton.jit
def _tile_operands(
    XT_ptr, W_ptr, I_ptr, offs_c, mask_c, tile, label_stop, offs_b, mask_b, stride_xtd, K,
    DOT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A grouped tile's gathered inputs ``xg (BLOCK_K, BLOCK_B)`` and weights ``wt (G, BLOCK_K)`` in the
    inputs' dtype, loaded once for its logits and its gradients (the group's whole fan-in in one slice:
    ``BLOCK_K >= K``); per-label tiles load theirs one ``k`` at a time (two placeholders)."""
    if DOT:
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = _dot_mask_k(tile, label_stop, K, BLOCK_C, BLOCK_K)
        cols = tl.load(I_ptr + tile * K + offs_k, mask=mask_k, other=0)
        xg = tl.load(
            XT_ptr + cols[:, None] * stride_xtd + offs_b[None, :],
            mask=mask_k[:, None] & mask_b[None, :],
            other=0.0,
        )
        wt = tl.load(
            W_ptr + offs_c[:, None] * K + offs_k[None, :], mask=mask_c[:, None] & mask_k[None, :], other=0.0
        )  # weight (C, K) contiguous; offs_c is int64
        return xg, wt.to(xg.dtype)
    else:
        return 0.0, 0.0


@triton.jit
def _tile_logits(
    XT_ptr, W_ptr, I_ptr, Bias_ptr, xg, wt, offs_c, mask_c, offs_b, mask_b, stride_xtd, K,
    GROUP: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """zT (BLOCK_C, BLOCK_B) fp32 = sum_k w[c, k] xT[idx[c // G, k], b] (+ bias[c]); grouped tiles from their
    operands (:func:`_tile_operands`)."""
    if DOT:
        acc = _dot(wt, xg, tl.zeros((BLOCK_C, BLOCK_B), dtype=tl.float32), PRECISION, UPCAST)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_B), dtype=tl.float32)
        w_rows = offs_c * K  # weight (C, K) contiguous; offs_c is int64
        i_rows = (offs_c // GROUP) * K
        mask = mask_c[:, None] & mask_b[None, :]
        for k in range(0, K):
            cols = tl.load(I_ptr + i_rows + k, mask=mask_c, other=0)
            w = tl.load(W_ptr + w_rows + k, mask=mask_c, other=0.0).to(tl.float32)
            xv = tl.load(XT_ptr + cols[:, None] * stride_xtd + offs_b[None, :], mask=mask, other=0.0)
            acc += w[:, None] * xv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(Bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _negative_loss_grad(z, LOSS: tl.constexpr):
    """l(z, 0) and dl(z, 0)/dz. BCE: softplus(z) = max(z, 0) + log(1 + e) and sigmoid(z) = (z >= 0 ? 1 :
    e) / (1 + e) with e = exp(-|z|), one exponential for both; squared hinge: max(0, 1 + z)^2 and
    2 max(0, 1 + z)."""
    if LOSS == 1:
        e = tl.exp(-tl.abs(z))
        loss = tl.maximum(z, 0.0) + tl.log(1.0 + e)
        grad = tl.where(z >= 0, 1.0, e) / (1.0 + e)
    else:
        h = tl.maximum(1.0 + z, 0.0)
        loss = h * h
        grad = 2.0 * h
    return loss, grad


@triton.jit
def _add_slot(acc, value, slot, NB: tl.constexpr):
    """acc (NB, BLOCK_B) with ``value (BLOCK_B,)`` added to row ``slot`` (the batch block)."""
    return acc + tl.where(tl.arange(0, NB)[:, None] == slot, value[None, :], 0.0)


@triton.jit
def _merge_lse(run_max, run_sum, z, mask, slot, NB: tl.constexpr):
    """Online softmax: the running (max, sum exp(z - max)) of row ``slot`` merged with this tile's logits; a
    tile with no valid label in a row leaves it unchanged (max -inf, sum 0)."""
    z = tl.where(mask, z, float("-inf"))
    tile_max = tl.max(z, axis=0)
    safe_tile_max = tl.where(tile_max == float("-inf"), 0.0, tile_max)
    tile_sum = tl.sum(tl.exp(z - safe_tile_max[None, :]), axis=0)
    is_slot = tl.arange(0, NB)[:, None] == slot
    new_max = tl.where(is_slot, tl.maximum(run_max, tile_max[None, :]), run_max)
    safe_new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    candidate = run_sum * tl.exp(run_max - safe_new_max) + tile_sum[None, :] * tl.exp(
        tile_max[None, :] - safe_new_max
    )
    return new_max, tl.where(is_slot, candidate, run_sum)


@triton.jit
def _dot_tile_grads(
    Buf_ptr, dz, gw, xg, wt, tile, label_stop, buf_row0, offs_b, mask_b, stride_bufr, K,
    WRITE_BUF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Grouped tile: gw (G, BLOCK_K) + dz @ xg^T, and (WRITE_BUF) the buffer rows gxT = w^T dz of its K
    connections, at rows buf_row0 + k."""
    dz_c = _cast(dz, xg.dtype, UPCAST)
    gw = _dot(dz_c, tl.trans(xg), gw, PRECISION, UPCAST)
    if WRITE_BUF:
        zero = tl.zeros((BLOCK_K, BLOCK_B), tl.float32)
        gx = _dot(tl.trans(wt), dz_c, zero, PRECISION, UPCAST)  # (BLOCK_K, BLOCK_B)
        offs_k = tl.arange(0, BLOCK_K)
        mask_kb = _dot_mask_k(tile, label_stop, K, BLOCK_C, BLOCK_K)[:, None] & mask_b[None, :]
        buf_ptrs = Buf_ptr + (buf_row0 + offs_k)[:, None] * stride_bufr + offs_b[None, :]
        tl.store(buf_ptrs, _cast(gx, Buf_ptr.dtype.element_ty, UPCAST), mask=mask_kb)
    return gw


@triton.jit
def _label_tile_grads(
    XT_ptr, I_ptr, Buf_ptr, GW_ptr, dz, offs_c, mask_c, buf_row0, offs_b, mask_b, block,
    stride_xtd, stride_bufr, K,
    GROUP: tl.constexpr, WRITE_BUF: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Per-label tile: gw[c, k] (+)= sum_b dz[b, c] x[b, idx[c, k]] (stored; added to the earlier batch
    blocks' sum when block > 0) and (WRITE_BUF) the labels' dz rows into the buffer at rows buf_row0 + j."""
    mask = mask_c[:, None] & mask_b[None, :]
    if WRITE_BUF:
        rows = buf_row0 + tl.arange(0, BLOCK_C)
        tl.store(
            Buf_ptr + rows[:, None] * stride_bufr + offs_b[None, :],
            _cast(dz, Buf_ptr.dtype.element_ty, UPCAST),
            mask=mask,
        )
    w_rows = offs_c * K
    i_rows = (offs_c // GROUP) * K
    for k in range(0, K):
        cols = tl.load(I_ptr + i_rows + k, mask=mask_c, other=0)
        xv = tl.load(XT_ptr + cols[:, None] * stride_xtd + offs_b[None, :], mask=mask, other=0.0)
        gw = tl.sum(dz * xv.to(tl.float32), axis=1)
        if block > 0:
            gw += tl.load(GW_ptr + w_rows + k, mask=mask_c, other=0.0).to(tl.float32)
        tl.store(GW_ptr + w_rows + k, _cast(gw, GW_ptr.dtype.element_ty, UPCAST), mask=mask_c)


@triton.jit
def _add_tile_grads(
    XT_ptr, I_ptr, Buf_ptr, GW_ptr, dz, gw, gbias, xg, wt, offs_c, mask_c, tile, tile_start, label_stop,
    offs_b, mask_b, block, stride_xtd, stride_bufr, K,
    GROUP: tl.constexpr, DOT: tl.constexpr, WRITE_BUF: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """A batch block's ``dz (BLOCK_C, BLOCK_B)`` into the tile's gradients: ``(gw, gbias)`` with it added
    (a per-label tile stores its gw itself) and (WRITE_BUF) its buffer rows, counted from tile_start."""
    gbias += tl.sum(dz, axis=1)
    if DOT:
        gw = _dot_tile_grads(
            Buf_ptr, dz, gw, xg, wt, tile, label_stop, (tile - tile_start) * K, offs_b, mask_b, stride_bufr,
            K, WRITE_BUF, BLOCK_C, BLOCK_B, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip
    else:
        _label_tile_grads(
            XT_ptr, I_ptr, Buf_ptr, GW_ptr, dz, offs_c, mask_c, (tile - tile_start) * BLOCK_C,
            offs_b, mask_b, block, stride_xtd, stride_bufr, K, GROUP, WRITE_BUF, BLOCK_C, UPCAST,
        )  # fmt: skip
    return gw, gbias


@triton.jit
def _fixed_fanin_fwd_kernel(
    XT_ptr, W_ptr, I_ptr, Bias_ptr, Y_ptr, PartA_ptr, PartB_ptr, Buf_ptr, GW_ptr, GBias_ptr,
    stride_xtd, stride_yb, stride_bufr,
    B, K, tile_start, label_stop, row_grad,
    GROUP: tl.constexpr, DOT: tl.constexpr, LOSS: tl.constexpr, GRAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    TILES: tl.constexpr, B_BLOCKS: tl.constexpr, NB: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Tiles tile_start + pid * TILES + t, t < TILES, labels below label_stop. LOSS 0: store y (B, C).
    Else per-row partials of the program, at row pid of (programs, B), a call's or a chunk's: BCE/hinge sums
    of l(z, 0) into PartA; softmax the running max into PartA and sum of exp(z - max) into PartB. GRAD
    (BCE/hinge): also dz = row_grad * l'(z, 0), the tiles' weight and bias gradients and their
    input-gradient buffer rows, counted from tile_start."""
    program = tl.program_id(0).to(tl.int64)
    first = tile_start + program * TILES
    offs_bb = tl.arange(0, BLOCK_B)
    if LOSS == 3:
        part_a = tl.full((NB, BLOCK_B), float("-inf"), tl.float32)
    else:
        part_a = tl.zeros((NB, BLOCK_B), tl.float32)
    part_b = tl.zeros((NB, BLOCK_B), tl.float32)
    for t in range(0, TILES):
        tile = first + t
        offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < label_stop
        gw = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
        gbias = tl.zeros((BLOCK_C,), tl.float32)
        for block in range(0, B_BLOCKS):
            offs_b = block * BLOCK_B + offs_bb
            mask_b = offs_b < B
            xg, wt = _tile_operands(
                XT_ptr, W_ptr, I_ptr, offs_c, mask_c, tile, label_stop, offs_b, mask_b, stride_xtd, K,
                DOT, BLOCK_C, BLOCK_K,
            )  # fmt: skip
            z = _tile_logits(
                XT_ptr, W_ptr, I_ptr, Bias_ptr, xg, wt, offs_c, mask_c, offs_b, mask_b, stride_xtd, K,
                GROUP, DOT, HAS_BIAS, BLOCK_C, BLOCK_B, PRECISION, UPCAST,
            )  # fmt: skip
            mask = mask_c[:, None] & mask_b[None, :]
            if LOSS == 0:
                y_ptrs = Y_ptr + offs_b.to(tl.int64)[None, :] * stride_yb + offs_c[:, None]
                tl.store(y_ptrs, z.to(Y_ptr.dtype.element_ty), mask=mask)
            elif LOSS == 3:
                part_a, part_b = _merge_lse(part_a, part_b, z, mask, block, NB)
            else:
                loss, grad = _negative_loss_grad(z, LOSS)
                part_a = _add_slot(part_a, tl.sum(tl.where(mask, loss, 0.0), axis=0), block, NB)
                if GRAD:
                    dz = tl.where(mask, grad * row_grad, 0.0)
                    gw, gbias = _add_tile_grads(
                        XT_ptr, I_ptr, Buf_ptr, GW_ptr, dz, gw, gbias, xg, wt, offs_c, mask_c, tile,
                        tile_start, label_stop, offs_b, mask_b, block, stride_xtd, stride_bufr, K,
                        GROUP, DOT, True, BLOCK_C, BLOCK_B, BLOCK_K, PRECISION, UPCAST,
                    )  # fmt: skip
        if GRAD:
            _store_tile_grads(GW_ptr, GBias_ptr, gw, gbias, offs_c, mask_c, K, DOT, HAS_BIAS, BLOCK_K, UPCAST)
    if LOSS != 0:
        offs = tl.arange(0, NB)[:, None] * BLOCK_B + offs_bb[None, :]  # (NB, BLOCK_B) batch rows
        tl.store(PartA_ptr + program * B + offs, part_a, mask=offs < B)
        if LOSS == 3:
            tl.store(PartB_ptr + program * B + offs, part_b, mask=offs < B)


@triton.jit
def _store_tile_grads(
    GW_ptr, GBias_ptr, gw, gbias, offs_c, mask_c, K,
    DOT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """A tile's weight gradient (grouped: from registers; per-label tiles stored theirs per k) and bias
    gradient, in the parameters' dtypes."""
    if DOT:
        offs_k = tl.arange(0, BLOCK_K)
        gw_ptrs = GW_ptr + offs_c[:, None] * K + offs_k[None, :]
        tl.store(
            gw_ptrs, _cast(gw, GW_ptr.dtype.element_ty, UPCAST), mask=mask_c[:, None] & (offs_k < K)[None, :]
        )
    if HAS_BIAS:
        tl.store(GBias_ptr + offs_c, _cast(gbias, GBias_ptr.dtype.element_ty, UPCAST), mask=mask_c)


@triton.jit
def _bwd_tiles(
    XT_ptr, W_ptr, I_ptr, Bias_ptr, DY_ptr, Lse_ptr, GRow_ptr, Buf_ptr, GW_ptr, GBias_ptr,
    stride_xtd, stride_dyb, stride_bufr,
    B, K, tile_start, label_stop,
    GROUP: tl.constexpr, DOT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    WRITE_BUF: tl.constexpr, TILES: tl.constexpr, B_BLOCKS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The program's tiles: dz = dy (LOSS 0) or g_b * dl/dz from recomputed z, then gw, gbias and (WRITE_BUF)
    the buffer rows."""
    first = tile_start + tl.program_id(0).to(tl.int64) * TILES
    for t in range(0, TILES):
        tile = first + t
        offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < label_stop
        gw = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
        gbias = tl.zeros((BLOCK_C,), tl.float32)
        for block in range(0, B_BLOCKS):
            offs_b = block * BLOCK_B + tl.arange(0, BLOCK_B)
            mask_b = offs_b < B
            mask = mask_c[:, None] & mask_b[None, :]
            xg, wt = _tile_operands(
                XT_ptr, W_ptr, I_ptr, offs_c, mask_c, tile, label_stop, offs_b, mask_b, stride_xtd, K,
                DOT, BLOCK_C, BLOCK_K,
            )  # fmt: skip
            if LOSS == 0:
                dy_ptrs = DY_ptr + offs_b.to(tl.int64)[None, :] * stride_dyb + offs_c[:, None]
                dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
            else:
                z = _tile_logits(
                    XT_ptr, W_ptr, I_ptr, Bias_ptr, xg, wt, offs_c, mask_c, offs_b, mask_b, stride_xtd, K,
                    GROUP, DOT, HAS_BIAS, BLOCK_C, BLOCK_B, PRECISION, UPCAST,
                )  # fmt: skip
                g_row = tl.load(GRow_ptr + offs_b, mask=mask_b, other=0.0)
                if LOSS == 3:
                    lse = tl.load(Lse_ptr + offs_b, mask=mask_b, other=0.0)
                    dz = tl.exp(z - lse[None, :]) * g_row[None, :]  # softmax probability times d loss / d lse
                else:
                    dz = _negative_loss_grad(z, LOSS)[1] * g_row[None, :]
                dz = tl.where(mask, dz, 0.0)
            gw, gbias = _add_tile_grads(
                XT_ptr, I_ptr, Buf_ptr, GW_ptr, dz, gw, gbias, xg, wt, offs_c, mask_c, tile, tile_start,
                label_stop, offs_b, mask_b, block, stride_xtd, stride_bufr, K,
                GROUP, DOT, WRITE_BUF, BLOCK_C, BLOCK_B, BLOCK_K, PRECISION, UPCAST,
            )  # fmt: skip
        _store_tile_grads(GW_ptr, GBias_ptr, gw, gbias, offs_c, mask_c, K, DOT, HAS_BIAS, BLOCK_K, UPCAST)


@triton.jit
def _fixed_fanin_bwd_kernel(
    XT_ptr, W_ptr, I_ptr, Bias_ptr, DY_ptr, Lse_ptr, GRow_ptr, Gate_ptr, Buf_ptr, GW_ptr, GBias_ptr,
    stride_xtd, stride_dyb, stride_bufr,
    B, K, tile_start, label_stop,
    GROUP: tl.constexpr, DOT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr, TILES: tl.constexpr, B_BLOCKS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Weight and bias gradients of the program's tiles and their input-gradient buffer rows. GATED: only the
    weight and bias gradients (the input gradient is known), and only when gate[0] != 0 (decided on the
    device: the row gradient differs between rows)."""
    if GATED:
        if tl.load(Gate_ptr) != 0:
            _bwd_tiles(
                XT_ptr, W_ptr, I_ptr, Bias_ptr, DY_ptr, Lse_ptr, GRow_ptr, Buf_ptr, GW_ptr, GBias_ptr,
                stride_xtd, stride_dyb, stride_bufr, B, K, tile_start, label_stop,
                GROUP, DOT, LOSS, HAS_BIAS, False, TILES, B_BLOCKS, BLOCK_B, BLOCK_C, BLOCK_K,
                PRECISION, UPCAST,
            )  # fmt: skip
    else:
        _bwd_tiles(
            XT_ptr, W_ptr, I_ptr, Bias_ptr, DY_ptr, Lse_ptr, GRow_ptr, Buf_ptr, GW_ptr, GBias_ptr,
            stride_xtd, stride_dyb, stride_bufr, B, K, tile_start, label_stop,
            GROUP, DOT, LOSS, HAS_BIAS, True, TILES, B_BLOCKS, BLOCK_B, BLOCK_C, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip


@triton.jit
def _gated_scale_kernel(X_ptr, Gate_ptr, Scale_ptr, N, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """x *= scale[0] in place when gate[0] != 0 (the row gradient is uniform but not the expected one)."""
    if tl.load(Gate_ptr) != 0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X_ptr + offs, _cast(x * tl.load(Scale_ptr), X_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _fixed_fanin_dx_kernel(
    Buf_ptr, Perm_ptr, Colptr_ptr, W_ptr, GX_ptr,
    stride_bufr, stride_gxb,
    B, K, row_base,
    SCALED: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Column d = pid 0: dx[b, d] (+)= sum_{j in colptr[d] .. colptr[d + 1]} s_j buf[row_j, b], with
    row_j = perm[j] - row_base, s_j = 1 (grouped connections) or row_j = perm[j] // K - row_base,
    s_j = w.flat[perm[j]] (per-label connections: the buffer holds dz rows)."""
    column = tl.program_id(0).to(tl.int64)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    start = tl.load(Colptr_ptr + column)
    stop = tl.load(Colptr_ptr + column + 1)
    acc = tl.zeros((BLOCK_J, BLOCK_B), dtype=tl.float32)
    for j0 in range(start, stop, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < stop
        connection = tl.load(Perm_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
        if SCALED:
            rows = connection // K - row_base
        else:
            rows = connection - row_base
        mask = mask_j[:, None] & mask_b[None, :]
        values = tl.load(Buf_ptr + rows[:, None] * stride_bufr + offs_b[None, :], mask=mask, other=0.0)
        if SCALED:
            scale = tl.load(W_ptr + connection, mask=mask_j, other=0.0).to(tl.float32)
            acc += values.to(tl.float32) * scale[:, None]
        else:
            acc += values.to(tl.float32)
    dx = tl.sum(acc, axis=0)
    gx_ptrs = GX_ptr + offs_b.to(tl.int64) * stride_gxb + column
    if ACCUMULATE:
        dx += tl.load(gx_ptrs, mask=mask_b, other=0.0)
    tl.store(gx_ptrs, dx, mask=mask_b)


_TILE_KEY = ["B", "K", "GROUP", "DOT", "LOSS", "HAS_BIAS", "TILES", "B_BLOCKS", "BLOCK_B", "PRECISION"]
_WARPS_STAGES = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
# MEGACLASS_AUTOTUNE=1: time these launch configs once per key (the tile kernels write fresh outputs, so
# repeated runs while tuning are harmless; the dx kernel accumulates into GX across chunks, restored between
# runs; the gated backward rewrites the weight gradient in place, restored too)
_fwd_tuned = triton.autotune(_WARPS_STAGES, key=[*_TILE_KEY, "GRAD"])(_fixed_fanin_fwd_kernel)
_bwd_tuned = triton.autotune(_WARPS_STAGES, key=[*_TILE_KEY, "GATED"], restore_value=["GW_ptr", "GBias_ptr"])(
    _fixed_fanin_bwd_kernel
)
_dx_tuned = triton.autotune(
    [triton.Config({"BLOCK_J": j}, num_warps=w) for j in (16, 32, 64) for w in (4, 8)],
    key=["B", "SCALED", "BLOCK_B"],
    restore_value=["GX_ptr"],
)(_fixed_fanin_dx_kernel)


def tiles_per_program(tiles: int) -> int:
    """Tiles one program of a forward pass without gradients serves: the largest power of two up to 8 that
    still leaves 4096 programs (a few waves of resident programs on a large GPU), so small layers keep one
    tile per program."""
    per_program = 1
    while per_program < _MAX_TILES and tiles >= 2 * per_program * _MIN_PROGRAMS:
        per_program *= 2
    return per_program


@dataclass(frozen=True)
class _Geometry:
    """Tiles of one call: per-label or grouped, batch blocks, tiles per program, chunks of the buffer."""

    dot: bool
    block_b: int
    b_blocks: int
    block_c: int
    block_k: int
    tiles: int
    per_program: int
    rows_per_tile: int  # input-gradient buffer rows of a tile: K connections (grouped) or its labels

    def constexprs(self) -> dict[str, int | bool]:
        return {
            "DOT": self.dot,
            "TILES": self.per_program,
            "B_BLOCKS": self.b_blocks,
            "BLOCK_B": self.block_b,
            "BLOCK_C": self.block_c,
            "BLOCK_K": self.block_k,
        }

    def tiles_per_chunk(self, chunk_rows: int) -> int:
        """Tiles per chunk of the buffer: a multiple of the tiles per program (so a chunk's programs start
        at tile_start / TILES), at least one program's."""
        tiles = chunk_rows // self.rows_per_tile
        return max(self.per_program, tiles // self.per_program * self.per_program)


def _geometry(
    batch: int, classes: int, fan_in: int, group: int, per_program: int, gradients: bool = False
) -> _Geometry:
    """Grouped tiles for power-of-two ``G >= 16`` and ``K <= 256`` (one group per tile), else per-label;
    ``per_program`` 0 picks one tile for passes that write ``gradients``, else :func:`tiles_per_program`."""
    dot = grouped_tiles(group, fan_in)
    block_b = max(16, min(_MAX_BLOCK_B, triton.next_power_of_2(max(batch, 1))))
    block_c = group if dot else LABEL_TILE
    tiles = triton.cdiv(classes, block_c)
    return _Geometry(
        dot=dot,
        block_b=block_b,
        b_blocks=triton.cdiv(batch, block_b),
        block_c=block_c,
        block_k=max(16, triton.next_power_of_2(fan_in)) if dot else 16,
        tiles=tiles,
        per_program=per_program or (_GRADIENT_TILES if gradients else tiles_per_program(tiles)),
        rows_per_tile=fan_in if dot else block_c,
    )


def _dot_mode(x: torch.Tensor) -> tuple[str, bool]:
    """tl.dot precision (fp32 inputs stay exact: no tf32) and whether to upcast under the CPU interpreter."""
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    return precision, os.environ.get("TRITON_INTERPRET", "0") == "1"


def _constexprs(
    x: torch.Tensor,
    geometry: _Geometry,
    group: int,
    loss: int,
    bias: torch.Tensor | None,
    **flags: int | bool,
) -> dict[str, int | bool | str]:
    """The tile kernels' compile-time arguments: the layer's, the dot mode of x, the geometry's, flags."""
    precision, upcast = _dot_mode(x)
    return {
        "GROUP": group, "LOSS": loss, "HAS_BIAS": bias is not None, "PRECISION": precision, "UPCAST": upcast,
        **geometry.constexprs(), **flags,
    }  # fmt: skip


def _row_slots(geometry: _Geometry) -> int:
    """``NB``: the forward kernels' per-row partial slots, a power of two holding every batch block."""
    return triton.next_power_of_2(geometry.b_blocks)


def _check(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.numel() >= 2**31:  # gathers from xT (D, B) use int32 offsets
        raise ValueError(f"x: expected fewer than 2^31 elements, got shape {tuple(x.shape)}")
    if x.dim() != 2 or weight.dim() != 2 or index.dim() != 2:
        raise ValueError(
            f"x, weight, index: expected 2-D, got {tuple(x.shape)}, {tuple(weight.shape)}, "
            f"{tuple(index.shape)}"
        )
    if not weight.is_contiguous() or not index.is_contiguous():
        raise ValueError("weight and index must be contiguous (C, K) and (ceil(C / G), K)")
    if bias is not None and not bias.is_contiguous():
        raise ValueError("bias must be contiguous (C,)")


def _grad_w_target(geometry: _Geometry, weight: torch.Tensor) -> torch.Tensor:
    """Where the kernels write the weight gradient: in the weights' dtype, except per-label tiles over several
    batch blocks with low-precision weights, which add block to block in an fp32 one."""
    fp32 = not geometry.dot and geometry.b_blocks > 1
    return torch.empty_like(weight, dtype=torch.float32 if fp32 else weight.dtype)


def _launch_tiles(forward: bool, grid: int, args: tuple, constexprs: dict) -> None:
    """The forward or backward tile kernel, tuned (MEGACLASS_AUTOTUNE=1) or with the fixed launch config."""
    if forward:
        kernel, launch = (_fwd_tuned, {}) if autotune_enabled() else (_fixed_fanin_fwd_kernel, _TILE_LAUNCH)
    else:
        kernel, launch = (_bwd_tuned, {}) if autotune_enabled() else (_fixed_fanin_bwd_kernel, _TILE_LAUNCH)
    kernel[(grid,)](*args, **constexprs, **launch)


def _tiles_then_columns(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    geometry: _Geometry,
    group: int,
    chunk_rows: int,
    launch_chunk,
) -> torch.Tensor:
    """dx ``(B, D)`` fp32: chunk by chunk of tiles, ``launch_chunk(tile_start, tile_stop, buf)`` writes the
    chunk's buffer rows, then the column kernel adds them into dx by input column."""
    batch, dim, classes = x.shape[0], x.shape[1], weight.shape[0]
    per_chunk = geometry.tiles_per_chunk(chunk_rows)
    order = column_order(
        index, classes=classes, group=group, dim=dim, per_label=not geometry.dot,
        rows_per_chunk=per_chunk * (1 if geometry.dot else geometry.block_c),
    )  # fmt: skip
    buf_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    rows = min(geometry.tiles, per_chunk) * geometry.rows_per_tile
    buf = torch.empty(rows, batch, dtype=buf_dtype, device=x.device)
    grad_x = torch.empty(batch, dim, dtype=torch.float32, device=x.device)
    block_b = geometry.block_b
    dx_kernel, dx_launch = (_dx_tuned, {}) if autotune_enabled() else (_fixed_fanin_dx_kernel, _DX_LAUNCH)
    for chunk in range(order.chunks):
        start = chunk * per_chunk
        launch_chunk(start, min(start + per_chunk, geometry.tiles), buf)
        dx_kernel[(dim, triton.cdiv(batch, block_b))](
            buf, order.perm, order.colptr[chunk * dim :], weight, grad_x,
            buf.stride(0), grad_x.stride(0),
            batch, weight.shape[1], start * geometry.rows_per_tile,
            SCALED=not geometry.dot, ACCUMULATE=chunk > 0, BLOCK_B=block_b, **dx_launch,
        )  # fmt: skip
    return grad_x


def fixed_fanin_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    group: int,
    loss: str,
    tiles_per_program: int = 0,
) -> torch.Tensor:
    """Logits ``(B, C)`` in ``x``'s dtype (``loss="none"``) or fp32 row values ``(B,)``: the sum over labels
    of ``l(z, 0)`` (``bce``, ``hinge``) or the log-sum-exp over labels (``softmax``).

    Args:
        tiles_per_program: tiles (label groups, or blocks of 32 labels) per program; 0 picks by size.
    """
    _check(x, weight, index, bias)
    batch, (classes, fan_in) = x.shape[0], weight.shape
    code = LOSS_CODES[loss]
    if batch == 0:
        return x.new_empty(0, classes) if code == 0 else x.new_empty(0, dtype=torch.float32)
    geometry = _geometry(batch, classes, fan_in, group, tiles_per_program)
    programs = triton.cdiv(geometry.tiles, geometry.per_program)
    x_t = x.t().contiguous()  # (D, B): a gathered input column is B contiguous values
    # outputs a mode does not write are stand-ins pointing at a live tensor (Triton rejects null pointers)
    if code == 0:
        y = torch.empty(batch, classes, dtype=x.dtype, device=x.device)
        part_a = part_b = y
    else:
        part_a = torch.empty(programs, batch, dtype=torch.float32, device=x.device)
        part_b = torch.empty(programs, batch, dtype=torch.float32, device=x.device) if code == 3 else part_a
        y = part_a
    args = (
        x_t, weight, index, bias if bias is not None else weight, y, part_a, part_b, weight, weight, weight,
        x_t.stride(0), y.stride(0) if code == 0 else 0, 0,
        batch, fan_in, 0, classes, 1.0,
    )  # fmt: skip
    constexprs = _constexprs(x, geometry, group, code, bias, GRAD=False, NB=_row_slots(geometry))
    _launch_tiles(True, programs, args, constexprs)
    if code == 0:
        return y
    if code == 3:  # merge program log-sum-exps: lse = m + log(sum_p s_p exp(m_p - m))
        row_max = part_a.max(0).values
        return row_max + torch.log((part_b * torch.exp(part_a - row_max)).sum(0))
    return part_a.sum(0)


def fixed_fanin_fwd_grad(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    group: int,
    loss: str,
    row_grad: float,
    tiles_per_program: int = 0,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """BCE or squared-hinge row values ``(B,)`` fp32 and, in the same pass, the gradients they would get if
    every row's gradient were ``row_grad``: ``(dx (B, D) fp32, dweight, dbias)``, to be finished by
    :func:`fixed_fanin_grad_finish` with the actual row gradient. ``dweight`` is in the weights' dtype (fp32
    for per-label tiles over several batch blocks), ``dbias`` in the bias's.
    """
    _check(x, weight, index, bias)
    code = LOSS_CODES[loss]
    if code not in (1, 2):
        raise ValueError(f"loss: expected 'bce' or 'hinge' for gradients in the forward pass, got {loss!r}")
    batch, (classes, fan_in) = x.shape[0], weight.shape
    geometry = _geometry(batch, classes, fan_in, group, tiles_per_program, gradients=True)
    grad_w = _grad_w_target(geometry, weight)
    grad_b = torch.empty_like(bias) if bias is not None else None
    if batch == 0:
        zeros_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        grad_b = grad_b.zero_() if grad_b is not None else None
        return x.new_empty(0, dtype=torch.float32), (zeros_x, grad_w.zero_(), grad_b)
    # a chunk's per-program partials, summed into the row values chunk by chunk: bounded as the buffer is
    chunk_tiles = min(geometry.tiles, geometry.tiles_per_chunk(chunk_rows))
    part_a = torch.empty(triton.cdiv(chunk_tiles, geometry.per_program), batch, device=x.device)
    chunk_sums: list[torch.Tensor] = []
    x_t = x.t().contiguous()  # (D, B)
    constexprs = _constexprs(x, geometry, group, code, bias, GRAD=True, NB=_row_slots(geometry))

    def launch_chunk(tile_start: int, tile_stop: int, buf: torch.Tensor) -> None:
        programs = triton.cdiv(tile_stop - tile_start, geometry.per_program)
        args = (
            x_t, weight, index, bias if bias is not None else weight, part_a, part_a, part_a, buf, grad_w,
            grad_b if grad_b is not None else grad_w,
            x_t.stride(0), 0, buf.stride(0),
            batch, fan_in, tile_start, min(classes, tile_stop * geometry.block_c), row_grad,
        )  # fmt: skip
        _launch_tiles(True, programs, args, constexprs)
        chunk_sums.append(part_a[:programs].sum(0))

    grad_x = _tiles_then_columns(x, index, weight, geometry, group, chunk_rows, launch_chunk)
    row_values = chunk_sums[0] if len(chunk_sums) == 1 else torch.stack(chunk_sums).sum(0)
    return row_values, (grad_x, grad_w, grad_b)


def _gated_scale(tensor: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor) -> None:
    flat = tensor.view(-1)
    grid = (triton.cdiv(flat.numel(), _SCALE_BLOCK),)
    _gated_scale_kernel[grid](
        flat, gate, scale, flat.numel(), BLOCK=_SCALE_BLOCK, UPCAST=_dot_mode(tensor)[1]
    )


def fixed_fanin_grad_finish(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    group: int,
    loss: str,
    grad: torch.Tensor,
    row_grad: float,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    tiles_per_program: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, dweight, dbias)`` in the inputs' dtypes from the gradients of :func:`fixed_fanin_fwd_grad` at
    ``row_grad`` and the actual ``grad (B,)``, without a host sync; updates ``grads``' tensors in place.

    ``dx`` is scaled per row by ``grad / row_grad`` (exact: it is linear in each row's ``dL/dz``); the weight
    and bias gradients are kept when every row got ``row_grad``, scaled by a kernel gated on the device when
    the rows agree on another value, and recomputed by the gated backward kernel when they differ.
    """
    _check(x, weight, index, bias)
    batch, (classes, fan_in) = x.shape[0], weight.shape
    grad_x, grad_w, grad_b = grads
    ratio = grad.float().contiguous() / row_grad  # (B,)
    grad_x = (grad_x * ratio[:, None]).to(x.dtype)
    if batch == 0:
        return grad_x, grad_w.to(weight.dtype), grad_b
    first = ratio[:1]
    uniform = (ratio == first).all()
    rescale = (uniform & (first != 1.0)).to(torch.int32)  # (1,)
    recompute = (~uniform).to(torch.int32).reshape(1)
    _gated_scale(grad_w, rescale, first)
    if grad_b is not None:
        _gated_scale(grad_b, rescale, first)
    geometry = _geometry(batch, classes, fan_in, group, tiles_per_program, gradients=True)
    x_t = x.t().contiguous()  # (D, B)
    g_row = grad.float().contiguous()
    args = (
        x_t, weight, index, bias if bias is not None else weight, g_row, g_row, g_row, recompute, weight,
        grad_w, grad_b if grad_b is not None else grad_w,
        x_t.stride(0), 0, 0,
        batch, fan_in, 0, classes,
    )  # fmt: skip
    constexprs = _constexprs(x, geometry, group, LOSS_CODES[loss], bias, GATED=True)
    _launch_tiles(False, triton.cdiv(geometry.tiles, geometry.per_program), args, constexprs)
    return grad_x, grad_w.to(weight.dtype), grad_b


def fixed_fanin_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    group: int,
    loss: str,
    grad: torch.Tensor,
    lse: torch.Tensor | None = None,
    chunk_rows: int = CHUNK_ROWS,
    tiles_per_program: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dx, dweight, dbias)`` in the inputs' dtypes, recomputing each tile's logits.

    Args:
        grad: ``dL/dy (B, C)`` for ``loss="none"``, else ``dL/d row value (B,)``.
        lse: ``(B,)`` log-sum-exp from the forward pass, for ``softmax``.
        chunk_rows: rows of the ``(rows, B)`` input-gradient buffer per chunk of labels (its memory bound).
        tiles_per_program: tiles per program; 0 gives one, as in every pass that writes gradients.
    """
    _check(x, weight, index, bias)
    batch, (classes, fan_in) = x.shape[0], weight.shape
    geometry = _geometry(batch, classes, fan_in, group, tiles_per_program, gradients=True)
    grad_w = _grad_w_target(geometry, weight)
    grad_b = torch.empty_like(bias) if bias is not None else None
    if batch == 0:
        grad_b = grad_b.zero_() if grad_b is not None else None
        return torch.zeros_like(x), grad_w.zero_().to(weight.dtype), grad_b
    code = LOSS_CODES[loss]
    grad = grad.contiguous() if code == 0 else grad.float().contiguous()
    x_t = x.t().contiguous()  # (D, B)
    constexprs = _constexprs(x, geometry, group, code, bias, GATED=False)

    def launch_chunk(tile_start: int, tile_stop: int, buf: torch.Tensor) -> None:
        args = (
            x_t, weight, index, bias if bias is not None else weight, grad, lse if lse is not None else grad,
            grad, grad, buf, grad_w, grad_b if grad_b is not None else grad_w,
            x_t.stride(0), grad.stride(0) if code == 0 else 0, buf.stride(0),
            batch, fan_in, tile_start, min(classes, tile_stop * geometry.block_c),
        )  # fmt: skip
        _launch_tiles(False, triton.cdiv(tile_stop - tile_start, geometry.per_program), args, constexprs)

    grad_x = _tiles_then_columns(x, index, weight, geometry, group, chunk_rows, launch_chunk)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b
