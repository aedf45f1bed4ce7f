"""Stochastic rounding fp32 -> bf16, seeded and reproducible.

bf16 keeps the top 16 bits of an fp32 number. Round-to-nearest drops an update smaller than half a bf16 ulp
every time; stochastic rounding (SR) rounds up with probability equal to the dropped fraction, so
``E[sr(x)] == x`` and many small updates accumulate in expectation (Gupta et al. 2015, arXiv 1502.02551; ELMO,
ICML 2025, keeps extreme-classification heads in bf16 this way).

Bit recipe: with ``u = bits(x)`` (uint32) and ``r`` uniform in ``[0, 2^16)``,
``sr(x) = (u + r) & 0xFFFF0000``.
Adding ``r`` carries into bit 16 with probability ``(u & 0xFFFF) / 2^16``; fp32's sign-magnitude layout makes
this the same in magnitude for negative numbers, and infinities stay infinite. NaN stays a (quiet) NaN.

Random bits come from SplitMix64 (Steele, Lea and Flood 2014, "Fast splittable pseudorandom number
generators") keyed by a 64-bit ``seed``: word ``w`` is the SplitMix64 finaliser of ``seed + (w + 1) * gamma``
(mod 2^64), and element ``e`` takes the 16 bits ``e % 4`` (low first) of word ``e // 4``. The result depends
only on ``(seed, e, x[e])``: the Triton kernel, :func:`reference_stochastic_round` and the CPU path agree bit
for bit. Three 64-bit products and three shifts serve four elements (Philox-4x32-10 spends twenty
32 x 32-bit products on eight), so on the CPU, where :func:`stochastic_round` computes the bits with numpy's
unsigned integers in pieces over torch's threads, the noise costs about what the rounding does.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from megaclass.ops import Impl, resolve_impl, run_split

__all__ = [
    "AdamWStep",
    "reference_sr_adamw_",
    "reference_stochastic_round",
    "rounding_seed",
    "sr_adamw_",
    "sr_adamw_fwd",
    "stochastic_round",
    "stochastic_round_fwd",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio, odd
_MIX_A = 0xBF58476D1CE4E5B9  # the finaliser's multipliers and shifts (Stafford's Mix13)
_MIX_B = 0x94D049BB133111EB
_SHIFTS = (30, 27, 31)
_LANES = 4  # elements served by one 64-bit word: 4 x 16 bits
_BLOCK_W = 256  # words a Triton program rounds (1,024 elements)
# elements of one piece of the CPU path: big enough that numpy's work, not taking back the GIL between calls,
# fills each thread (pieces of 2^16 did not run faster on two threads than on one)
_CPU_PIECE = 1 << 18


def _mix64(z: int) -> int:
    """SplitMix64's finaliser of a 64-bit integer."""
    z = ((z ^ (z >> _SHIFTS[0])) * _MIX_A) & _MASK64
    z = ((z ^ (z >> _SHIFTS[1])) * _MIX_B) & _MASK64
    return z ^ (z >> _SHIFTS[2])


def rounding_seed(*parts: int) -> int:
    """Mix integers (a base seed, a step, a tensor id, ...) into one 64-bit rounding seed (a SplitMix64
    chain): each stream of rounding noise gets a seed of its own."""
    state = 0x243F6A8885A308D3
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = _mix64((state + _GAMMA) & _MASK64)
    return state


# ----------------------------------------------------------------------------------------------------------
# Triton kernel (imported lazily)
# ----------------------------------------------------------------------------------------------------------

_KERNELS: dict[str, object] = {}


