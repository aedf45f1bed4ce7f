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
