"""Triton kernels and their launchers for the fused linear + loss ops (imported only when a kernel runs).

Forward (``_linear_loss_fwd_kernel``): program ``(b, s)`` owns ``BLOCK_B`` rows and a contiguous split of
class blocks. Per class block it builds the logit tile ``z = x @ W_tile^T`` over ``BLOCK_D`` slices (fp32
weight tiles are loaded and cast to the input dtype in registers, fp32 accumulation: no low-precision copy of
``W`` exists) and folds it into a per-row statistic: the online logsumexp
``m' = max(m, max z); s' = s e^(m - m') + sum e^(z - m')`` (Milakov & Gimelshein, arXiv 1805.02867), or a
plain sum of ``softplus(z)`` / ``relu(1 + z)^2``. Each program writes ``(m, s)`` for its split; the
``B x splits`` partials are combined in PyTorch.

Backward: two kernels per super-chunk of classes (a power of two up to 2^18, so the scratch stays bounded).
``_linear_loss_bwd_dw_kernel`` (program ``(c, b)``) rebuilds a logit tile, reading its ``W`` tile once,
forms ``G = coef_b g'(z)`` (``g'`` = ``exp(z - lse_b)``, ``sigmoid(z)`` or ``2 relu(1 + z)``), writes
``dW_tile = G^T x`` straight into the fp32 gradient (plain stores when one row block covers ``B``) and stores
``G`` in the input dtype into a ``(B, chunk)`` scratch. ``_linear_loss_bwd_dx_kernel`` then computes
``dx += G_chunk @ W_chunk`` as a split-K matmul over ``(D blocks, splits)`` whose per-split partials are
summed in PyTorch: no atomics on ``dx`` (one fused kernel would need ``C / BLOCK_C x B x D`` of them), each
kernel reads ``W`` once. Offsets are int64: ``C x D`` may pass 2^31 elements.

Gradient in the forward pass (bce, squared hinge: ``G`` needs no row statistic, and the row weights of a
``mean`` or ``sum`` are known ahead): :func:`linear_loss_fwd_grads` runs the two backward kernels in the
forward pass, the ``dW`` kernel also reducing its logit tile into the per-row loss; the backward pass then
only scales the gradients by the incoming one, on the device (:func:`gated_scale_`, a no-op at 1). Forward and
backward together read ``W`` twice instead of three times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from megaclass.ops import autotune_enabled

LOSS_IDS = {"softmax": 0, "bce": 1, "squared_hinge": 2}


@triton.jit
def _dot(a, b, acc, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. UPCAST_DOT (the CPU interpreter, whose bf16 dot is wrong)
    multiplies the already-rounded operands in fp32: the same exact products, the same sums."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _round(value, dtype: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``value.to(dtype)`` rounded to nearest even, as the GPU converts. The CPU interpreter (UPCAST_DOT)
    truncates fp32 -> bf16, so there the fp32 bits are rounded first (finite values) and the cast is exact."""
    if UPCAST_DOT:
        if dtype == tl.bfloat16:
            if value.dtype == tl.float32:
                bits = value.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


