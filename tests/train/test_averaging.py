"""Weight averaging against a plain EMA written out step by step."""

import pytest
import torch
from torch import nn

from megaclass.train.averaging import WeightAverage


@pytest.mark.parametrize("decay", [0.5, 0.99])
@pytest.mark.parametrize("steps", [1, 7])
def test_average_matches_a_plain_ema_and_swaps_back(decay, steps):
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5))
    average = WeightAverage({"model": model}, decay=decay)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(step=step)
        rate = min(decay, (1 + step) / (10 + step))
        for name, p in model.named_parameters():
            expected[name] = rate * expected[name] + (1 - rate) * p.detach()
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    with average.swapped():
        for name, p in model.named_parameters():
            torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), "the trained weights come back"
    state = average.state_dict()
    assert set(state) == {f"model.{name}" for name in trained}
    again = WeightAverage({"model": model}, decay=decay)
    again.load_state_dict(state)
    for name in state:
        assert torch.equal(again.average[name], state[name])


def test_restart_and_errors():
    model = nn.Linear(4, 2, bias=False)
    average = WeightAverage({"m": model}, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    before = average.average["m.weight"].clone()
    average.restart("m.weight", mask)
    assert average.average["m.weight"][1, 2] == 3.0
    assert torch.equal(average.average["m.weight"][~mask], before[~mask])
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage({"m": model}, decay=1.0)
    with pytest.raises(ValueError, match="missing"):
        average.load_state_dict({})


def test_one_part_swaps_saves_and_loads_alone():
    encoder, head = nn.Linear(3, 4), nn.Linear(4, 2)
    average = WeightAverage({"encoder": encoder, "head": head}, decay=0.5)
    with torch.no_grad():
        for p in (*encoder.parameters(), *head.parameters()):
            p.add_(1.0)
    average.update(step=1)
    trained = {name: p.detach().clone() for name, p in average.params.items()}
    assert set(average.state_dict("head")) == {"weight", "bias"}
    averaged = average.state_dict("encoder")["weight"].clone()
    assert not torch.equal(averaged, trained["encoder.weight"])
    with average.swapped("encoder"):
        assert torch.equal(encoder.weight, averaged)
        assert torch.equal(head.weight, trained["head.weight"])
        with torch.no_grad():
            encoder.weight.fill_(7.0)  # written inside: the average from now on
    assert torch.equal(encoder.weight, trained["encoder.weight"])
    assert torch.equal(average.state_dict("encoder")["weight"], torch.full((4, 3), 7.0))
    average.load_state_dict({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, part="head")
    assert torch.equal(average.average["head.weight"], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="missing"):
        average.load_state_dict({"weight": torch.zeros(2, 4)}, part="head")


def test_rows_kept_outside_the_parameters_are_swapped_saved_and_loaded_with_them():
    from megaclass.store.device import DeviceStore
    from megaclass.store.local import LocalRows

    encoder = nn.Linear(3, 4)
    store = DeviceStore(LocalRows(6, 4, seed=1))
    rows = {"head.store.weight": store.start_average(0.5)}
    average = WeightAverage({"encoder": encoder}, decay=0.5, rows=rows)
    start = store.local.weight.clone()
    store.push(torch.tensor([2]), torch.ones(1, 4), step=1, lr=0.5)
    average.update(step=1)
    trained = store.local.weight.clone()
    expected = start.clone()
    expected[2] = ema_rate(1) * start[2] + (1 - ema_rate(1)) * trained[2]
    saved = average.state_dict("head")
    assert set(saved) == {"store.weight"} and set(average.state_dict()) >= {"head.store.weight"}
    torch.testing.assert_close(saved["store.weight"], expected)
    with average.swapped():
        torch.testing.assert_close(store.read(0, 6), expected)
    assert torch.equal(store.local.weight, trained)
    copied = {"store.weight": saved["store.weight"].clone()}
    store.push(torch.tensor([0]), torch.ones(1, 4), step=2, lr=0.5)
    average.load_state_dict(copied, part="head", step=1)  # as it was after step 1
    assert torch.equal(average.state_dict("head")["store.weight"], expected)
    average.load_state_dict({}, part="head", step=7)  # a checkpoint without it: started from the rows
    assert torch.equal(average.state_dict("head")["store.weight"], store.local.weight)
    with pytest.raises(ValueError, match="unexpected"):
        average.load_state_dict({"other": torch.zeros(1)}, part="head")


def ema_rate(step: int, decay: float = 0.5) -> float:
    return min(decay, (1 + step) / (10 + step))
