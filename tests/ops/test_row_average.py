"""The row average's maths: the closed form of the decays' log total, and a fold of rows kept as of
different steps, against the decays applied one step at a time."""

import math

import pytest
import torch

from megaclass.ops.row_average import ema_decay_at, fold_rows_, log_decay_total


@pytest.mark.parametrize("decay", [0.1, 0.5, 0.9, 0.99, 0.999, 0.9999])
def test_the_closed_form_log_total_is_the_sum_of_the_log_decays(decay):
    steps = sorted({0, 1, 2, 3, 9, 10, 11, 98, 99, 100, 1000, 9998, 9999, 10000, 20000})
    direct, total = [], 0.0
    for step in range(0, steps[-1] + 1):
        if step:
            total += math.log(ema_decay_at(decay, step))
        if step in steps:
            direct.append(total)
    found = log_decay_total(decay, torch.tensor(steps))
    torch.testing.assert_close(found, torch.tensor(direct, dtype=torch.float64), rtol=1e-12, atol=1e-9)


def _stepwise(average, values, first, last, decay):
    """``average`` folded with ``values`` one step at a time over steps ``first + 1 .. last``, in float64."""
    average = average.double()
    for step in range(first + 1, last + 1):
        rate = ema_decay_at(decay, step)
        average = rate * average + (1 - rate) * values.double()
    return average


@pytest.mark.parametrize("last_dtype", [torch.int64, torch.float32])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.5, 0.99])
def test_a_fold_brings_each_row_from_its_own_step_and_leaves_later_ones(last_dtype, values_dtype, decay):
    generator = torch.Generator().manual_seed(0)
    kept = torch.tensor([0, 3, 17, 40, 41, 60])  # (S,) each row's step; 41 and 60 are past the fold's 40
    average = torch.randn(6, 5, generator=generator)
    values = torch.randn(6, 5, generator=generator).to(values_dtype)
    folded, last = average.clone(), kept.to(last_dtype, copy=True)
    fold_rows_(folded, last, values, decay=decay, step=40)
    assert last.tolist() == [40, 40, 40, 40, 41, 60]
    for row, first in enumerate(kept.tolist()):
        expected = _stepwise(average[row], values[row], first, max(first, 40), decay)
        torch.testing.assert_close(folded[row].double(), expected, rtol=1e-5, atol=1e-6)


def test_a_fold_of_no_rows_and_of_a_non_contiguous_view():
    average, last = torch.empty(0, 3), torch.empty(0, dtype=torch.int64)
    fold_rows_(average, last, torch.empty(0, 3), decay=0.9, step=5)  # nothing to do
    matrix = torch.zeros(4, 6)
    column_half = matrix[:, ::2]  # (4, 3) a strided view, folded in place
    fold_rows_(column_half, torch.zeros(4), torch.ones(4, 3), decay=0.9, step=1)
    assert torch.allclose(matrix[:, ::2], torch.full((4, 3), 1 - ema_decay_at(0.9, 1)))
    assert not matrix[:, 1::2].any()
