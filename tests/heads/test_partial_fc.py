"""Partial FC: positives plus uniformly random classes, through SelectedHead's selection and loss."""

import math

import pytest
import torch

from megaclass.heads import HeadContext, build_head, head_config
from megaclass.heads.selected import SelectedHead
from megaclass.schema import ConfigError


def _head(num_classes=101, **options) -> SelectedHead:
    config = head_config({"type": "partial_fc", "coverage_every": 0, **options})
    return build_head(config, HeadContext(in_features=8, num_classes=num_classes, multilabel=False))


@pytest.mark.parametrize("rate,batch", [(0.1, 4), (0.05, 9), (0.99, 3), (0.01, 1)])
def test_active_set_is_positives_plus_random(rate, batch):
    head = _head(sample_num=rate)
    assert isinstance(head, SelectedHead) and head.selector is None
    targets = torch.randint(101, (batch,))
    features = torch.randn(batch, 8, requires_grad=True)
    loss = head(features, targets)
    loss.backward()
    ids, rows = head._pending
    positives = torch.unique(targets)
    assert ids.numel() == max(math.ceil(rate * 101), positives.numel())
    assert torch.unique(ids).numel() == ids.numel()
    assert torch.equal(ids[: positives.numel()], positives)
    assert head.metrics()["neighbour_classes"] == 0
    weight = head.store.rows()[ids].clone().requires_grad_(True)
    x = features.detach().clone().requires_grad_(True)
    position = torch.searchsorted(positives, targets)
    expected = torch.nn.functional.cross_entropy(x @ weight.T, position)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(features.grad, x.grad)
    torch.testing.assert_close(rows.grad, weight.grad)


def test_random_classes_change_between_steps_and_loss_falls():
    head = _head(sample_num=0.2)
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(101, 8, generator=generator)
    seen, losses = [], []
    for step in range(1, 61):
        targets = torch.randint(101, (16,), generator=generator)
        loss = head(centres[targets], targets)
        loss.backward()
        seen.append(set(head._pending[0].tolist()))
        head.after_step(step, 0.0, lr=0.5)
        losses.append(float(loss.detach()))
    assert seen[0] != seen[1]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_partial_fc_is_the_selected_head_with_random_classes():
    config = head_config({"type": "partial_fc", "store": "host", "logq_correction": True})
    assert (config.type, config.sample_num, config.index.type, config.store) == (
        "partial_fc",
        0.1,
        "none",
        "host",
    )
    assert config.active_classes(1000) == 100
    assert head_config({"type": "partial_fc", "sample_num": 250}).active_classes(1000) == 250
    with pytest.raises(ConfigError, match="sample_num"):
        head_config({"type": "partial_fc", "sample_num": 0})
    with pytest.raises(ConfigError, match="partial_fc draws its classes at random"):
        head_config({"type": "partial_fc", "index": "gpu"})


def test_a_setting_of_another_head_names_the_heads_it_belongs_to():
    message = r"head.sample_num: a setting of the partial_fc and selected heads, not of the dense head"
    with pytest.raises(ConfigError, match=message + r" \(--head partial_fc or --head selected\)"):
        head_config({"sample_num": 0.05})
    with pytest.raises(ConfigError, match="head.fan_in: a setting of the sparse head, not of the partial_fc"):
        head_config({"type": "partial_fc", "fan_in": 8})
    with pytest.raises(ConfigError, match="head: unknown key.*'bogus'"):
        head_config({"type": "sparse", "bogus": 1})
