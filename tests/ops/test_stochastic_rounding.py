"""Stochastic rounding fp32 -> bf16: kernel vs reference bit for bit, unbiasedness, neighbours, edge cases."""

import math

import pytest
import torch

from megaclass.ops import stochastic_rounding
from megaclass.ops.stochastic_rounding import (
    reference_stochastic_round,
    rounding_seed,
    stochastic_round,
    stochastic_round_fwd,
)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around each fp32 value (truncation toward zero, and one ulp further out)."""
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)
    up = ((bits & -65536) + 65536).view(torch.float32)
    return down, up


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (1023,), (3, 129), (2, 5, 17)])
# seed words (low, high) equal to 1 are ones Triton would specialise into constexprs
@pytest.mark.parametrize("seed", [0, 1, 2**32, 2**32 + 1, 2**31 + 7, 2**63 + 12345])
def test_kernel_matches_reference_bitwise(device_for, shape, seed):
    with torch.device(device_for("triton")):
        x = torch.randn(shape) * torch.logspace(-20, 20, math.prod(shape)).reshape(shape)
        got = stochastic_round_fwd(x, seed=seed)
        want = reference_stochastic_round(x, seed=seed)
        assert got.dtype == want.dtype == torch.bfloat16 and got.shape == x.shape
        diff = torch.nonzero(_bits(got) != _bits(want))
        assert diff.numel() == 0, (
            f"first mismatch at {diff[0].tolist()}: {got[tuple(diff[0])]} vs {want[tuple(diff[0])]}"
        )


def test_kernel_handles_special_values_and_views(device_for):
    with torch.device(device_for("triton")):
        x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -1e-40, 1e-45, 1.0])
        got = stochastic_round_fwd(x, seed=5)
        want = reference_stochastic_round(x, seed=5)
        assert torch.isnan(got[0]) and torch.isnan(want[0])
        assert torch.equal(_bits(got), _bits(want))
        assert got[6] < 0 and got[6].float() > -1e-38  # subnormals are rounded, not flushed
        assert got[1] == float("inf") and got[2] == -float("inf") and got[3] == 0 and got[8] == 1.0
        assert torch.signbit(got[4])
        # a non-contiguous view rounds like its contiguous copy
        base = torch.randn(6, 10)
        view = base[:, ::3]
        assert torch.equal(
            _bits(stochastic_round_fwd(view, seed=3)), _bits(reference_stochastic_round(view, seed=3))
        )
        assert torch.equal(
            _bits(reference_stochastic_round(view, seed=3)),
            _bits(reference_stochastic_round(view.contiguous(), seed=3)),
        )


def test_out_argument_and_empty(device_for):
    with torch.device(device_for("triton")):
        x = torch.randn(33)
        out = torch.empty(33, dtype=torch.bfloat16)
        assert stochastic_round_fwd(x, seed=9, out=out) is out
        assert torch.equal(_bits(out), _bits(reference_stochastic_round(x, seed=9)))
        assert stochastic_round_fwd(torch.empty(0), seed=1).numel() == 0
        assert reference_stochastic_round(torch.empty(0, 4), seed=1).shape == (0, 4)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_result_is_one_of_the_two_neighbours(device_for, impl):
    with torch.device(device_for(impl)):
        x = torch.randn(4096) * 100
        y = stochastic_round(x, seed=11, impl=impl).float()
        down, up = _neighbours(x)
        exact = (x.view(torch.int32) & 0xFFFF) == 0
        assert torch.all((y == down) | (y == up))
        assert torch.all(y[exact] == x[exact])


@pytest.mark.parametrize("value", [1.0 + 2**-10, -3.0 - 2**-12, 1e-30 * (1 + 2**-9), 0.1])
def test_unbiased_over_draws(value):
    """Mean over many draws equals the fp32 value; round-to-nearest is off by up to half an ulp."""
    draws = 200_000
    x = torch.full((draws,), value)
    y = reference_stochastic_round(x, seed=42).double()
    down, up = _neighbours(x[:1])
    ulp = abs(float(up - down))
    p = (value - float(down)) / (float(up) - float(down))  # probability of rounding away from zero
    sd = ulp * math.sqrt(p * (1 - p) / draws)
    assert abs(y.mean().item() - value) < 5 * sd + 1e-12 * abs(value)
    # the draws are not all equal unless the value is exact in bf16
    assert y.unique().numel() == 2


def test_seeds_give_independent_streams():
    x = torch.full((10_000,), 1.0 + 2**-8)  # halfway between bf16 neighbours
    a = reference_stochastic_round(x, seed=rounding_seed(0, 1))
    b = reference_stochastic_round(x, seed=rounding_seed(0, 2))
    agree = (a == b).double().mean().item()
    assert 0.4 < agree < 0.6  # p = 1/2 each, independent: agreement 1/2
    assert torch.equal(a, reference_stochastic_round(x, seed=rounding_seed(0, 1)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="float32"):
        stochastic_round(torch.ones(3, dtype=torch.float64), seed=0)
    with pytest.raises(ValueError, match="seed"):
        stochastic_round(torch.ones(3), seed=-1)
    with pytest.raises(ValueError, match="out"):
        stochastic_round(torch.ones(3), seed=0, out=torch.empty(4, dtype=torch.bfloat16))


def test_rounding_seed_is_stable():
    assert rounding_seed(1, 2, 3) == rounding_seed(1, 2, 3)
    assert rounding_seed(1, 2, 3) != rounding_seed(1, 3, 2)
    assert 0 <= rounding_seed(2**70, -1) < 2**64


@pytest.mark.parametrize("shape", [(1,), (13,), (8, 9), (3, 5, 7)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_fused_adamw_matches_reference(device_for, shape, weight_decay, grad_dtype):
    from megaclass.ops.stochastic_rounding import AdamWStep, reference_sr_adamw_, sr_adamw_fwd

    with torch.device(device_for("triton")):
        weight = torch.randn(shape).to(torch.bfloat16)
        exp_avg = (torch.randn(shape) * 0.1).to(torch.bfloat16)
        exp_avg_sq = torch.rand(shape).mul(0.01).to(torch.bfloat16)
        grad = torch.randn(shape).to(grad_dtype)
        options = AdamWStep(
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=weight_decay,
            step=3,
            seeds=(1, 2**32 + 1, 2**63),  # words of 1 (lo, then lo and hi): never constexpr
        )
        want = [t.clone() for t in (weight, exp_avg, exp_avg_sq)]
        reference_sr_adamw_(want[0], grad, want[1], want[2], options)
        sr_adamw_fwd(weight, grad, exp_avg, exp_avg_sq, options)
        for name, got, expected in zip(
            ("weight", "exp_avg", "exp_avg_sq"), (weight, exp_avg, exp_avg_sq), want, strict=True
        ):
            diff = torch.nonzero(_bits(got) != _bits(expected))
            assert diff.numel() == 0, f"{name}: first mismatch at {diff[0].tolist()}"


def test_the_cpu_adamw_step_matches_the_reference_bitwise():
    from megaclass.ops.stochastic_rounding import AdamWStep, reference_sr_adamw_, sr_adamw_

    weight, exp_avg = torch.randn(5, 77).to(torch.bfloat16), (torch.randn(5, 77) * 0.1).to(torch.bfloat16)
    exp_avg_sq, grad = torch.rand(5, 77).mul(0.01).to(torch.bfloat16), torch.randn(5, 77)
    options = AdamWStep(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, seeds=(1, 2, 3))
    want = [t.clone() for t in (weight, exp_avg, exp_avg_sq)]
    reference_sr_adamw_(want[0], grad, want[1], want[2], options)
    sr_adamw_(weight, grad, exp_avg, exp_avg_sq, options)
    for got, expected in zip((weight, exp_avg, exp_avg_sq), want, strict=True):
        assert torch.equal(_bits(got), _bits(expected))


def test_fused_adamw_rejects_fp32_state():
    from megaclass.ops.stochastic_rounding import AdamWStep, sr_adamw_

    options = AdamWStep(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, seeds=(1, 2, 3))
    weight = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="exp_avg"):
        sr_adamw_(weight, torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), options)
    with pytest.raises(ValueError, match="step"):
        sr_adamw_(
            weight,
            torch.zeros(4),
            weight.clone(),
            weight.clone(),
            AdamWStep(**{**options.__dict__, "step": 0}),
        )


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2**32 + 1, 2**63 + 12345])
def test_the_cpu_path_matches_the_reference_bitwise(monkeypatch, threads, seed):
    monkeypatch.setattr(stochastic_rounding, "_CPU_PIECE", 128)  # pieces of 128 elements, some partial
    special = [
        float("nan"),
        -float("nan"),
        float("inf"),
        -float("inf"),
        0.0,
        -0.0,
        3.4e38,
        -3.4e38,
        -1e-40,
        1e-45,
    ]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(0,), (1,), (7,), (9,), (1023,), (3, 129), (2, 5, 170)]:
            x = torch.randn(shape) * torch.logspace(-20, 20, math.prod(shape)).reshape(shape)
            x.view(-1)[: len(special)] = torch.tensor(special)[: x.numel()]
            want = reference_stochastic_round(x, seed=seed)
            assert torch.equal(_bits(stochastic_round(x, seed=seed)), _bits(want)), shape
            out = torch.empty(shape, dtype=torch.bfloat16)
            assert stochastic_round(x, seed=seed, out=out, impl="reference") is out
            assert torch.equal(_bits(out), _bits(want)), shape
        view = torch.randn(60, 10)[:, ::3]  # non-contiguous
        assert torch.equal(
            _bits(stochastic_round(view, seed=3)), _bits(reference_stochastic_round(view, seed=3))
        )
    finally:
        torch.set_num_threads(previous)


def _splitmix64_word(word: int, seed: int) -> int:
    """Noise word ``word`` of stream ``seed``: SplitMix64's published constants on Python's integers."""
    mask = 2**64 - 1
    z = (seed + (word + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**63 + 12345, 2**64 - 1])
def test_noise_words_are_splitmix64_past_32_bits(seed):
    import numpy as np

    first = 2**32 - 3  # word indices whose high half is 0 and 1, and one near the top of int64 elements
    words = [first + i for i in range(6)] + [0, 2**61]
    want = [_splitmix64_word(word, seed) for word in words]
    hi, lo = stochastic_rounding._noise_words_reference(torch.tensor(words), seed)
    assert [(int(h) << 32) | int(low) for h, low in zip(hi, lo, strict=True)] == want
    out, scratch = np.empty(6, dtype=np.uint64), np.empty(6, dtype=np.uint64)
    stochastic_rounding._noise_words(
        first, seed, ramp=np.arange(1, 7, dtype=np.uint64), out=out, scratch=scratch
    )
    assert [int(value) for value in out] == want[:6]


def test_the_cpu_path_after_pieces_of_another_size(monkeypatch):
    x = torch.randn(1000)
    monkeypatch.setattr(stochastic_rounding, "_CPU_PIECE", 128)
    small = stochastic_round(x, seed=4)
    monkeypatch.setattr(stochastic_rounding, "_CPU_PIECE", 256)  # this thread's buffers were made for 128
    assert torch.equal(_bits(stochastic_round(x, seed=4)), _bits(small))
    assert torch.equal(_bits(small), _bits(reference_stochastic_round(x, seed=4)))
