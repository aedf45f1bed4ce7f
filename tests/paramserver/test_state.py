"""A shard's state on its own: updates of varying sizes through its reused buffers, against plain torch."""

import pytest
import torch

from megaclass.ops import row_optimizers
from megaclass.ops.row_average import ema_decay_at
from megaclass.paramserver.state import ShardSpec, ShardState, all_finite
from megaclass.paramserver.updaters import HyperParams

# pushes of growing, shrinking and empty sizes: the gather buffers grow, then serve smaller updates
SIZES = [3, 1, 8, 0, 5, 8, 2]


def _plain_sgd(rows, momentum, ids, grads, *, lr, mu):
    buffer = momentum[ids].mul_(mu).add_(grads)
    momentum[ids] = buffer
    rows[ids] = rows[ids].add_(buffer, alpha=-lr)


def _plain_adagrad(rows, total, steps, ids, grads, *, lr, eps):
    steps[ids] += 1
    total[ids] = total[ids].addcmul_(grads, grads)
    rows[ids] = rows[ids].addcdiv_(grads, total[ids].sqrt().add_(eps), value=-lr)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_updates_of_varying_sizes_equal_a_plain_update_bitwise(tmp_path, optimizer):
    spec = ShardSpec(num_rows=11, dim=6, row_start=2, row_stop=10, optimizer=optimizer, trainers=1)
    hyper = HyperParams(lr=0.3, momentum=0.9, eps=1e-6)
    state = ShardState(tmp_path, spec, hyper, seed=4)
    rows = state.rows.clone()
    slots = {name: tensor.clone() for name, tensor in state.state.items()}
    generator = torch.Generator().manual_seed(0)
    for step, size in enumerate(SIZES, start=1):
        ids = torch.randperm(spec.size, generator=generator)[:size]  # unsorted, as a selection may be
        grads = torch.randn(size, spec.dim, generator=generator)
        state.apply(ids, grads, lr=0.3 / step, step=step)
        if optimizer == "sgd":
            _plain_sgd(rows, slots["momentum_buffer"], ids, grads, lr=0.3 / step, mu=0.9)
        else:
            _plain_adagrad(rows, slots["sum"], slots["step"], ids, grads, lr=0.3 / step, eps=1e-6)
        torch.testing.assert_close(state.rows, rows, rtol=0, atol=0)
        for name, tensor in slots.items():
            torch.testing.assert_close(state.state[name], tensor, rtol=0, atol=0)
    assert (state.version, state.applied_step) == (len(SIZES), len(SIZES))


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_a_large_update_written_back_by_several_threads_equals_a_plain_update(
    tmp_path, monkeypatch, optimizer
):
    monkeypatch.setattr(row_optimizers, "_PUT_THREAD_BYTES", 4096)  # numpy from 1,024 rows of D 3, 3 threads
    spec = ShardSpec(num_rows=5000, dim=3, row_start=0, row_stop=5000, optimizer=optimizer, trainers=1)
    state = ShardState(tmp_path, spec, HyperParams(lr=0.1, momentum=0.5, eps=1e-6), seed=1)
    rows = state.rows.clone()
    slots = {name: tensor.clone() for name, tensor in state.state.items()}
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three threads write the rows back
    try:
        for step, size in enumerate([3001, 1700, 4999], start=1):
            ids = torch.randperm(spec.size, generator=generator)[:size]
            grads = torch.randn(size, spec.dim, generator=generator)
            state.apply(ids, grads, lr=0.1, step=step)
            if optimizer == "sgd":
                _plain_sgd(rows, slots["momentum_buffer"], ids, grads, lr=0.1, mu=0.5)
            else:
                _plain_adagrad(rows, slots["sum"], slots["step"], ids, grads, lr=0.1, eps=1e-6)
            torch.testing.assert_close(state.rows, rows, rtol=0, atol=0)
            for name, tensor in slots.items():
                torch.testing.assert_close(state.state[name], tensor, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
        state.close()


@pytest.mark.parametrize("where", [0, 7, 4094, 4095])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value_anywhere(where, bad):
    values = torch.randn(4096)
    assert all_finite(values) and all_finite(torch.empty(0, 3))
    values[where] = bad
    assert not all_finite(values)
    assert not all_finite(values.view(64, 64))


def test_all_finite_when_finite_values_overflow_their_sum():
    values = torch.full((64,), 3e38)
    assert not bool(torch.isfinite(values.sum()))
    assert all_finite(values) and all_finite(-values)
    values[5] = float("inf")
    assert not all_finite(values)


def _bf16_neighbours(values):
    """The bfloat16 values just below and above each float32 value (equal where it is one)."""
    down, up = (torch.tensor(bound, dtype=torch.bfloat16) for bound in (-float("inf"), float("inf")))
    nearest = values.to(torch.bfloat16)  # one of the two
    below = torch.where(nearest.float() > values, torch.nextafter(nearest, down), nearest)
    above = torch.where(below.float() < values, torch.nextafter(below, up), below)
    return below.float(), above.float()


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adagrad"])
def test_bf16_rows_are_the_float32_update_rounded_stochastically(tmp_path, optimizer):
    spec = ShardSpec(11, 6, 2, 10, optimizer, 1, dtype="bf16_sr")
    hyper = HyperParams(lr=0.3, momentum=0.9, eps=1e-6)
    state = ShardState(tmp_path, spec, hyper, seed=4)
    reference = ShardState(tmp_path / "float32", ShardSpec(11, 6, 2, 10, optimizer, 1), hyper, seed=4)
    sizes = {"rows.bf16": 2 * 8 * 6, "versions.i64": 8 * 8}
    for slot, shape in state.slots.items():
        sizes[f"{slot}.bf16" if shape else f"{slot}.f32"] = (2 * 6 if shape else 4) * 8
    assert {name: (tmp_path / name).stat().st_size for name in sizes} == sizes
    torch.testing.assert_close(state.rows.float(), reference.rows, rtol=0, atol=2**-8)  # drawn alike
    generator = torch.Generator().manual_seed(0)
    for step, size in enumerate(SIZES, start=1):
        ids = torch.randperm(spec.size, generator=generator)[:size]
        grads = torch.randn(size, spec.dim, generator=generator)
        # the float32 update from the shard's current bfloat16 values, in a float32 shard
        put = {"rows": state.rows.float(), **{name: t.float() for name, t in state.state.items()}}
        for name, values in put.items():
            reference.field(name).copy_(values)
        before = {name: tensor.clone() for name, tensor in [("rows", state.rows), *state.state.items()]}
        state.apply(ids, grads, lr=0.3 / step, step=step)
        reference.apply(ids, grads, lr=0.3 / step, step=step)
        untouched = torch.ones(spec.size, dtype=torch.bool).index_fill_(0, ids, False)
        for name, tensor in [("rows", state.rows), *state.state.items()]:
            expected = reference.field(name)
            if tensor.dtype == torch.float32:  # per-row counts
                torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
                continue
            below, above = _bf16_neighbours(expected[ids])
            stored = tensor[ids].float()
            assert bool(((stored == below) | (stored == above)).all()), name
            assert torch.equal(tensor[untouched], before[name][untouched])


def test_bf16_rounding_is_unbiased(tmp_path):
    spec = ShardSpec(4096, 16, 0, 4096, "sgd", 1, dtype="bf16_sr")
    state = ShardState(tmp_path, spec, HyperParams(lr=1.0, momentum=0.0), init_bound=0.0)
    ids = torch.arange(4096)
    state.apply(ids, torch.full((4096, 16), -1.0 / 3), lr=1.0, step=1)  # each row 1/3, between two bf16
    below, above = _bf16_neighbours(torch.tensor([1.0 / 3]))
    stored = state.rows.float()
    assert bool(((stored == below) | (stored == above)).all())
    assert abs(float(stored.mean()) - 1.0 / 3) < 0.02 * float(above - below)  # 65,536 draws


def _plain_ema(snapshots: list[torch.Tensor], decay: float) -> torch.Tensor:
    """``snapshots[0]`` (the start) averaged with ``snapshots[t]`` after each step ``t``, in float64."""
    average = snapshots[0].double().clone()
    for step, rows in enumerate(snapshots[1:], start=1):
        rate = ema_decay_at(decay, step)
        average = rate * average + (1 - rate) * rows.double()
    return average


@pytest.mark.parametrize("dtype", ["float32", "bf16_sr"])
def test_a_shard_keeps_its_rows_average_as_a_plain_ema_of_every_row(tmp_path, dtype):
    spec = ShardSpec(
        num_rows=20,
        dim=4,
        row_start=3,
        row_stop=17,
        optimizer="sgd",
        trainers=1,
        dtype=dtype,
        average_decay=0.8,
    )
    state = ShardState(tmp_path, spec, HyperParams(lr=0.2, momentum=0.5), seed=2)
    assert state.state["average"].dtype == torch.float32  # held as the rows are: not the average
    assert torch.equal(state.state["average"], state.rows.float()) and not state.state["average_step"].any()
    snapshots = [state.rows.float().clone()]
    updated = torch.zeros(spec.size)  # (n,) the step of each row's last update
    generator = torch.Generator().manual_seed(1)
    for step, size in enumerate([3, 0, 14, 1, 5, 2, 9, 4], start=1):
        ids = torch.randperm(spec.size, generator=generator)[:size]
        state.apply(ids, torch.randn(size, spec.dim, generator=generator), lr=0.2, step=step)
        updated[ids] = step
        snapshots.append(state.rows.float().clone())
        expected = _plain_ema(snapshots, 0.8)
        torch.testing.assert_close(state.average_at(slice(0, spec.size), step).double(), expected)
        some = torch.tensor([spec.size - 1, 0, 4])  # by ids, unsorted
        torch.testing.assert_close(state.average_at(some, step).double(), expected[some])
        torch.testing.assert_close(state.average_at(slice(2, 9), step).double(), expected[2:9])
    # kept as of the step before each row's last update (reads write nothing)
    assert torch.equal(state.state["average_step"], (updated - 1).clamp(min=0))
    kept = state.state["average"][:1]  # a row kept as of a later step than asked: as kept
    assert torch.equal(state.average_at(slice(0, 1), 0), kept)