@triton.jit
def _logit_tile(
    X_ptr,
    W_ptr,
    BIAS_ptr,
    offs_b,
    offs_c,
    mask_b,
    mask_c,
    stride_xb,
    stride_xd,
    stride_wc,
    stride_wd,
    D,
    scale,
    HAS_BIAS: tl.constexpr,
    COSINE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """fp32 logits ``(BLOCK_B, BLOCK_C)`` and, with COSINE, the class rows' norms ``(BLOCK_C,)``."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    square_norms = tl.zeros((BLOCK_C,), dtype=tl.float32)
    x_rows = X_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
    w_rows = W_ptr + offs_c.to(tl.int64)[:, None] * stride_wc
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        if COSINE:
            w32 = w.to(tl.float32)
            square_norms += tl.sum(w32 * w32, axis=1)
        acc = _dot(x, tl.trans(_round(w, x.dtype, UPCAST_DOT)), acc, UPCAST_DOT, INPUT_PRECISION)
    norms = tl.maximum(tl.sqrt(square_norms), 1e-12)
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if COSINE:
        acc = acc * (scale / norms)[None, :]  # z = s * cos = s * (x_n . w) / |w|
    return acc, norms


@triton.jit
def _linear_loss_fwd_kernel(
    X_ptr,
    W_ptr,
    BIAS_ptr,
    EXCLUDE_ptr,
    MAX_ptr,
    SUM_ptr,
    stride_xb,
    stride_xd,
    stride_wc,
    stride_wd,
    stride_pb,
    B,
    C,
    D,
    num_splits,
    scale,
    LOSS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COSINE: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    exclude = tl.full((BLOCK_B,), -1, dtype=tl.int64)
    if HAS_EXCLUDE:
        exclude = tl.load(EXCLUDE_ptr + offs_b, mask=mask_b, other=-1).to(tl.int64)
    running_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    per_split = tl.cdiv(
        tl.cdiv(C, BLOCK_C), num_splits
    )  # class blocks per split; the last splits may be empty
    first = pid_s * per_split
    last = tl.minimum(first + per_split, tl.cdiv(C, BLOCK_C))
    for block in range(first, last):
        offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        z, norms = _logit_tile(
            X_ptr, W_ptr, BIAS_ptr, offs_b, offs_c, mask_b, mask_c,
            stride_xb, stride_xd, stride_wc, stride_wd, D, scale,
            HAS_BIAS, COSINE, BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION, UPCAST_DOT,
        )  # fmt: skip
        valid = mask_b[:, None] & mask_c[None, :] & (offs_c.to(tl.int64)[None, :] != exclude[:, None])
        if LOSS == 0:
            # online logsumexp: rescale the running sum to the new running max (arXiv 1805.02867)
            z = tl.where(valid, z, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(
                tl.exp(z - safe_max[:, None]), axis=1
            )
            running_max = new_max
        elif LOSS == 1:
            softplus = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
            running_sum += tl.sum(tl.where(valid, softplus, 0.0), axis=1)
        else:
            hinge = tl.maximum(1.0 + z, 0.0)
            running_sum += tl.sum(tl.where(valid, hinge * hinge, 0.0), axis=1)
    partial = offs_b.to(tl.int64) * stride_pb + pid_s
    tl.store(MAX_ptr + partial, running_max, mask=mask_b)
    tl.store(SUM_ptr + partial, running_sum, mask=mask_b)


@triton.jit
def _linear_loss_bwd_dw_kernel(
    X_ptr,
    W_ptr,
    BIAS_ptr,
    EXCLUDE_ptr,
    LSE_ptr,
    COEF_ptr,
    DW_ptr,
    DBIAS_ptr,
    G_ptr,
    RED_ptr,
    stride_xb,
    stride_xd,
    stride_wc,
    stride_wd,
    stride_dwc,
    stride_gb,
    stride_rb,
    B,
    D,
    chunk_start,
    chunk_stop,
    tile_base,
    scale,
    LOSS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COSINE: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    ATOMIC_DW: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Program ``(c, b)``: one class tile of the super-chunk ``[chunk_start, chunk_stop)``, one row block.

    Rebuilds the logit tile (the only read of ``W`` outside COSINE), forms ``G = coef_b g'(z)``, writes
    ``dW_tile = G^T x`` (and ``dbias``) and stores ``G`` in the input dtype into the ``(B, chunk)`` scratch
    that :func:`_linear_loss_bwd_dx_kernel` multiplies by ``W``. REDUCE (bce, squared hinge: the gradient in
    the forward pass) also writes the tile's per-row loss sum, ``sum softplus(z)`` or ``sum relu(1 + z)^2``,
    to column ``tile_base + c`` of the ``(B, tiles)`` partials: the forward kernel's reduction, from the same
    logit tile."""
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    local_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # class offsets inside the super-chunk
    offs_c = chunk_start + local_c
    mask_b = offs_b < B
    mask_c = offs_c < chunk_stop
    z, norms = _logit_tile(
        X_ptr, W_ptr, BIAS_ptr, offs_b, offs_c, mask_b, mask_c,
        stride_xb, stride_xd, stride_wc, stride_wd, D, scale,
        HAS_BIAS, COSINE, BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION, UPCAST_DOT,
    )  # fmt: skip
    valid = mask_b[:, None] & mask_c[None, :]
    if HAS_EXCLUDE:
        exclude = tl.load(EXCLUDE_ptr + offs_b, mask=mask_b, other=-1).to(tl.int64)
        valid = valid & (offs_c.to(tl.int64)[None, :] != exclude[:, None])
    if REDUCE:
        if LOSS == 1:
            term = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))  # softplus, stable for any z
        else:
            term = tl.maximum(1.0 + z, 0.0) * tl.maximum(1.0 + z, 0.0)
        partial = offs_b.to(tl.int64) * stride_rb + tile_base + pid_c
        tl.store(RED_ptr + partial, tl.sum(tl.where(valid, term, 0.0), axis=1), mask=mask_b)
    coef = tl.load(COEF_ptr + offs_b, mask=mask_b, other=0.0)
    if LOSS == 0:
        lse = tl.load(LSE_ptr + offs_b, mask=mask_b, other=0.0)
        slope = tl.exp(z - lse[:, None])
    elif LOSS == 1:
        slope = tl.sigmoid(z)
    else:
        slope = 2.0 * tl.maximum(1.0 + z, 0.0)
    g = tl.where(valid, slope * coef[:, None], 0.0)  # (BLOCK_B, BLOCK_C) d loss / d z
    if HAS_BIAS:
        if ATOMIC_DW:
            tl.atomic_add(DBIAS_ptr + offs_c, tl.sum(g, axis=0), mask=mask_c)
        else:
            tl.store(DBIAS_ptr + offs_c, tl.sum(g, axis=0), mask=mask_c)
    radial = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if COSINE:
        # z = s u / n, u = x_n . w: dz/du = s / n and dz/dw = (s / n)(x_n - (cos / n) w)
        g = g * (scale / norms)[None, :]
        radial = tl.sum(g * (z / scale), axis=0) / norms
    g_low = _round(g, G_ptr.dtype.element_ty, UPCAST_DOT)
    g_rows = G_ptr + offs_b.to(tl.int64)[:, None] * stride_gb
    tl.store(g_rows + local_c[None, :], g_low, mask=mask_b[:, None] & mask_c[None, :])
    x_rows = X_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
    w_rows = W_ptr + offs_c.to(tl.int64)[:, None] * stride_wc
    dw_rows = DW_ptr + offs_c.to(tl.int64)[:, None] * stride_dwc
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w_mask = mask_c[:, None] & mask_d[None, :]
        x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        grad_w = _dot(
            tl.trans(g_low), x, tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32), UPCAST_DOT, INPUT_PRECISION
        )  # (BLOCK_C, BLOCK_D) G^T x
        if COSINE:
            w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=w_mask, other=0.0)
            grad_w -= radial[:, None] * w.to(tl.float32)
        if ATOMIC_DW:
            tl.atomic_add(dw_rows + offs_d[None, :], grad_w, mask=w_mask)
        else:
            tl.store(dw_rows + offs_d[None, :], grad_w, mask=w_mask)


