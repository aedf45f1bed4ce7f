"""Rows held in float32 or bf16: the write-back of updated rows rounds bf16 targets with a stream each."""

import pytest
import torch

from megaclass.ops.held_rows import RowDtype, put_held_, put_held_rows_
from megaclass.ops.stochastic_rounding import reference_stochastic_round, rounding_seed


def test_row_dtypes_name_their_tensors_dtype():
    assert RowDtype("float32").held == torch.float32
    assert RowDtype("bf16_sr").held == torch.bfloat16
    with pytest.raises(ValueError):
        RowDtype("fp16")


def test_bf16_targets_are_rounded_with_a_stream_each_and_float32_ones_written_as_they_are():
    rows, moments = torch.zeros(10, 6, dtype=torch.bfloat16), torch.zeros(10, 6, dtype=torch.bfloat16)
    counts = torch.zeros(10)
    ids = torch.tensor([7, 2, 5])
    new_rows, new_moments, new_counts = torch.randn(3, 6), torch.randn(3, 6), torch.tensor([1.5, 2.5, 3.5])
    put_held_rows_([(rows, new_rows), (moments, new_moments), (counts, new_counts)], ids, seed=11)
    for stream, (target, values) in enumerate(((rows, new_rows), (moments, new_moments))):
        want = reference_stochastic_round(values, seed=rounding_seed(11, stream))
        assert torch.equal(target[ids].view(torch.int16), want.view(torch.int16))
    assert torch.equal(counts[ids], new_counts)
    untouched = torch.tensor([0, 1, 3, 4, 6, 8, 9])
    assert not rows[untouched].any() and not moments[untouched].any() and not counts[untouched].any()
    # the two streams differ: the same values give other roundings in another stream
    same = torch.full((3, 6), 1.0 + 2**-9)
    a, b = torch.zeros(3, 6, dtype=torch.bfloat16), torch.zeros(3, 6, dtype=torch.bfloat16)
    put_held_rows_([(a, same), (b, same)], torch.arange(3), seed=11)
    assert not torch.equal(a, b)


def test_put_held_writes_whole_targets_with_the_bits_of_the_row_write():
    """put_held_ rounds into whole bf16 targets as put_held_rows_ does into rows, copies into float32 ones and
    leaves a target updated in place as it is."""

    def bits(tensor):
        return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor

    values = [torch.randn(4, 6), torch.randn(4, 6), torch.randn(4)]
    rows = [torch.zeros(9, 6, dtype=torch.bfloat16), torch.zeros(9, 6), torch.zeros(9)]
    ids = torch.tensor([8, 0, 3, 4])
    put_held_rows_(list(zip(rows, values, strict=True)), ids, seed=5)
    held = [torch.empty(4, 6, dtype=torch.bfloat16), torch.empty(4, 6), values[2]]
    put_held_(list(zip(held, values, strict=True)), seed=5)
    for target, row in zip(held, rows, strict=True):
        assert torch.equal(bits(target), bits(row[ids]))
    assert held[2] is values[2]
