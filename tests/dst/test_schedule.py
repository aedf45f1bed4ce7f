"""DST config validation and the rewiring schedule (which fraction of connections moves at a step)."""

import math

import pytest

from megaclass.dst import DSTConfig, RewireMode, rewire_fraction
from megaclass.dst.schedule import stop_step
from megaclass.schema import ConfigError


def test_schedules():
    fraction = DSTConfig(mode=RewireMode.FRACTION, interval=10, fraction=0.4, stop=0.5)
    assert rewire_fraction(fraction, 5, 100) == 0.0  # not due
    assert rewire_fraction(fraction, 10, 100) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 10 / 50)))
    assert rewire_fraction(fraction, 50, 100) == 0.0  # stop point reached
    assert rewire_fraction(fraction, 40, None) == 0.4  # no total: constant, never stops
    interval = DSTConfig(mode="interval", interval=10, fraction=0.4, stop_step=30)
    assert [rewire_fraction(interval, s, 1000) for s in (10, 20, 30)] == [0.4, 0.4, 0.0]
    assert rewire_fraction(DSTConfig(enabled=False, interval=1), 1, 10) == 0.0


@pytest.mark.parametrize("bad", [{"interval": 0}, {"fraction": 1.5}, {"stop": 0.0}, {"threshold": -1.0}])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        DSTConfig(**bad)


def test_stop_step_is_a_fraction_of_the_run_or_an_explicit_step():
    assert stop_step(DSTConfig(stop=0.5), 100) == 50
    assert stop_step(DSTConfig(stop=0.5), None) == math.inf
    assert stop_step(DSTConfig(stop_step=30), 1000) == 30


def test_by_default_the_topology_freezes_after_two_thirds_of_the_run():
    config = DSTConfig(interval=10)
    assert rewire_fraction(config, 660, 1000) > 0.0
    assert rewire_fraction(config, 670, 1000) == rewire_fraction(config, 990, 1000) == 0.0