def _kernels() -> dict[str, object]:
    """Compile-on-first-use kernels; triton is imported here, never at ``import megaclass``."""
    global _noise, _round_bits, _word_tile  # jit helpers: resolved by name from module globals
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _noise(words, seed_lo, seed_hi):
        # (BLOCK_W, 4) uint32 values in [0, 2^16): lane j of word w is bits 16 j .. 16 j + 15 of
        # mix64(seed + (w + 1) * gamma), all arithmetic mod 2^64
        seed = (seed_hi.to(tl.uint64) << 32) | seed_lo.to(tl.uint64)
        z = (words + 1).to(tl.uint64) * 0x9E3779B97F4A7C15 + seed
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        shift = (tl.arange(0, 4) * 16).to(tl.uint64)[None, :]  # (1, 4)
        return ((z[:, None] >> shift) & 0xFFFF).to(tl.uint32)

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
    def _word_tile(n_elements, BLOCK_W: tl.constexpr):
        # This program's BLOCK_W * 4 elements as a (BLOCK_W, 4) tile: row w of the tile shares one noise word.
        # int64 offsets: > 2^31 elements happen.
        pid = tl.program_id(0).to(tl.int64)
        words = pid * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)  # (BLOCK_W,)
        offsets = words[:, None] * 4 + tl.arange(0, 4)[None, :]  # (BLOCK_W, 4)
        return words, offsets, offsets < n_elements

    # Triton specialises an integer argument equal to 1 into a constexpr, on which ``.to(tl.uint64)`` fails to
    # compile: the seed words (any value in [0, 2^32)) are never specialised.
    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _stochastic_round_fwd_kernel(
        X_ptr,
        Y_ptr,
        seed_lo,
        seed_hi,
        n_elements,
        BLOCK_W: tl.constexpr,
    ):
        words, offsets, mask = _word_tile(n_elements, BLOCK_W)  # (BLOCK_W,), (BLOCK_W, 4), (BLOCK_W, 4)
        x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = _round_bits(x, _noise(words, seed_lo, seed_hi))
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
        BLOCK_W: tl.constexpr,
    ):
        # One AdamW step on bf16 weights W and moments M, V in place (Loshchilov & Hutter 2019), fp32 in
        # registers, each result stochastically rounded back with its own stream; G is the gradient (any
        # float dtype). The operation order is that of adamw_math in megaclass.train.low_precision:
        #   m = m * b1 + (1 - b1) g;  v = v * b2 + ((1 - b2) g) g;  w = w * (1 - lr wd)
        #   w = w + step_size * (m / (sqrt(v / bc2) + eps)),  step_size = -lr / bc1
        words, offsets, mask = _word_tile(n_elements, BLOCK_W)  # (BLOCK_W,), (BLOCK_W, 4), (BLOCK_W, 4)
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
        tl.store(W_bits_ptr + offsets, _round_bits(w, _noise(words, seed_w_lo, seed_w_hi)), mask=mask)
        tl.store(M_bits_ptr + offsets, _round_bits(m, _noise(words, seed_m_lo, seed_m_hi)), mask=mask)
        tl.store(V_bits_ptr + offsets, _round_bits(v, _noise(words, seed_v_lo, seed_v_hi)), mask=mask)

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


def stochastic_round_fwd(x: Tensor, *, seed: int, out: Tensor | None = None) -> Tensor:
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
    grid = (triton.cdiv(n, _BLOCK_W * _LANES),)
    kernel[grid](x_flat, y.view(torch.int16).reshape(-1), seed & _MASK32, seed >> 32, n, BLOCK_W=_BLOCK_W)
    return y


# ----------------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (the executable spec): a uint64 is two uint32 halves, each held in int64
# ----------------------------------------------------------------------------------------------------------


def _mul32(a: Tensor, constant: int) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` 32-bit halves of ``a * constant`` for uint32 values held in int64 (no int64 overflow)."""
    hi_part = (a >> 16) * constant  # < 2^48
    lo_part = (a & 0xFFFF) * constant  # < 2^48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return hi & _MASK32, lo


def _mul64(hi: Tensor, lo: Tensor, constant: int) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` of ``(hi * 2^32 + lo) * constant mod 2^64``."""
    carry, low = _mul32(lo, constant & _MASK32)
    high = carry + _mul32(hi, constant & _MASK32)[1] + _mul32(lo, constant >> 32)[1]
    return high & _MASK32, low


def _xorshift64(hi: Tensor, lo: Tensor, shift: int) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` of ``z ^ (z >> shift)`` for ``z = hi * 2^32 + lo``, ``0 < shift < 32``."""
    shifted_lo = (lo >> shift) | ((hi << (32 - shift)) & _MASK32)
    return hi ^ (hi >> shift), lo ^ shifted_lo


