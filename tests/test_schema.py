"""Typed config parsing: dataclasses from plain mappings, errors naming the key, overrides."""

import dataclasses
import enum
from typing import Literal

import pytest

from megaclass.schema import (
    ConfigError,
    convert,
    covered,
    from_dict,
    get_path,
    parse_override,
    set_path,
    to_dict,
)


class Colour(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Exact:
    type: Literal["exact"] = "exact"


@dataclasses.dataclass(frozen=True)
class Cluster:
    type: Literal["gpu"] = "gpu"
    probes: int = 8


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    sizes: tuple[int, ...] = (1, 2)


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    index: Exact | Cluster = dataclasses.field(default_factory=Exact)
    colour: Colour = Colour.RED
    flag: bool = False
    name: str | None = None


def test_nested_values_are_converted():
    config = from_dict(
        Outer,
        {"inner": {"rate": "2", "sizes": "3, 4"}, "index": {"type": "gpu", "probes": 2.0}, "colour": "blue"},
    )
    assert config == Outer(Inner(2.0, (3, 4)), Cluster(probes=2), Colour.BLUE)
    assert from_dict(Outer, {"index": "gpu", "flag": "yes"}) == Outer(index=Cluster(), flag=True)
    assert from_dict(Outer, None) == Outer()


def test_to_dict_is_the_inverse_in_plain_data():
    config = Outer(Inner(0.5, (7,)), Cluster(probes=3), Colour.BLUE, True, "x")
    plain = to_dict(config)
    assert plain == {
        "inner": {"rate": 0.5, "sizes": [7]},
        "index": {"type": "gpu", "probes": 3},
        "colour": "blue",
        "flag": True,
        "name": "x",
    }
    assert from_dict(Outer, plain) == config


@pytest.mark.parametrize(
    "data, message",
    [
        ({"speed": 1}, "unknown key.*'speed'"),
        ({"inner": {"rate": "fast"}}, "inner.rate: expected a finite number"),
        ({"inner": {"rate": float("inf")}}, "inner.rate: expected a finite number"),
        ({"inner": {"sizes": [1, 2.5]}}, r"inner.sizes\[1\]: expected an integer"),
        ({"inner": 3}, "inner: 3 given for a whole section"),
        ({"colour": "green"}, "colour: 'green' is not one of"),
        ({"flag": "maybe"}, "flag: expected true or false"),
        ({"index": {"type": "faiss"}}, "index"),
        ({"name": ["a"]}, "name"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


@pytest.mark.parametrize("value", [True, 2**63, "1.5"])
def test_integers_are_exact_and_in_int64(value):
    with pytest.raises(ConfigError):
        convert(int, value, "n")
    assert convert(int, "12", "n") == 12 and convert(int, 3.0, "n") == 3


def test_overrides_parse_as_yaml_and_set_nested_keys():
    assert parse_override("head.fan_in=32") == (["head", "fan_in"], 32)
    assert parse_override("data.path=a=b") == (["data", "path"], "a=b")
    assert parse_override("name=") == (["name"], "")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("head.fan_in")
    data = {"head": {"type": "dense"}, "lr": 1}
    set_path(data, ["head", "fan_in"], 32)
    set_path(data, ["train", "steps"], 5)
    assert data == {"head": {"type": "dense", "fan_in": 32}, "lr": 1, "train": {"steps": 5}}
    with pytest.raises(ConfigError, match="'lr' is not a section"):
        set_path(data, ["lr", "x"], 1)


def test_a_dotted_key_is_covered_by_itself_its_sections_and_with_inside_the_keys_within():
    keys = {"head.optimizer", "train.epochs"}
    assert covered("head.optimizer.lr", keys) and covered("train.epochs", keys)
    assert not covered("head", keys) and covered("head", keys, inside=True)
    assert not covered("train.batch_size", keys, inside=True)
    assert get_path({"head": {"optimizer": {"lr": 0.1}}}, ["head", "optimizer", "lr"]) == 0.1
