"""The selector interface: the metric enum and the optional hooks' defaults."""

import pytest
import torch

from megaclass.index.base import ClassSelector, Metric


class _FirstRows(ClassSelector):
    """A minimal selector: the first ``n`` row ids, for the hooks it does not override."""

    def __init__(self) -> None:
        self.rows: int | None = None

    def build(self, weight, *, changed=None):
        self.rows = weight.shape[0]

    def query(self, features, n, *, metric=None):
        assert self.rows is not None
        return torch.arange(n).clamp_max(self.rows - 1).expand(features.shape[0], n)

    @property
    def is_built(self):
        return self.rows is not None


def test_metric_takes_its_names():
    assert Metric("cosine") is Metric.COSINE and Metric("dot") is Metric.DOT
    with pytest.raises(ValueError):
        Metric("l2")


def test_abstract_methods_are_required():
    with pytest.raises(TypeError):
        ClassSelector()  # type: ignore[abstract]


def test_optional_hooks_default_to_no_state_and_no_work():
    selector = _FirstRows()
    assert not selector.is_built
    selector.build(torch.zeros(3, 2))
    selector.wait()
    assert selector.is_built and selector.metrics() == {} and selector.state_dict() == {}
    selector.load_state_dict({})
    selector.close()
    assert selector.query(torch.zeros(2, 2), 4).tolist() == [[0, 1, 2, 2]] * 2