def _noise_words_reference(words: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` halves of the noise words ``mix64(seed + (w + 1) * gamma)`` for word indices ``words``."""
    w = words + 1  # < 2^62: a word index times 4 is an element index
    hi, lo = _mul64(w >> 32, w & _MASK32, _GAMMA)
    lo = lo + (seed & _MASK32)
    hi = (hi + (seed >> 32) + (lo >> 32)) & _MASK32
    lo = lo & _MASK32
    for shift, multiplier in zip(_SHIFTS, (_MIX_A, _MIX_B, None), strict=True):
        hi, lo = _xorshift64(hi, lo, shift)
        if multiplier is not None:
            hi, lo = _mul64(hi, lo, multiplier)
    return hi, lo


def reference_stochastic_round(x: Tensor, *, seed: int, out: Tensor | None = None) -> Tensor:
    """Plain-PyTorch stochastic rounding, bit-identical to the Triton kernel for the same ``seed``."""
    _check(x, seed, out)
    seed = int(seed)
    flat = x.contiguous().reshape(-1)  # (N,)
    n = flat.numel()
    words = torch.arange((n + _LANES - 1) // _LANES, dtype=torch.int64, device=x.device)  # (W,)
    hi, lo = _noise_words_reference(words, seed)
    # lane j of a word: its bits 16 j .. 16 j + 15 (the low half of lo first)
    halves = torch.stack([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], dim=1).reshape(-1)[:n]  # (N,)
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


def _noise_words(first: int, seed: int, *, ramp: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """Noise words ``first .. first + len(out) - 1`` into uint64 ``out``, given ``ramp = 1, 2, 3, ...`` and
    a ``scratch`` array of ``out``'s length (numpy's uint64 arithmetic wraps mod 2^64)."""
    np.add(ramp, np.uint64(first), out=out)
    out *= np.uint64(_GAMMA)
    out += np.uint64(seed)
    for shift, multiplier in zip(_SHIFTS, (_MIX_A, _MIX_B, None), strict=True):
        np.right_shift(out, np.uint64(shift), out=scratch)
        out ^= scratch
        if multiplier is not None:
            out *= np.uint64(multiplier)


_thread_buffers = threading.local()


def _piece_buffers(piece: int) -> SimpleNamespace:
    """This thread's buffers for a piece of ``piece`` elements (2.8 MB for the CPU path's), kept from call
    to call: fresh ones would fault in their pages every time."""
    buffers = getattr(_thread_buffers, "piece", None)
    if buffers is None or len(buffers.rounded) != piece:
        words = -(-piece // _LANES)
        buffers = SimpleNamespace(
            ramp=np.arange(1, words + 1, dtype=np.uint64),
            words=np.empty(words, dtype=np.uint64),
            scratch=np.empty(words, dtype=np.uint64),
            rounded=np.empty(piece, dtype=np.uint32),
            nan=np.empty(piece, dtype=np.bool_),
        )
        _thread_buffers.piece = buffers
    return buffers


def _cpu_stochastic_round(x: Tensor, *, seed: int, out: Tensor | None = None) -> Tensor:
    """:func:`reference_stochastic_round`'s bits for a CPU ``x``, computed with numpy over torch's threads."""
    _check(x, seed, out)
    seed = int(seed)
    bits = x.detach().contiguous().reshape(-1).numpy().view(np.uint32)  # (N,)
    y = torch.empty(x.shape, dtype=torch.bfloat16) if out is None else out
    target = y.view(torch.int16).reshape(-1).numpy().view(np.uint16)
    size = _CPU_PIECE
    starts = range(0, len(bits), size)

    def round_pieces(first: int, last: int) -> None:
        buffers = _piece_buffers(size)
        for start in starts[first:last]:
            stop = min(start + size, len(bits))
            n, piece = stop - start, bits[start:stop]
            count = -(-n // _LANES)
            words, rounded, nan = buffers.words[:count], buffers.rounded[:n], buffers.nan[:n]
            _noise_words(
                start // _LANES, seed, ramp=buffers.ramp[:count], out=words, scratch=buffers.scratch[:count]
            )
            # lane j of a word: its little-endian uint16 j. Adding wraps only for NaN bits, fixed below
            np.add(piece, words.view(np.uint16)[:n], out=rounded)
            rounded >>= np.uint32(16)
            if np.isnan(piece.view(np.float32), out=nan).any():
                rounded[nan] = (piece[nan] >> np.uint32(16)) | np.uint32(0x0040)
            target[start:stop] = rounded

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
    grad = grad.contiguous()
    seeds = [int(seed) for seed in options.seeds]
    _kernels()["adamw"][(triton.cdiv(n, _BLOCK_W * _LANES),)](
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
        BLOCK_W=_BLOCK_W,
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