@triton.jit
def _linear_loss_bwd_dx_kernel(
    G_ptr,
    W_ptr,
    PARTIAL_ptr,
    stride_gb,
    stride_wc,
    stride_wd,
    stride_ps,
    stride_pb,
    B,
    D,
    chunk_start,
    chunk_len,
    per_split,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Split-K ``G_chunk @ W_chunk``: program ``(d, s, b)`` sums classes ``[s per_split, (s + 1) per_split)``
    of the super-chunk for one ``(BLOCK_B, BLOCK_D)`` tile and writes it to ``partial[s]`` (no atomics;
    the launcher adds the splits). fp32 ``W`` tiles are cast to ``G``'s dtype in registers."""
    pid_d = tl.program_id(0)  # fastest: programs sharing a split run together and share G's tiles in L2
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_d = offs_d < D
    first = pid_s * per_split
    last = tl.minimum(first + per_split, chunk_len)
    g_rows = G_ptr + offs_b.to(tl.int64)[:, None] * stride_gb
    w_columns = W_ptr + offs_d.to(tl.int64)[None, :] * stride_wd
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for k_start in range(first, last, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < last
        g = tl.load(g_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        w_rows = (chunk_start + offs_k).to(tl.int64)[:, None] * stride_wc
        w = tl.load(w_columns + w_rows, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        w = _round(w, g.dtype, UPCAST_DOT)  # (BLOCK_K, BLOCK_D) in G's dtype, cast in registers
        acc = _dot(g, w, acc, UPCAST_DOT, INPUT_PRECISION)  # (BLOCK_B, BLOCK_D) += G W
    out = (
        PARTIAL_ptr
        + pid_s.to(tl.int64) * stride_ps
        + offs_b.to(tl.int64)[:, None] * stride_pb
        + offs_d[None, :]
    )
    tl.store(out, acc, mask=mask_b[:, None] & mask_d[None, :])


@triton.jit
def _gated_scale_kernel(VALUES_ptr, FACTOR_ptr, N, BLOCK: tl.constexpr):
    """``values *= factor[0]`` unless ``factor[0] == 1``: then the program returns before touching memory."""
    factor = tl.load(FACTOR_ptr)
    if factor != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        tl.store(VALUES_ptr + offs, tl.load(VALUES_ptr + offs, mask=mask) * factor, mask=mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one kernel launch (``BLOCK_B`` follows the batch size)."""

    block_c: int
    block_d: int
    num_warps: int
    num_stages: int


# The first candidate is the default; MEGACLASS_AUTOTUNE=1 times them all once per shape on the real args.
FWD_CANDIDATES = (
    LaunchConfig(block_c=128, block_d=64, num_warps=8, num_stages=3),
    LaunchConfig(block_c=64, block_d=64, num_warps=4, num_stages=3),
    LaunchConfig(block_c=128, block_d=128, num_warps=8, num_stages=2),
    LaunchConfig(block_c=256, block_d=64, num_warps=8, num_stages=2),
)
# Weight gradient: 64-class tiles on 4 warps where one row block covers the batch (B <= 128, the batches
# impl=auto gives Triton); several row blocks add into each tile atomically and take 128-class tiles (H100,
# C 670,091, D 768: 64 over 128 is 13-20% faster for BCE at B 128 and 28% slower for the softmax at B 512).
DW_MANY_ROW_BLOCKS = LaunchConfig(block_c=128, block_d=64, num_warps=8, num_stages=2)
DW_CANDIDATES = (
    LaunchConfig(block_c=64, block_d=64, num_warps=4, num_stages=3),
    DW_MANY_ROW_BLOCKS,
    LaunchConfig(block_c=128, block_d=128, num_warps=8, num_stages=2),
    LaunchConfig(block_c=64, block_d=128, num_warps=4, num_stages=2),
)
# For the split-K ``dx`` kernel ``block_c`` is BLOCK_K, the classes summed per step.
DX_CANDIDATES = (
    LaunchConfig(block_c=64, block_d=128, num_warps=8, num_stages=3),
    LaunchConfig(block_c=32, block_d=128, num_warps=4, num_stages=4),
    LaunchConfig(block_c=64, block_d=64, num_warps=4, num_stages=4),
    LaunchConfig(block_c=128, block_d=128, num_warps=8, num_stages=2),
)
SCALE_BLOCK = 4096  # elements per program of the gated scaling
SCRATCH_BYTES = 2**26  # G scratch of one super-chunk, (B, chunk) in the input dtype: 64 MiB at most
MIN_CHUNK, MAX_CHUNK = 2**12, 2**18  # super-chunk classes: enough work per launch, bounded memory
INTERPRETER_CONFIG = LaunchConfig(block_c=16, block_d=16, num_warps=1, num_stages=1)  # CPU: small and quick
_TUNED: dict[tuple, LaunchConfig] = {}


def _block_b(x: Tensor) -> int:
    return min(128, max(16, triton.next_power_of_2(x.shape[0]))) if x.is_cuda else 16


def _input_precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # the default; only fp32 operands are affected


def _choose(
    key: tuple,
    x: Tensor,
    candidates: tuple[LaunchConfig, ...],
    launch: Callable[[LaunchConfig], None],
    reset: Callable[[], None],
    default: LaunchConfig | None = None,
) -> LaunchConfig:
    """The launch config: the interpreter's on CPU, the default (``default``, else the first candidate), or
    (autotune on) the fastest candidate."""
    if not x.is_cuda:
        return INTERPRETER_CONFIG
    if not autotune_enabled():
        return default or candidates[0]
    if key not in _TUNED:
        timings = {}
        for config in candidates:
            try:
                reset()
                launch(config)  # compile and warm up
            except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
                continue  # a candidate this card or compiler cannot run is skipped, not fatal
            samples = []
            for _ in range(3):
                reset()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(config)
                end.record()
                end.synchronize()  # deliberate sync: tuning runs once per shape
                samples.append(start.elapsed_time(end))
            timings[config] = sorted(samples)[1]
        _TUNED[key] = min(timings, key=timings.get)
        reset()
    return _TUNED[key]


def linear_loss_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, exclude: Tensor | None, *, loss: str, scale: float
) -> tuple[Tensor, Tensor]:
    """Per-split partials ``(max, sum)``, each ``(B, splits)`` float32 (``max`` is -inf unless softmax).

    Args:
        x: ``(B, D)`` inputs in the compute dtype (fp32, bf16 or fp16).
        weight: ``(C, D)`` any float dtype; tiles are cast to ``x.dtype`` in registers.
        bias: ``(C,)`` or None. exclude: ``(B,)`` int64 class left out per row, or None.
        scale: with ``scale > 0`` logits are ``scale * cos``: ``x`` must be L2-normalised rows.
    """
    batch, dim = x.shape
    classes = weight.shape[0]
    block_b = _block_b(x)
    row_blocks = triton.cdiv(batch, block_b)
    programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    splits = max(1, min(programs // row_blocks, triton.cdiv(classes, 16)))
    maxima = torch.full((batch, splits), -torch.inf, dtype=torch.float32, device=x.device)
    sums = torch.zeros(batch, splits, dtype=torch.float32, device=x.device)
    if batch == 0:
        return maxima, sums

    def launch(config: LaunchConfig) -> None:
        _linear_loss_fwd_kernel[(row_blocks, splits)](
            x, weight, bias, exclude, maxima, sums,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), sums.stride(0),
            batch, classes, dim, splits, scale,
            LOSS=LOSS_IDS[loss], HAS_BIAS=bias is not None, COSINE=scale > 0, HAS_EXCLUDE=exclude is not None,
            BLOCK_B=block_b, BLOCK_C=config.block_c, BLOCK_D=config.block_d,
            INPUT_PRECISION=_input_precision(x), UPCAST_DOT=not x.is_cuda,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip

    key = ("fwd", batch, classes, dim, x.dtype, weight.dtype, loss, scale > 0, bias is not None)
    launch(_choose(key, x, FWD_CANDIDATES, launch, reset=lambda: None))  # every split rewrites its partials
    return maxima, sums


def chunk_classes_for(batch: int, itemsize: int) -> int:
    """Classes per backward super-chunk: a power of two in ``[MIN_CHUNK, MAX_CHUNK]`` whose ``(B, chunk)``
    scratch fits :data:`SCRATCH_BYTES` (2^18 at ``B = 128`` in bf16)."""
    fits = SCRATCH_BYTES // max(1, batch * itemsize)
    return max(MIN_CHUNK, min(MAX_CHUNK, 1 << max(0, fits.bit_length() - 1)))


def linear_loss_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    exclude: Tensor | None,
    lse: Tensor,
    coef: Tensor,
    *,
    loss: str,
    scale: float,
    chunk_classes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """fp32 ``(dx (B, D), dW (C, D), dbias (C,) or None)`` of the dense part, super-chunk by super-chunk.

    Per super-chunk of classes, :func:`_linear_loss_bwd_dw_kernel` writes ``dW`` (and ``dbias``) and the
    chunk's ``G`` into a ``(B, chunk)`` scratch, then :func:`_linear_loss_bwd_dx_kernel` adds ``G @ W_chunk``
    as a split-K matmul into ``(splits, B, D)`` partials that are summed into ``dx``.

    Args:
        lse: ``(B,)`` float32 logsumexp per row (read for softmax only). coef: ``(B,)`` float32 row weights,
            already multiplied by the incoming gradient.
        chunk_classes: classes per super-chunk; None picks :func:`chunk_classes_for`.
    """
    grad_x, grad_weight, grad_bias, _ = _dense_grads(
        x, weight, bias, exclude, lse, coef, loss=loss, scale=scale, chunk_classes=chunk_classes, reduce=False
    )
    return grad_x, grad_weight, grad_bias


def linear_loss_fwd_grads(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    coef: Tensor,
    *,
    loss: str,
    chunk_classes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """bce / squared hinge in one pass over ``W``: ``(reduced (B,), dx, dW, dbias or None)``, all float32.

    These losses' ``d loss / d z = coef_b g'(z)`` needs no statistic of the whole row (softmax needs its lse),
    so the forward pass computes the dense part's gradients at the row weights ``coef`` while it reduces:
    the kernels of :func:`linear_loss_bwd`, the logit tile of ``dW`` also giving its per-row loss sums. The
    ``W`` reads of a forward and a backward pass become one (see ``benchmarks/heads.py`` for the floor).
    """
    if loss not in ("bce", "squared_hinge"):
        raise ValueError(f"loss: the gradient in the forward pass needs bce or squared_hinge, got {loss!r}")
    grad_x, grad_weight, grad_bias, reduced = _dense_grads(
        x, weight, bias, None, coef, coef, loss=loss, scale=0.0, chunk_classes=chunk_classes, reduce=True
    )
    return reduced, grad_x, grad_weight, grad_bias


def _dense_grads(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    exclude: Tensor | None,
    lse: Tensor,
    coef: Tensor,
    *,
    loss: str,
    scale: float,
    chunk_classes: int | None,
    reduce: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`linear_loss_bwd`'s gradients and, with ``reduce``, the ``(B,)`` per-row loss sums."""
    batch, dim = x.shape
    classes = weight.shape[0]
    block_b = _block_b(x)
    row_blocks = triton.cdiv(batch, block_b)
    atomic_dw = row_blocks > 1  # several row blocks add into one class block's gradient
    make = torch.zeros if atomic_dw or batch == 0 else torch.empty
    grad_weight = make(classes, dim, dtype=torch.float32, device=x.device)
    grad_bias = None if bias is None else make(classes, dtype=torch.float32, device=x.device)
    grad_x = torch.zeros(batch, dim, dtype=torch.float32, device=x.device)
    chunk = chunk_classes or chunk_classes_for(batch, x.element_size())
    if chunk < 1:
        raise ValueError(f"chunk_classes must be >= 1, got {chunk}")
    # (B, tiles) per-tile loss sums: a column per class tile of every super-chunk, at the smallest tile that
    # _choose may pick on this device
    min_block_c = min(config.block_c for config in (DW_CANDIDATES if x.is_cuda else (INTERPRETER_CONFIG,)))
    tiles = (classes // chunk) * triton.cdiv(chunk, min_block_c) + triton.cdiv(classes % chunk, min_block_c)
    partials = torch.zeros(batch, tiles if reduce else 0, device=x.device)
    if batch == 0:
        return grad_x, grad_weight, grad_bias, partials.sum(dim=1) if reduce else None
    scratch = torch.empty(batch, min(chunk, classes), dtype=x.dtype, device=x.device)  # (B, chunk) G
    flags = {
        "LOSS": LOSS_IDS[loss],
        "HAS_BIAS": bias is not None,
        "COSINE": scale > 0,
        "HAS_EXCLUDE": exclude is not None,
        "ATOMIC_DW": atomic_dw,
        "REDUCE": reduce,
    }
    dw_key = ("bwd_dw", batch, classes, dim, x.dtype, weight.dtype, loss, scale > 0, bias is not None, reduce)
    dx_key = ("bwd_dx", batch, min(chunk, classes), dim, x.dtype, weight.dtype)
    for start in range(0, classes, chunk):
        stop = min(start + chunk, classes)

        def launch_dw(config: LaunchConfig, start: int = start, stop: int = stop) -> None:
            tile_base = (start // chunk) * triton.cdiv(chunk, config.block_c)  # tiles of the chunks before
            _linear_loss_bwd_dw_kernel[(triton.cdiv(stop - start, config.block_c), row_blocks)](
                x, weight, bias, exclude, lse, coef, grad_weight, grad_bias, scratch, partials,
                x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                grad_weight.stride(0), scratch.stride(0), partials.stride(0),
                batch, dim, start, stop, tile_base, scale,
                **flags, BLOCK_B=block_b, BLOCK_C=config.block_c, BLOCK_D=config.block_d,
                INPUT_PRECISION=_input_precision(x), UPCAST_DOT=not x.is_cuda,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip

        def reset_dw() -> None:
            partials.zero_()  # a config with larger tiles writes fewer columns
            if atomic_dw:
                grad_weight.zero_()
                if grad_bias is not None:
                    grad_bias.zero_()

        default = DW_MANY_ROW_BLOCKS if atomic_dw else None
        launch_dw(_choose(dw_key, x, DW_CANDIDATES, launch_dw, reset_dw, default))
        grad_x += _chunk_grad_x(scratch[:, : stop - start], weight, start, block_b, dx_key)
    return grad_x, grad_weight, grad_bias, partials.sum(dim=1) if reduce else None


def gated_scale_(values: Tensor, factor: Tensor) -> None:
    """``values *= factor`` in place, skipped on the device when ``factor == 1`` (no host sync: the decision
    is the kernel's, so a CUDA graph captures it). ``values`` contiguous float32, ``factor`` a 1-element
    float32 tensor."""
    if values.numel() == 0:
        return
    grid = (triton.cdiv(values.numel(), SCALE_BLOCK),)
    _gated_scale_kernel[grid](values, factor, values.numel(), BLOCK=SCALE_BLOCK)


def _chunk_grad_x(g: Tensor, weight: Tensor, start: int, block_b: int, key: tuple) -> Tensor:
    """``(B, D)`` float32 ``g (B, c) @ weight[start : start + c]`` by the split-K kernel."""
    batch, chunk_len = g.shape
    dim = weight.shape[1]
    row_blocks = triton.cdiv(batch, block_b)
    programs = 2 * torch.cuda.get_device_properties(g.device).multi_processor_count if g.is_cuda else 4
    state: dict[str, Tensor] = {}

    def launch(config: LaunchConfig) -> None:
        d_blocks = triton.cdiv(dim, config.block_d)
        wanted = max(1, min(programs // (d_blocks * row_blocks), triton.cdiv(chunk_len, config.block_c)))
        per_split = triton.cdiv(triton.cdiv(chunk_len, wanted), config.block_c) * config.block_c
        splits = triton.cdiv(chunk_len, per_split)
        partials = torch.empty(splits, batch, dim, dtype=torch.float32, device=g.device)  # (S, B, D)
        _linear_loss_bwd_dx_kernel[(d_blocks, splits, row_blocks)](
            g, weight, partials,
            g.stride(0), weight.stride(0), weight.stride(1), partials.stride(0), partials.stride(1),
            batch, dim, start, chunk_len, per_split,
            BLOCK_B=block_b, BLOCK_K=config.block_c, BLOCK_D=config.block_d,
            INPUT_PRECISION=_input_precision(g), UPCAST_DOT=not g.is_cuda,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        state["partials"] = partials

    launch(_choose(key, g, DX_CANDIDATES, launch, reset=lambda: None))  # every split rewrites its partial
    return state["partials"].sum(dim=0)  # (B, D)
