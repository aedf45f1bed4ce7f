"""Triton kernels and launchers of the fixed fan-in layer ``y[b, c] = sum_k x[b, idx[c // G, k]] * w[c, k]``.

One program owns a tile of labels (``BLOCK_C`` labels, or one group of ``G`` labels) and loops over batch
tiles, so it writes its labels' weight gradient without atomics; the input gradient is scattered into an fp32
``(B, D)`` buffer with atomic adds (many labels read the same input column).

* Per-label indices (``DOT=False``): for each ``k`` the tile gathers ``x[:, idx[c, k]]`` for its ``BLOCK_C``
  labels and accumulates ``x * w[:, k]`` on CUDA cores (SPARTEX's layout).
* Grouped indices (``DOT=True``, ``G >= 16`` a power of two): the ``G`` labels of a group share one index
  row, so a ``(BLOCK_B, BLOCK_K)`` tile of gathered inputs meets the group's ``(BLOCK_K, G)`` weight tile in a
  ``tl.dot`` on tensor cores in the inputs' precision (bf16 features under autocast meet fp32 master weights
  cast to bf16; fp32 accumulation; HASTE's grouping). fp32 features keep an exact fp32 dot.

Fused losses never keep ``B x C`` logits: the forward pass writes per-(program, row) partials (a sum of the
negative-target loss ``l(z, 0)`` for BCE and squared hinge; a running max and sum of exponentials for softmax,
merged into a log-sum-exp as in online softmax, arXiv 1805.02867) and the backward pass recomputes each tile's
logits to form ``dL/dz`` in registers. Positive targets are a sparse correction done outside (``L`` entries).
All pointer offsets are int64: nothing assumes ``C * K < 2^31``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["LOSS_CODES", "fixed_fanin_bwd", "fixed_fanin_fwd"]

LOSS_CODES = {"none": 0, "bce": 1, "hinge": 2, "softmax": 3}
_BLOCK_C = 64  # labels per program in the per-label kernel
_BLOCK_K = 32  # fan-in slice per tl.dot in the grouped kernel


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST computes bf16 operands in fp32 (exact: bf16 products fit
    fp32), for Triton's CPU interpreter, whose bf16 tl.dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile_logits(
    X_ptr, W_ptr, I_ptr, Bias_ptr, offs_b, mask_b, offs_c, mask_c, group_id,
    stride_xb, stride_xd, K,
    GROUP: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """z (BLOCK_B, BLOCK_C) fp32 = sum_k x[b, idx[c // G, k]] * w[c, k] (+ bias[c])."""
    x_rows = offs_b.to(tl.int64)[:, None] * stride_xb
    w_rows = offs_c.to(tl.int64) * K  # weight (C, K) contiguous: int64 row offsets
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    if DOT:
        offs_kk = tl.arange(0, BLOCK_K)
        i_row = group_id.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_kk
            mask_k = offs_k < K
            cols = tl.load(I_ptr + i_row + offs_k, mask=mask_k, other=0).to(tl.int64)
            xg = tl.load(
                X_ptr + x_rows + cols[None, :] * stride_xd, mask=mask_b[:, None] & mask_k[None, :], other=0.0
            )
            wt = tl.load(
                W_ptr + w_rows[None, :] + offs_k[:, None], mask=mask_c[None, :] & mask_k[:, None], other=0.0
            )
            acc = _dot(xg, wt.to(xg.dtype), acc, PRECISION, UPCAST)  # (BLOCK_B, BLOCK_K) @ (BLOCK_K, G)
    else:
        i_rows = (offs_c // GROUP).to(tl.int64) * K
        mask = mask_b[:, None] & mask_c[None, :]
        for k in range(0, K):
            cols = tl.load(I_ptr + i_rows + k, mask=mask_c, other=0).to(tl.int64)
            w = tl.load(W_ptr + w_rows + k, mask=mask_c, other=0.0).to(tl.float32)
            xv = tl.load(X_ptr + x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            acc += xv * w[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
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
    X_ptr, W_ptr, I_ptr, Bias_ptr, Y_ptr, PartA_ptr, PartB_ptr,
    stride_xb, stride_xd, stride_yb,
    B, C, K,
    GROUP: tl.constexpr, DOT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """LOSS 0: store y (B, C). Else partials (programs, B): BCE/hinge row sums of l(z, 0) into PartA;
    softmax the tile's row max into PartA and sum exp(z - max) into PartB."""
    pid = tl.program_id(0).to(tl.int64)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        z = _tile_logits(
            X_ptr, W_ptr, I_ptr, Bias_ptr, offs_b, mask_b, offs_c, mask_c, pid, stride_xb, stride_xd, K,
            GROUP, DOT, HAS_BIAS, BLOCK_B, BLOCK_C, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip
        mask = mask_b[:, None] & mask_c[None, :]
        part = PartA_ptr + pid * B + offs_b
        if LOSS == 0:
            y_ptrs = Y_ptr + offs_b.to(tl.int64)[:, None] * stride_yb + offs_c[None, :]
            tl.store(y_ptrs, z.to(Y_ptr.dtype.element_ty), mask=mask)
        elif LOSS == 3:
            z = tl.where(mask, z, float("-inf"))
            row_max = tl.max(z, axis=1)
            row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            tl.store(part, row_max, mask=mask_b)
            tl.store(PartB_ptr + pid * B + offs_b, tl.sum(tl.exp(z - row_max[:, None]), axis=1), mask=mask_b)
        else:
            tl.store(part, tl.sum(tl.where(mask, _negative_loss(z, LOSS), 0.0), axis=1), mask=mask_b)


@triton.jit
def _fixed_fanin_bwd_kernel(
    X_ptr, W_ptr, I_ptr, Bias_ptr, DY_ptr, Lse_ptr, GRow_ptr, GX_ptr, GW_ptr, GBias_ptr,
    stride_xb, stride_xd, stride_dyb, stride_gxb,
    B, C, K,
    GROUP: tl.constexpr, DOT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """dz = dy (LOSS 0) or g_b * dl(z)/dz recomputed; gw[c, k] = sum_b dz[b, c] x[b, idx[c, k]] (this
    program's rows, no atomics); gx[b, idx[c, k]] += dz[b, c] w[c, k] (atomics); gbias[c] = sum_b dz[b, c]."""
    pid = tl.program_id(0).to(tl.int64)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    w_rows = offs_c * K
    gbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        mask = mask_b[:, None] & mask_c[None, :]
        x_rows = offs_b.to(tl.int64)[:, None] * stride_xb
        gx_rows = offs_b.to(tl.int64)[:, None] * stride_gxb
        if LOSS == 0:
            dy_ptrs = DY_ptr + offs_b.to(tl.int64)[:, None] * stride_dyb + offs_c[None, :]
            dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        else:
            z = _tile_logits(
                X_ptr, W_ptr, I_ptr, Bias_ptr, offs_b, mask_b, offs_c, mask_c, pid, stride_xb, stride_xd, K,
                GROUP, DOT, HAS_BIAS, BLOCK_B, BLOCK_C, BLOCK_K, PRECISION, UPCAST,
            )  # fmt: skip
            g_row = tl.load(GRow_ptr + offs_b, mask=mask_b, other=0.0)
            if LOSS == 3:
                lse = tl.load(Lse_ptr + offs_b, mask=mask_b, other=0.0)
                dz = tl.exp(z - lse[:, None]) * g_row[:, None]  # softmax probability times d loss / d lse
            else:
                dz = _negative_grad(z, LOSS) * g_row[:, None]
            dz = tl.where(mask, dz, 0.0)
        gbias += tl.sum(dz, axis=0)
        if DOT:
            offs_kk = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_kk
                mask_k = offs_k < K
                cols = tl.load(I_ptr + pid * K + offs_k, mask=mask_k, other=0).to(tl.int64)
                mask_bk = mask_b[:, None] & mask_k[None, :]
                xg = tl.load(X_ptr + x_rows + cols[None, :] * stride_xd, mask=mask_bk, other=0.0)
                w_ptrs = W_ptr + w_rows[None, :] + offs_k[:, None]
                wt = tl.load(w_ptrs, mask=mask_c[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, G)
                dz_c = dz.to(xg.dtype)
                gw = _dot(tl.trans(dz_c), xg, tl.zeros((BLOCK_C, BLOCK_K), tl.float32), PRECISION, UPCAST)
                gw_ptrs = GW_ptr + w_rows[:, None] + offs_k[None, :]
                mask_ck = mask_c[:, None] & mask_k[None, :]
                if b0 > 0:
                    gw += tl.load(gw_ptrs, mask=mask_ck, other=0.0)
                tl.store(gw_ptrs, gw, mask=mask_ck)
                gx = _dot(
                    dz_c,
                    tl.trans(wt.to(xg.dtype)),
                    tl.zeros((BLOCK_B, BLOCK_K), tl.float32),
                    PRECISION,
                    UPCAST,
                )
                tl.atomic_add(GX_ptr + gx_rows + cols[None, :], gx, mask=mask_bk, sem="relaxed")
        else:
            i_rows = (offs_c // GROUP).to(tl.int64) * K
            for k in range(0, K):
                cols = tl.load(I_ptr + i_rows + k, mask=mask_c, other=0).to(tl.int64)
                w = tl.load(W_ptr + w_rows + k, mask=mask_c, other=0.0).to(tl.float32)
                xv = tl.load(X_ptr + x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
                gw = tl.sum(dz * xv, axis=0)
                if b0 > 0:
                    gw += tl.load(GW_ptr + w_rows + k, mask=mask_c, other=0.0)
                tl.store(GW_ptr + w_rows + k, gw, mask=mask_c)
                tl.atomic_add(GX_ptr + gx_rows + cols[None, :], dz * w[None, :], mask=mask, sem="relaxed")
    if HAS_BIAS:
        tl.store(GBias_ptr + offs_c, gbias, mask=mask_c)


def _launch_config(batch: int, group: int) -> dict[str, int | bool | str]:
    """Tile sizes: grouped kernel for power-of-two ``G >= 16`` (one group per program), else per-label."""
    dot = group >= 16 and group & (group - 1) == 0
    block_b = max(16, min(64, triton.next_power_of_2(batch)))
    return {"DOT": dot, "BLOCK_B": block_b, "BLOCK_C": group if dot else _BLOCK_C, "BLOCK_K": _BLOCK_K}


def _dot_mode(x: torch.Tensor) -> tuple[str, bool]:
    """tl.dot precision (fp32 inputs stay exact: no tf32) and whether to upcast under the CPU interpreter."""
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    return precision, os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None) -> None:
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
    # outputs a mode does not write are stand-ins pointing at a live tensor (Triton rejects null pointers)
    if code == 0:
        y = torch.empty(batch, classes, dtype=x.dtype, device=x.device)
        part_a = part_b = y
    else:
        part_a = torch.empty(programs, batch, dtype=torch.float32, device=x.device)
        part_b = torch.empty(programs, batch, dtype=torch.float32, device=x.device) if code == 3 else part_a
        y = part_a
    precision, upcast = _dot_mode(x)
    _fixed_fanin_fwd_kernel[(programs,)](
        x, weight, index, bias if bias is not None else weight, y, part_a, part_b,
        x.stride(0), x.stride(1), y.stride(0) if code == 0 else 0,
        batch, classes, fan_in,
        GROUP=group, LOSS=code, HAS_BIAS=bias is not None, PRECISION=precision, UPCAST=upcast, **config,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dx, dweight, dbias)`` in the inputs' dtypes.

    Args:
        grad: ``dL/dy (B, C)`` for ``loss="none"``, else ``dL/d row value (B,)``.
        lse: ``(B,)`` log-sum-exp from the forward pass, for ``softmax``.
    """
    _check(x, weight, index, bias)
    batch, (classes, fan_in) = x.shape[0], weight.shape
    config = _launch_config(batch, group)
    programs = triton.cdiv(classes, config["BLOCK_C"])
    code = LOSS_CODES[loss]
    grad = grad.contiguous() if code == 0 else grad.float().contiguous()
    grad_x = torch.zeros(batch, x.shape[1], dtype=torch.float32, device=x.device)
    grad_w = torch.empty(classes, fan_in, dtype=torch.float32, device=x.device)
    grad_b = torch.empty(classes, dtype=torch.float32, device=x.device) if bias is not None else None
    precision, upcast = _dot_mode(x)
    _fixed_fanin_bwd_kernel[(programs,)](
        x, weight, index, bias if bias is not None else weight,
        grad, lse if lse is not None else grad, grad, grad_x, grad_w,
        grad_b if grad_b is not None else grad_w,
        x.stride(0), x.stride(1), grad.stride(0) if code == 0 else 0, grad_x.stride(0),
        batch, classes, fan_in,
        GROUP=group, LOSS=code, HAS_BIAS=bias is not None, PRECISION=precision, UPCAST=upcast, **config,
    )  # fmt: skip
    grad_b = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b
