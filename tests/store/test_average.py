"""The lazily kept row average against a plain EMA of every row, folded every step."""

import pytest
import torch

from megaclass.ops.row_average import ema_decay_at
from megaclass.ops.row_optimizers import RowOptimizerConfig
from megaclass.store.average import HeldRowAverage
from megaclass.store.device import DeviceStore
from megaclass.store.host import HostStore
from megaclass.store.local import LocalRows


class _Rows:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


def _plain_ema(snapshots: list[torch.Tensor], decay: float) -> torch.Tensor:
    """The average of ``snapshots[0]`` (the start) folded with ``snapshots[t]`` after each step ``t``, in
    float64."""
    average = snapshots[0].double().clone()
    for step, weight in enumerate(snapshots[1:], start=1):
        rate = ema_decay_at(decay, step)
        average = rate * average + (1 - rate) * weight.double()
    return average


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("touched", [0.0, 0.1, 0.5, 1.0])
def test_rows_folded_as_they_change_equal_a_plain_ema_of_every_row(decay, touched):
    generator = torch.Generator().manual_seed(int(decay * 1000) + int(touched * 10))
    rows = _Rows(torch.randn(13, 5, generator=generator))
    average = HeldRowAverage(rows, decay=decay)
    snapshots = [rows.weight.clone()]
    for step in range(1, 41):
        ids = torch.nonzero(torch.rand(13, generator=generator) < touched).squeeze(1)
        average.fold_(ids, rows.weight[ids], step=step)
        rows.weight[ids] += torch.randn(len(ids), 5, generator=generator)
        snapshots.append(rows.weight.clone())
        if step in (7, 23, 40):  # read midway too: a catch-up leaves the average exact for later steps
            found = average.exact(step=step)
            torch.testing.assert_close(found.double(), _plain_ema(snapshots, decay), rtol=1e-5, atol=1e-5)
    assert average.last.tolist() == [40] * 13


_ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", ["float32", "bf16_sr"])
@pytest.mark.parametrize(
    ("store_kind", "device"),
    [
        ("device", "cpu"),
        ("host", "cpu"),
        pytest.param("device", "cuda", marks=[pytest.mark.gpu, _ON_CUDA]),
        pytest.param("host", "cuda", marks=[pytest.mark.gpu, _ON_CUDA]),  # updates applied in a thread
    ],
)
def test_a_stores_rows_average_as_they_update(dtype, store_kind, device):
    optimizer = RowOptimizerConfig(kind="adamw", weight_decay=0.1)
    on = device if store_kind == "device" else "cpu"
    rows = LocalRows(11, 4, optimizer=optimizer, seed=3, dtype=dtype, device=on)
    store = DeviceStore(rows) if store_kind == "device" else HostStore(rows, device=device)
    average = store.start_average(0.8)
    snapshots = [rows.weight.float().cpu().clone()]
    generator = torch.Generator().manual_seed(5)
    for step in range(1, 16):
        ids = torch.randperm(11, generator=generator)[: 1 + step % 5]
        grads = torch.randn(len(ids), 4, generator=generator)
        store.push(ids.to(device), grads.to(device), step=step, lr=0.05)
        store.flush()
        snapshots.append(rows.weight.float().cpu().clone())
    expected = _plain_ema(snapshots, 0.8)
    torch.testing.assert_close(average.exact(step=15).double().cpu(), expected, rtol=1e-5, atol=1e-6)
    trained = rows.weight
    average.swap_(step=15)
    assert rows.weight.dtype == torch.float32 and average.swapped
    torch.testing.assert_close(store.read(0, 11).double().cpu(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="swap"):
        store.push(torch.tensor([0], device=device), torch.ones(1, 4, device=device), step=16, lr=0.1)
        store.flush()
    average.swap_(step=15)
    assert rows.weight is trained and rows.weight.dtype == rows.row_dtype.held


def test_a_loaded_average_is_exact_from_its_step_and_fold_needs_a_step():
    rows = _Rows(torch.zeros(3, 2))
    average = HeldRowAverage(rows, decay=0.9)
    average.load_(torch.ones(3, 2), step=50)
    assert average.last.tolist() == [50, 50, 50]
    rows.weight[2] = 3.0  # the rows' values from step 50 on, as far as the average knows
    rate = ema_decay_at(0.9, 51)
    expected = torch.tensor([[rate, rate], [rate, rate], [rate + 3 * (1 - rate)] * 2])
    torch.testing.assert_close(average.exact(step=51), expected)
    with pytest.raises(ValueError, match="optimizer step"):
        average.fold_(torch.tensor([0]), torch.zeros(1, 2), step=0)
    with pytest.raises(ValueError, match="shape"):
        average.load_(torch.ones(2, 2), step=1)
    with pytest.raises(ValueError, match="ema_decay"):
        HeldRowAverage(rows, decay=1.0)
