"""Stochastic rounding fp32 -> bf16, seeded and reproducible.

bf16 keeps the top 16 bits of an fp32 number. Round-to-nearest drops an update smaller than half a bf16 ulp
every time; stochastic rounding (SR) rounds up with probability equal to the dropped fraction, so
``E[sr(x)] == x`` and many small updates accumulate in expectation (Gupta et al. 2015, arXiv 1502.02551; ELMO,
ICML 2025, keeps extreme-classification heads in bf16 this way).

Bit recipe: with ``u = bits(x)`` (uint32) and ``r`` uniform in ``[0, 2^16)``,
``sr(x) = (u + r) & 0xFFFF0000``.
Adding ``r`` carries into bit 16 with probability ``(u & 0xFFFF) / 2^16``; fp32's sign-magnitude layout makes
this the same in magnitude for negative numbers, and infinities stay infinite. NaN stays a (quiet) NaN.

Random bits come from Philox-4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"),
keyed by a 64-bit ``seed``; element ``e`` uses 16 bits of the block of counter ``e // 8``, so the result
depends
only on ``(seed, e, x[e])``: the Triton kernel and :func:`reference_stochastic_round` agree bit for bit.
On the CPU :func:`stochastic_round` computes the same bits with numpy's unsigned 32- and 64-bit integers, in
cache-sized pieces over torch's threads (3.6 to 19 times the plain reference's speed: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from megaclass.ops import Impl, resolve_impl, run_split

__all__ = [
    "AdamWStep",
    "philox_seed",
    "reference_sr_adamw_",
    "reference_stochastic_round",
    "sr_adamw_",
    "sr_adamw_fwd",
    "stochastic_round",
    "stochastic_round_fwd",
]

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
_LANES = 8  # elements served by one Philox call: 4 words x 2 halves of 16 bits
_CPU_PIECE_GROUPS = 1 << 14  # Philox calls of one piece of the CPU path (128K elements: in cache)


def philox_seed(*parts: int) -> int:
    """Mix integers (a base seed, a step, a tensor id, ...) into one 64-bit seed (splitmix64 chain)."""
    state = 0x243F6A8885A308D3
    for part in parts:
        state = (state ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state


# ----------------------------------------------------------------------------------------------------------
# Triton kernel (imported lazily)
# ----------------------------------------------------------------------------------------------------------

_KERNELS: dict[str, object] = {}


def _kernels() -> dict[str, object]:
    """Compile-on-first-use kernels; triton is imported here, never at ``import megaclass``."""
    global _philox_noise, _round_bits, _group_tile  # jit helpers: resolved by name from module globals
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _philox_noise(groups, seed_lo, seed_hi):
        # (BLOCK_G, 8) uint32 values in [0, 2^16): lane j of group g takes half j % 2 (low first) of word
        # j // 2
        # of Philox-4x32-10 at counter (g lo, g hi, 0, 0) and key (seed lo, seed hi). Each round:
        # (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)), then the key is
        # bumped by the Weyl constants; all arithmetic mod 2^32.
        zero = (groups * 0).to(tl.uint32)
        c0 = (groups & 0xFFFFFFFF).to(tl.uint32)
        c1 = (groups >> 32).to(tl.uint32)
        k0 = zero + seed_lo.to(tl.uint32)
        k1 = zero + seed_hi.to(tl.uint32)
        c2 = zero
        c3 = zero
        for _ in tl.static_range(10):
            a0 = c0
            a2 = c2
            c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
            c1 = a2 * 0xCD9E8D57
            c3 = a0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        lanes = tl.arange(0, 8)[None, :]  # (1, 8)
        word_id = lanes // 2
        word = tl.where(
            word_id == 0,
            c0[:, None],
            tl.where(word_id == 1, c1[:, None], tl.where(word_id == 2, c2[:, None], c3[:, None])),
        )  # (BLOCK_G, 8)
        shift = ((lanes % 2) * 16).to(tl.uint32)
        return (word >> shift) & 0xFFFF

    @triton.jit
    def _round_bits(x, noise):
        # bf16 bits (as int16) of fp32 x rounded with the 16 noise bits: the top half of bits(x) + noise. No
        # float conversion (which could flush subnormals). NaN keeps its sign and top mantissa bits plus the
        # quiet bit (a carry could otherwise turn its payload into an infinity or -0).
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + noise) >> 16
        y = tl.where(x != x, (bits >> 16) | 0x0040, rounded)
        return y.to(tl.uint16).to(tl.int16, bitcast=True)

    @triton.jit
    def _group_tile(n_elements, BLOCK_G: tl.constexpr):
        # This program's BLOCK_G * 8 elements as a (BLOCK_G, 8) tile: row g of the tile shares one Philox call
        # whose four 32-bit words give 8 x 16 random bits. int64 offsets: > 2^31 elements happen.
        pid = tl.program_id(0).to(tl.int64)
        groups = pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)  # (BLOCK_G,)
        offsets = groups[:, None] * 8 + tl.arange(0, 8)[None, :]  # (BLOCK_G, 8)
        return groups, offsets, offsets < n_elements

    # Triton specialises an integer argument equal to 1 into a constexpr, on which ``.to(tl.uint32)`` fails to
    # compile: the seed words (any value in [0, 2^32)) are never specialised.
    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _stochastic_round_fwd_kernel(
        X_ptr,
        Y_ptr,
        seed_lo,
        seed_hi,
        n_elements,
        BLOCK_G: tl.constexpr,
    ):
        groups, offsets, mask = _group_tile(n_elements, BLOCK_G)  # (BLOCK_G,), (BLOCK_G, 8), (BLOCK_G, 8)
        x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = _round_bits(x, _philox_noise(groups, seed_lo, seed_hi))
        tl.store(Y_ptr + offsets, y, mask=mask)

    @triton.jit(
        do_not_specialize=["seed_w_lo", "seed_w_hi", "seed_m_lo", "seed_m_hi", "seed_v_lo", "seed_v_hi"]
    )
    def _sr_adamw_kernel(
        W_ptr,
        G_ptr,
        M_ptr,
        V_ptr,
        W_bits_ptr,
        M_bits_ptr,
        V_bits_ptr,
        n_elements,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        decay_factor,
        bias_correction2,
        eps,
        step_size,
        seed_w_lo,
        seed_w_hi,
        seed_m_lo,
        seed_m_hi,
        seed_v_lo,
        seed_v_hi,
        HAS_DECAY: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        # One AdamW step on bf16 weights W and moments M, V in place (Loshchilov & Hutter 2019), fp32 in
        # registers, each result stochastically rounded back with its own stream; G is the gradient (any
        # float dtype). The operation order is that of adamw_math in megaclass.train.low_precision:
        #   m = m * b1 + (1 - b1) g;  v = v * b2 + ((1 - b2) g) g;  w = w * (1 - lr wd)
        #   w = w + step_size * (m / (sqrt(v / bc2) + eps)),  step_size = -lr / bc1
        groups, offsets, mask = _group_tile(n_elements, BLOCK_G)  # (BLOCK_G,), (BLOCK_G, 8), (BLOCK_G, 8)
        w = tl.load(W_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(M_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m = m * beta1 + one_minus_beta1 * g
        v = v * beta2 + (one_minus_beta2 * g) * g
        if HAS_DECAY:
            w = w * decay_factor
        denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps
        w = w + step_size * tl.div_rn(m, denom)
        # the *_bits pointers are int16 views of W, M, V: the rounded bf16 bits are stored without conversion
        tl.store(W_bits_ptr + offsets, _round_bits(w, _philox_noise(groups, seed_w_lo, seed_w_hi)), mask=mask)
        tl.store(M_bits_ptr + offsets, _round_bits(m, _philox_noise(groups, seed_m_lo, seed_m_hi)), mask=mask)
        tl.store(V_bits_ptr + offsets, _round_bits(v, _philox_noise(groups, seed_v_lo, seed_v_hi)), mask=mask)

    _KERNELS["fwd"] = _stochastic_round_fwd_kernel
    _KERNELS["adamw"] = _sr_adamw_kernel
    return _KERNELS


def _check(x: Tensor, seed: int, out: Tensor | None) -> None:
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round: x must be float32, got {x.dtype}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"stochastic_round: seed must be in [0, 2^64), got {seed}")
    if out is not None:
        if out.dtype != torch.bfloat16 or out.shape != x.shape or out.device != x.device:
            raise ValueError(
                f"stochastic_round: out must be a bfloat16 tensor of shape {tuple(x.shape)} on {x.device}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError("stochastic_round: out must be contiguous")


def stochastic_round_fwd(x: Tensor, *, seed: int, out: Tensor | None = None, block_g: int = 128) -> Tensor:
    """Launch the Triton kernel: float32 ``x`` (any shape) -> bfloat16, stochastically rounded."""
    _check(x, seed, out)
    import triton

    kernel = _kernels()["fwd"]
    x_flat = x.contiguous().reshape(-1)  # (N,)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device) if out is None else out
    n = x_flat.numel()
    if n == 0:
        return y
    seed = int(seed)
    grid = (triton.cdiv(n, block_g * _LANES),)
    kernel[grid](x_flat, y.view(torch.int16).reshape(-1), seed & _MASK32, seed >> 32, n, BLOCK_G=block_g)
    return y


# ----------------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (the executable spec; int64 arithmetic emulates uint32)
# ----------------------------------------------------------------------------------------------------------


def _mul32(a: Tensor, constant: int) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` 32-bit halves of ``a * constant`` for uint32 values held in int64 (no int64 overflow)."""
    hi_part = (a >> 16) * constant  # < 2^48
    lo_part = (a & 0xFFFF) * constant  # < 2^48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return hi & _MASK32, lo


