"""Triton kernels and launchers of the fixed fan-in layer ``y[b, c] = sum_k x[b, idx[c // G, k]] * w[c, k]``.

The kernels work on ``xT (D, B)``, the inputs transposed once per call, so every gathered input column is
``B`` contiguous values (one coalesced read) and a tile of logits is ``zT (labels, B)``.

* Per-label indices (``DOT=False``): a program owns ``BLOCK_C`` labels; for each ``k`` it gathers the rows
  ``xT[idx[c, k], :]`` of its labels and accumulates ``w[c, k] * xT[idx[c, k], b]`` on CUDA cores (SPARTEX).
* Grouped indices (``DOT=True``, ``G >= 16`` a power of two): the ``G`` labels of a group share one index row,
  so the group's ``(G, BLOCK_K)`` weight tile meets the ``(BLOCK_K, B)`` gathered inputs in a ``tl.dot`` on
  tensor cores in the inputs' precision (bf16 features under autocast meet fp32 master weights cast to bf16;
  fp32 accumulation; HASTE's grouping). fp32 features keep an exact fp32 dot.

Fused losses never keep ``B x C`` logits: the forward pass writes per-(program, row) partials (a sum of the
negative-target loss ``l(z, 0)`` for BCE and squared hinge; a running max and sum of exponentials for softmax,
merged into a log-sum-exp as in online softmax, arXiv 1805.02867) and the backward pass recomputes each tile's
logits to form ``dL/dz`` in registers. Positive targets are a sparse correction done outside (``L`` entries).

Backward, without atomics: a program writes its labels' weight gradient ``gw[c, k] = sum_b dz[b, c] x[b,
idx[c, k]]`` (it owns those rows) and, for the input gradient, one buffer row per connection: the group's
``gxT[k, b] = sum_j w[gG + j, k] dz[b, gG + j]`` (grouped) or the label's ``dz[b, c]`` (per-label). A second
kernel reduces the buffer by input column over the connections sorted by column (``columns.py``, cached per
topology): ``dx[b, d] = sum_{(r, k) -> d} scale * buf[r, b]``, a deterministic segmented sum. Labels go
through the buffer in chunks of at most ``_CHUNK_ROWS`` rows, which bounds its memory. Offsets into the
weights, the index and the buffer are int64: nothing assumes ``C * K < 2^31``; gathers from ``xT`` use int32
(the launchers require ``B * D < 2^31``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megaclass.ops import autotune_enabled
from megaclass.ops.fixed_fanin.columns import column_order

__all__ = ["LOSS_CODES", "fixed_fanin_bwd", "fixed_fanin_fwd"]

LOSS_CODES = {"none": 0, "bce": 1, "hinge": 2, "softmax": 3}
_BLOCK_C = 32  # labels per program in the per-label kernels
_BLOCK_K = 32  # fan-in slice per tl.dot in the grouped kernels
_BLOCK_J = 32  # connections per step of the input-gradient reduction
# untuned launch configs: what MEGACLASS_AUTOTUNE=1 picked on an H100 (B = 128, K = 32, G = 16 and 32, bf16):
# no software pipelining for the one-slice fan-in loops, 8 warps for the column reduction
_TILE_LAUNCH = {"num_warps": 4, "num_stages": 1}
_DX_LAUNCH = {"BLOCK_J": _BLOCK_J, "num_warps": 8, "num_stages": 3}
_CHUNK_ROWS = 1 << 19  # buffer rows per chunk of labels: (rows, B), 128 MiB at B = 128 in bf16


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST computes bf16 operands in fp32 (exact: bf16 products fit
    fp32), for Triton's CPU interpreter, whose bf16 tl.dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_t(
    XT_ptr, W_ptr, I_ptr, Bias_ptr, offs_c, mask_c, tile, offs_b, mask_b,
    stride_xtd, K,
    GROUP: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """zT (BLOCK_C, BLOCK_B) fp32 = sum_k w[c, k] xT[idx[c // G, k], b] (+ bias[c])."""
    w_rows = offs_c * K  # weight (C, K) contiguous; offs_c is int64
    acc = tl.zeros((BLOCK_C, BLOCK_B), dtype=tl.float32)
    if DOT:  # the tile is one group: index row `tile`
        offs_kk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_kk
            mask_k = offs_k < K
            cols = tl.load(I_ptr + tile * K + offs_k, mask=mask_k, other=0)
            xg = tl.load(
                XT_ptr + cols[:, None] * stride_xtd + offs_b[None, :],
                mask=mask_k[:, None] & mask_b[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_B)
            wt = tl.load(
                W_ptr + w_rows[:, None] + offs_k[None, :], mask=mask_c[:, None] & mask_k[None, :], other=0.0
            )  # (G, BLOCK_K)
            acc = _dot(wt.to(xg.dtype), xg, acc, PRECISION, UPCAST)
    else:
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
def _negative_loss(z, LOSS: tl.constexpr):
    """l(z, 0): BCE softplus(z) = max(z, 0) + log(1 + exp(-|z|)); squared hinge max(0, 1 + z)^2."""
    if LOSS == 1:
        return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
    else:
        h = tl.maximum(1.0 + z, 0.0)
        return h * h


@triton.jit
def _negative_grad(z, LOSS: tl.constexpr):
    """dl(z, 0)/dz: BCE sigmoid(z); squared hinge 2 max(0, 1 + z)."""
    if LOSS == 1:
        return 1.0 / (1.0 + tl.exp(-z))
    else:
        return 2.0 * tl.maximum(1.0 + z, 0.0)


@triton.jit
def _fixed_fanin_fwd_kernel(
    XT_ptr, W_ptr, I_ptr, Bias_ptr, Y_ptr, PartA_ptr, PartB_ptr,
    stride_xtd, stride_yb,
    B, C, K,
    GROUP: tl.constexpr, DOT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """LOSS 0: store y (B, C). Else partials (programs, B): BCE/hinge row sums of l(z, 0) into PartA;
    softmax the tile's row max into PartA and sum exp(z - max) into PartB."""
    tile = tl.program_id(0).to(tl.int64)
    offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        z = _logits_t(
            XT_ptr, W_ptr, I_ptr, Bias_ptr, offs_c, mask_c, tile, offs_b, mask_b, stride_xtd, K,
            GROUP, DOT, HAS_BIAS, BLOCK_C, BLOCK_B, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip
        mask = mask_c[:, None] & mask_b[None, :]
        part = PartA_ptr + tile * B + offs_b
        if LOSS == 0:
            y_ptrs = Y_ptr + offs_b.to(tl.int64)[None, :] * stride_yb + offs_c[:, None]
            tl.store(y_ptrs, z.to(Y_ptr.dtype.element_ty), mask=mask)
        elif LOSS == 3:
            z = tl.where(mask, z, float("-inf"))
            row_max = tl.max(z, axis=0)
            row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            tl.store(part, row_max, mask=mask_b)
            tl.store(PartB_ptr + tile * B + offs_b, tl.sum(tl.exp(z - row_max[None, :]), axis=0), mask=mask_b)
        else:
            tl.store(part, tl.sum(tl.where(mask, _negative_loss(z, LOSS), 0.0), axis=0), mask=mask_b)


@triton.jit
def _grad_t(
    XT_ptr, W_ptr, I_ptr, Bias_ptr, DY_ptr, Lse_ptr, GRow_ptr, offs_c, mask_c, tile, offs_b, mask_b,
    stride_xtd, stride_dyb, K,
    GROUP: tl.constexpr, DOT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """dzT (BLOCK_C, BLOCK_B) fp32, zero outside the tile: dy (LOSS 0) or g_b * dl/dz from recomputed z."""
    mask = mask_c[:, None] & mask_b[None, :]
    if LOSS == 0:
        dy_ptrs = DY_ptr + offs_b.to(tl.int64)[None, :] * stride_dyb + offs_c[:, None]
        return tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    z = _logits_t(
        XT_ptr, W_ptr, I_ptr, Bias_ptr, offs_c, mask_c, tile, offs_b, mask_b, stride_xtd, K,
        GROUP, DOT, HAS_BIAS, BLOCK_C, BLOCK_B, BLOCK_K, PRECISION, UPCAST,
    )  # fmt: skip
    g_row = tl.load(GRow_ptr + offs_b, mask=mask_b, other=0.0)
    if LOSS == 3:
        lse = tl.load(Lse_ptr + offs_b, mask=mask_b, other=0.0)
        dz = tl.exp(z - lse[None, :]) * g_row[None, :]  # softmax probability times d loss / d lse
    else:
        dz = _negative_grad(z, LOSS) * g_row[None, :]
    return tl.where(mask, dz, 0.0)


@triton.jit
def _fixed_fanin_bwd_kernel(
    XT_ptr, W_ptr, I_ptr, Bias_ptr, DY_ptr, Lse_ptr, GRow_ptr, Buf_ptr, GW_ptr, GBias_ptr,
    stride_xtd, stride_dyb, stride_bufr,
    B, C, K, first_tile,
    GROUP: tl.constexpr, DOT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Tile first_tile + pid: gw[c, k] = sum_b dz[b, c] x[b, idx[c, k]] and gbias[c] = sum_b dz[b, c] (this
    program's rows); buffer rows for dx: gxT[k, b] = sum_{c in group} w[c, k] dz[b, c] per connection (DOT),
    or dz[b, c] per label, at rows counted from the chunk's first tile."""
    tile = first_tile + tl.program_id(0).to(tl.int64)
    offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    w_rows = offs_c * K
    gbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        dz = _grad_t(
            XT_ptr, W_ptr, I_ptr, Bias_ptr, DY_ptr, Lse_ptr, GRow_ptr, offs_c, mask_c, tile, offs_b, mask_b,
            stride_xtd, stride_dyb, K,
            GROUP, DOT, LOSS, HAS_BIAS, BLOCK_C, BLOCK_B, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip
        gbias += tl.sum(dz, axis=1)
        if DOT:
            offs_kk = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_kk
                mask_k = offs_k < K
                cols = tl.load(I_ptr + tile * K + offs_k, mask=mask_k, other=0)
                mask_kb = mask_k[:, None] & mask_b[None, :]
                xg = tl.load(XT_ptr + cols[:, None] * stride_xtd + offs_b[None, :], mask=mask_kb, other=0.0)
                mask_ck = mask_c[:, None] & mask_k[None, :]
                wt = tl.load(W_ptr + w_rows[:, None] + offs_k[None, :], mask=mask_ck, other=0.0)  # (G, BK)
                dz_c = dz.to(xg.dtype)
                gw = _dot(dz_c, tl.trans(xg), tl.zeros((BLOCK_C, BLOCK_K), tl.float32), PRECISION, UPCAST)
                gw_ptrs = GW_ptr + w_rows[:, None] + offs_k[None, :]
                if b0 > 0:
                    gw += tl.load(gw_ptrs, mask=mask_ck, other=0.0)
                tl.store(gw_ptrs, gw, mask=mask_ck)
                zero = tl.zeros((BLOCK_K, BLOCK_B), tl.float32)
                gx = _dot(tl.trans(wt.to(xg.dtype)), dz_c, zero, PRECISION, UPCAST)  # (BLOCK_K, BLOCK_B)
                rows = (tile - first_tile) * K + offs_k
                buf_ptrs = Buf_ptr + rows[:, None] * stride_bufr + offs_b[None, :]
                tl.store(buf_ptrs, gx.to(Buf_ptr.dtype.element_ty), mask=mask_kb)
        else:
            rows = offs_c - first_tile * BLOCK_C
            buf_ptrs = Buf_ptr + rows[:, None] * stride_bufr + offs_b[None, :]
            tl.store(buf_ptrs, dz.to(Buf_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_b[None, :])
            i_rows = (offs_c // GROUP) * K
            for k in range(0, K):
                cols = tl.load(I_ptr + i_rows + k, mask=mask_c, other=0)
                xv = tl.load(
                    XT_ptr + cols[:, None] * stride_xtd + offs_b[None, :],
                    mask=mask_c[:, None] & mask_b[None, :],
                    other=0.0,
                )
                gw = tl.sum(dz * xv.to(tl.float32), axis=1)
                if b0 > 0:
                    gw += tl.load(GW_ptr + w_rows + k, mask=mask_c, other=0.0)
                tl.store(GW_ptr + w_rows + k, gw, mask=mask_c)
    if HAS_BIAS:
        tl.store(GBias_ptr + offs_c, gbias, mask=mask_c)


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


_TILE_KEY = ["B", "K", "GROUP", "DOT", "LOSS", "HAS_BIAS", "BLOCK_B", "PRECISION"]
_WARPS_STAGES = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
# MEGACLASS_AUTOTUNE=1: time these launch configs once per key (the kernels write fresh outputs, so repeated
# runs while tuning are harmless; the dx kernel accumulates into GX across chunks, restored between runs)
_fwd_tuned = triton.autotune(_WARPS_STAGES, key=_TILE_KEY)(_fixed_fanin_fwd_kernel)
_bwd_tuned = triton.autotune(_WARPS_STAGES, key=_TILE_KEY)(_fixed_fanin_bwd_kernel)
_dx_tuned = triton.autotune(
    [triton.Config({"BLOCK_J": j}, num_warps=w) for j in (16, 32, 64) for w in (4, 8)],
    key=["B", "SCALED", "BLOCK_B"],
    restore_value=["GX_ptr"],
)(_fixed_fanin_dx_kernel)


def _launch_config(batch: int, group: int) -> dict[str, int | bool]:
    """Tile sizes: grouped kernel for power-of-two ``G >= 16`` (one group per program), else per-label."""
    dot = group >= 16 and group & (group - 1) == 0
    block_b = max(16, min(128, triton.next_power_of_2(batch)))
    return {"DOT": dot, "BLOCK_B": block_b, "BLOCK_C": group if dot else _BLOCK_C, "BLOCK_K": _BLOCK_K}


def _dot_mode(x: torch.Tensor) -> tuple[str, bool]:
    """tl.dot precision (fp32 inputs stay exact: no tf32) and whether to upcast under the CPU interpreter."""
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    return precision, os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def fixed_fanin_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    group: int,
    loss: str,
) -> torch.Tensor:
    """Logits ``(B, C)`` in ``x``'s dtype (``loss="none"``) or fp32 row values ``(B,)``: the sum over labels
    of ``l(z, 0)`` (``bce``, ``hinge``) or the log-sum-exp over labels (``softmax``)."""
    _check(x, weight, index, bias)
    batch, (classes, fan_in) = x.shape[0], weight.shape
    config = _launch_config(batch, group)
    programs = triton.cdiv(classes, config["BLOCK_C"])
    code = LOSS_CODES[loss]
    x_t = x.t().contiguous()  # (D, B): a gathered input column is B contiguous values
    # outputs a mode does not write are stand-ins pointing at a live tensor (Triton rejects null pointers)
    if code == 0:
        y = torch.empty(batch, classes, dtype=x.dtype, device=x.device)
        part_a = part_b = y
    else:
        part_a = torch.empty(programs, batch, dtype=torch.float32, device=x.device)
        part_b = torch.empty(programs, batch, dtype=torch.float32, device=x.device) if code == 3 else part_a
        y = part_a
    precision, upcast = _dot_mode(x)
    kernel, launch = (_fwd_tuned, {}) if autotune_enabled() else (_fixed_fanin_fwd_kernel, _TILE_LAUNCH)
    kernel[(programs,)](
        x_t, weight, index, bias if bias is not None else weight, y, part_a, part_b,
        x_t.stride(0), y.stride(0) if code == 0 else 0,
        batch, classes, fan_in,
        GROUP=group, LOSS=code, HAS_BIAS=bias is not None, PRECISION=precision, UPCAST=upcast,
        **config, **launch,
    )  # fmt: skip
    if code == 0:
        return y
    if code == 3:  # merge tile log-sum-exps: lse = m + log(sum_t s_t exp(m_t - m))
        row_max = part_a.max(0).values
        return row_max + torch.log((part_b * torch.exp(part_a - row_max)).sum(0))
    return part_a.sum(0)


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
    chunk_rows: int = _CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dx, dweight, dbias)`` in the inputs' dtypes.

    Args:
        grad: ``dL/dy (B, C)`` for ``loss="none"``, else ``dL/d row value (B,)``.
        lse: ``(B,)`` log-sum-exp from the forward pass, for ``softmax``.
        chunk_rows: rows of the ``(rows, B)`` input-gradient buffer per chunk of labels (its memory bound).
    """
    _check(x, weight, index, bias)
    batch, dim, (classes, fan_in) = x.shape[0], x.shape[1], weight.shape
    config = _launch_config(batch, group)
    dot, block_c = bool(config["DOT"]), int(config["BLOCK_C"])
    tiles = triton.cdiv(classes, block_c)
    tiles_per_chunk = max(1, chunk_rows // (fan_in if dot else block_c))
    # per-label: chunks of labels, rows = labels; grouped: chunks of groups (= tiles), rows = connections
    order = column_order(
        index, classes=classes, group=group, dim=dim, per_label=not dot,
        rows_per_chunk=tiles_per_chunk * (1 if dot else block_c),
    )  # fmt: skip
    code = LOSS_CODES[loss]
    grad = grad.contiguous() if code == 0 else grad.float().contiguous()
    x_t = x.t().contiguous()  # (D, B)
    buf_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    rows_per_tile = fan_in if dot else block_c
    buf = torch.empty(min(tiles, tiles_per_chunk) * rows_per_tile, batch, dtype=buf_dtype, device=x.device)
    grad_x = torch.empty(batch, dim, dtype=torch.float32, device=x.device)
    grad_w = torch.empty(classes, fan_in, dtype=torch.float32, device=x.device)
    grad_b = torch.empty(classes, dtype=torch.float32, device=x.device) if bias is not None else None
    precision, upcast = _dot_mode(x)
    block_b_dx = max(16, min(128, triton.next_power_of_2(batch)))
    tune = autotune_enabled()
    bwd_kernel, bwd_launch = (_bwd_tuned, {}) if tune else (_fixed_fanin_bwd_kernel, _TILE_LAUNCH)
    dx_kernel, dx_launch = (_dx_tuned, {}) if tune else (_fixed_fanin_dx_kernel, _DX_LAUNCH)
    for chunk in range(order.chunks):
        first = chunk * tiles_per_chunk
        count = min(tiles_per_chunk, tiles - first)
        bwd_kernel[(count,)](
            x_t, weight, index, bias if bias is not None else weight,
            grad, lse if lse is not None else grad, grad, buf, grad_w,
            grad_b if grad_b is not None else grad_w,
            x_t.stride(0), grad.stride(0) if code == 0 else 0, buf.stride(0),
            batch, classes, fan_in, first,
            GROUP=group, LOSS=code, HAS_BIAS=bias is not None, PRECISION=precision, UPCAST=upcast, **config,
            **bwd_launch,
        )  # fmt: skip
        dx_kernel[(dim, triton.cdiv(batch, block_b_dx))](
            buf, order.perm, order.colptr[chunk * dim :], weight, grad_x,
            buf.stride(0), grad_x.stride(0),
            batch, fan_in, first * rows_per_tile,
            SCALED=not dot, ACCUMULATE=chunk > 0, BLOCK_B=block_b_dx, **dx_launch,
        )  # fmt: skip
    grad_b = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b