def _philox_reference(counter: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 of counters ``(counter lo, counter hi, 0, 0)`` with key ``seed``; four uint32 words."""
    c0 = counter & _MASK32
    c1 = counter >> 32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def reference_stochastic_round(x: Tensor, *, seed: int, out: Tensor | None = None) -> Tensor:
    """Plain-PyTorch stochastic rounding, bit-identical to the Triton kernel for the same ``seed``."""
    _check(x, seed, out)
    seed = int(seed)
    flat = x.contiguous().reshape(-1)  # (N,)
    n = flat.numel()
    groups = torch.arange((n + _LANES - 1) // _LANES, dtype=torch.int64, device=x.device)  # (G,)
    words = torch.stack(_philox_reference(groups, seed), dim=1)  # (G, 4)
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=2).reshape(-1)[
        :n
    ]  # (N,) lane j: word j//2, half j%2
    bits = flat.view(torch.int32).to(torch.int64) & _MASK32  # (N,) uint32 in int64
    rounded = ((bits + halves) >> 16) & 0xFFFF
    quiet_nan = (bits >> 16) | 0x0040
    top = torch.where(torch.isnan(flat), quiet_nan, rounded)  # (N,) bf16 bits in [0, 2^16)
    y = (top - ((top >> 15) << 16)).to(torch.int16).view(torch.bfloat16).reshape(x.shape)  # two's complement
    if out is not None:
        out.copy_(y)
        return out
    return y


# ----------------------------------------------------------------------------------------------------------
# The CPU path: the reference's bits with numpy's unsigned integers
# ----------------------------------------------------------------------------------------------------------


def _philox_words(first: int, count: int, seed: int) -> np.ndarray:
    """``(count, 4)`` uint32 words of Philox-4x32-10 at counters ``first .. first + count - 1``, as
    :func:`_philox_reference` gives them (a 32 x 32 -> 64-bit product holds both halves in uint64)."""
    counter = np.arange(first, first + count, dtype=np.uint64)
    c0, c1 = counter & np.uint64(_MASK32), counter >> np.uint64(32)
    c2, c3 = np.zeros_like(counter), np.zeros_like(counter)
    product_a, product_b = np.empty_like(counter), np.empty_like(counter)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(_PHILOX_ROUNDS):
        np.multiply(c0, np.uint64(_PHILOX_ROUND_A), out=product_a)
        np.multiply(c2, np.uint64(_PHILOX_ROUND_B), out=product_b)
        np.right_shift(product_b, np.uint64(32), out=c0)  # c0 <- hi(B c2) ^ c1 ^ k0
        c0 ^= c1
        c0 ^= np.uint64(k0)
        np.right_shift(product_a, np.uint64(32), out=c2)  # c2 <- hi(A c0) ^ c3 ^ k1
        c2 ^= c3
        c2 ^= np.uint64(k1)
        np.bitwise_and(product_b, np.uint64(_MASK32), out=c1)  # c1 <- lo(B c2)
        np.bitwise_and(product_a, np.uint64(_MASK32), out=c3)  # c3 <- lo(A c0)
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def _round_piece(bits: np.ndarray, out: np.ndarray, first_group: int, seed: int) -> None:
    """bf16 bits of the uint32 float bits ``bits``, whose first element is element ``8 * first_group``,
    into uint16 ``out``."""
    groups = -(-len(bits) // _LANES)
    # lane j of a call takes half j % 2 (low first) of word j // 2: the words' little-endian uint16 halves
    noise = _philox_words(first_group, groups, seed).view(np.uint16).reshape(-1)[: len(bits)]
    rounded = bits + noise  # uint32; wraps only for NaN bit patterns, replaced below
    rounded >>= np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = (bits[nan] >> np.uint32(16)) | np.uint32(0x0040)
    out[:] = rounded


def _cpu_stochastic_round(x: Tensor, *, seed: int, out: Tensor | None = None) -> Tensor:
    """:func:`reference_stochastic_round`'s bits for a CPU ``x``, computed with numpy over torch's threads."""
    _check(x, seed, out)
    seed = int(seed)
    bits = x.detach().contiguous().reshape(-1).numpy().view(np.uint32)  # (N,)
    y = torch.empty(x.shape, dtype=torch.bfloat16) if out is None else out
    target = y.view(torch.int16).reshape(-1).numpy().view(np.uint16)
    piece = _CPU_PIECE_GROUPS * _LANES
    starts = range(0, len(bits), piece)

    def round_pieces(first: int, last: int) -> None:
        for start in starts[first:last]:
            stop = min(start + piece, len(bits))
            _round_piece(bits[start:stop], target[start:stop], start // _LANES, seed)

    if len(starts):  # each of torch's threads a run of pieces
        share = math.ceil(len(starts) / min(torch.get_num_threads(), len(starts)))
        run_split(round_pieces, [*range(0, len(starts), share), len(starts)])
    return y


def stochastic_round(x: Tensor, *, seed: int, out: Tensor | None = None, impl: Impl | str = "auto") -> Tensor:
    """Round float32 ``x`` to bfloat16 stochastically: up with probability equal to the dropped fraction.

    Args:
        x: float32 tensor of any shape.
        seed: 64-bit seed; the same ``(seed, x)`` always gives the same result on every implementation.
        out: optional contiguous bfloat16 tensor of ``x``'s shape to write into.
        impl: ``auto`` (Triton on CUDA, the reference elsewhere: on the CPU its numpy form), ``triton`` or
            ``reference``.

    Returns:
        bfloat16 tensor of ``x``'s shape; ``E[result] == x`` over seeds.

    >>> x = torch.full((4096,), 1.0 + 2**-10)
    >>> abs(stochastic_round(x, seed=1).float().mean().item() - (1.0 + 2**-10)) < 1e-3
    True
    """
    if resolve_impl(impl, x) is Impl.TRITON:
        return stochastic_round_fwd(x, seed=seed, out=out)
    if x.device.type == "cpu":
        return _cpu_stochastic_round(x, seed=seed, out=out)
    return reference_stochastic_round(x, seed=seed, out=out)


# ----------------------------------------------------------------------------------------------------------
# Fused AdamW step on bf16 weights and moments
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamWStep:
    """The scalars of one AdamW step (``step`` counts from 1) and the seeds of the three rounding streams."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int
    seeds: tuple[int, int, int]  # weight, first moment, second moment


def _check_adamw(
    weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, options: AdamWStep
) -> None:
    for name, tensor in (("weight", weight), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if tensor.dtype != torch.bfloat16 or not tensor.is_contiguous():
            raise ValueError(f"sr_adamw_: {name} must be a contiguous bfloat16 tensor, got {tensor.dtype}")
        if tensor.shape != weight.shape or tensor.device != weight.device:
            raise ValueError(f"sr_adamw_: {name} must match weight {tuple(weight.shape)} on {weight.device}")
    if grad.shape != weight.shape or not grad.is_floating_point():
        raise ValueError(f"sr_adamw_: grad must be a float tensor of shape {tuple(weight.shape)}")
    if options.step < 1:
        raise ValueError(f"sr_adamw_: step counts from 1, got {options.step}")


def sr_adamw_fwd(
    weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, options: AdamWStep
) -> None:
    """Launch the fused kernel: one AdamW step on bf16 ``weight``, ``exp_avg``, ``exp_avg_sq`` in place."""
    _check_adamw(weight, grad, exp_avg, exp_avg_sq, options)
    import triton

    n = weight.numel()
    if n == 0:
        return
    block_g = 128
    grad = grad.contiguous()
    seeds = [int(seed) for seed in options.seeds]
    _kernels()["adamw"][(triton.cdiv(n, block_g * _LANES),)](
        weight,
        grad,
        exp_avg,
        exp_avg_sq,
        weight.view(torch.int16),
        exp_avg.view(torch.int16),
        exp_avg_sq.view(torch.int16),
        n,
        options.beta1,
        1 - options.beta1,
        options.beta2,
        1 - options.beta2,
        1 - options.lr * options.weight_decay,
        1 - options.beta2**options.step,
        options.eps,
        -options.lr / (1 - options.beta1**options.step),
        *[part for seed in seeds for part in (seed & _MASK32, seed >> 32)],
        HAS_DECAY=options.weight_decay != 0,
        BLOCK_G=block_g,
    )


def reference_sr_adamw_(
    weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, options: AdamWStep
) -> None:
    """Plain-PyTorch AdamW step in fp32 with stochastic rounding back to bf16, the fused kernel's spec."""
    _check_adamw(weight, grad, exp_avg, exp_avg_sq, options)
    values = _adamw_fp32(weight, grad, exp_avg, exp_avg_sq, options)
    for target, value, seed in zip((weight, exp_avg, exp_avg_sq), values, options.seeds, strict=True):
        reference_stochastic_round(value, seed=seed, out=target)


def _adamw_fp32(
    weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, options: AdamWStep
) -> tuple[Tensor, Tensor, Tensor]:
    """The new weight and moments of an AdamW step, in fp32."""
    w, g = weight.float(), grad.float()
    m = exp_avg.float() * options.beta1 + (1 - options.beta1) * g
    v = exp_avg_sq.float() * options.beta2 + ((1 - options.beta2) * g) * g
    if options.weight_decay != 0:
        w = w * (1 - options.lr * options.weight_decay)
    denom = torch.sqrt(v / (1 - options.beta2**options.step)) + options.eps
    w = w + (-options.lr / (1 - options.beta1**options.step)) * (m / denom)
    return w, m, v


def sr_adamw_(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    options: AdamWStep,
    *,
    impl: Impl | str = "auto",
) -> None:
    """One AdamW step on bf16 ``weight`` and moments in place, stochastically rounded (fused on CUDA).

    Reads 2 bytes of each of ``weight``, ``grad`` (bf16), ``exp_avg``, ``exp_avg_sq`` and writes 6: no fp32
    copy of anything exists, so a step over billions of weights needs no extra memory.

    Args:
        weight: contiguous bfloat16 tensor, any shape.
        grad: its gradient, same shape, any float dtype.
        exp_avg: first moment, like ``weight``.
        exp_avg_sq: second moment, like ``weight``.
        options: learning rate, betas, eps, decoupled weight decay, step (from 1) and three seeds.
        impl: ``auto`` (Triton on CUDA), ``triton`` or ``reference``.
    """
    if resolve_impl(impl, weight, grad) is Impl.TRITON:
        sr_adamw_fwd(weight, grad, exp_avg, exp_avg_sq, options)
        return
    _check_adamw(weight, grad, exp_avg, exp_avg_sq, options)
    values = _adamw_fp32(weight, grad, exp_avg, exp_avg_sq, options)
    for target, value, seed in zip((weight, exp_avg, exp_avg_sq), values, options.seeds, strict=True):
        stochastic_round(value, seed=seed, out=target, impl="reference")  # on the CPU: its numpy form
