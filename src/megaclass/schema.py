"""Typed parsing of frozen config dataclasses from plain mappings (YAML, ``--set key=value``).

Unknown keys and wrong types are errors that name the key path, the value seen and what was expected.
Integers must fit in int64 and numbers must be finite (``1e400`` overflows to inf: an error, not a value).
A section is given as a mapping of its fields; a scalar stands for a whole section only when the section's
first field is a selector named ``type`` or ``kind`` (``head.margin=arcface`` sets ``margin.kind``), so
``train=5`` is an error rather than a silent reset of every other ``train`` field.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range; ``key``: the dotted key of an
    unknown one, where known."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, converting nested dataclasses, enums, tuples and scalars.

    >>> @dataclasses.dataclass(frozen=True)
    ... class Opt:
    ...     lr: float = 0.1
    >>> from_dict(Opt, {"lr": 1})
    Opt(lr=1.0)
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        guesses = [close for key in unknown for close in difflib.get_close_matches(str(key), fields, n=1)]
        meant = f" (did you mean {', '.join(map(repr, guesses))}?)" if guesses else ""
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {', '.join(map(repr, unknown))}{meant}; "
            f"known: {', '.join(sorted(fields))}",
            key=f"{where}.{unknown[0]}" if where else str(unknown[0]),
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: convert(hints[name], value, f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {error}") from None


def convert(hint: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to type ``hint`` or raise :class:`ConfigError` naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        variants = _variants(options)
        if variants is not None:
            return _convert_variant(variants, value, where)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on / off as true / false
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        converted = [convert(item, element, f"{where}[{i}]") for i, element in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            value = {_selector_field(hint, value, where): value}  # margin=arcface: {kind: arcface}
        return from_dict(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in hint]}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        number = _integer(value)
        if number is None:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if not _INT64_MIN <= number <= _INT64_MAX:
            raise ConfigError(f"{where}: {value!r} overflows: expected an integer in [-2^63, 2^63 - 1]")
        return number
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list, tuple)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported config type {hint!r}")


def _variants(options: tuple[Any, ...]) -> dict[str, type] | None:
    """``{type name: dataclass}`` when ``options`` are dataclasses told apart by a first field
    ``type: Literal[...]`` (a registered family, e.g. index configs); None otherwise."""
    variants: dict[str, type] = {}
    for option in options:
        if option is type(None):
            continue
        first = dataclasses.fields(option)[0] if dataclasses.is_dataclass(option) else None
        if first is None or first.name != "type":
            return None
        literal = typing.get_type_hints(option)["type"]
        if typing.get_origin(literal) is not typing.Literal:
            return None
        variants.update({name: option for name in typing.get_args(literal)})
    return variants or None


def _convert_variant(variants: dict[str, type], value: Any, where: str) -> Any:
    """The variant that ``value``'s ``type`` names (a scalar is the type; none given: the first variant)."""
    if any(isinstance(value, cls) for cls in variants.values()):
        return value
    if not isinstance(value, Mapping):
        value = {"type": value}
    name = value.get("type", next(iter(variants)))
    if name not in variants:
        raise ConfigError(f"{where}.type: {name!r} is not one of {list(variants)}")
    return from_dict(variants[name], value, where)


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SELECTOR_FIELDS = ("type", "kind")


def _integer(value: Any) -> int | None:
    """``value`` as an exact integer (ints, integral floats and their strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _selector_field(hint: type, value: Any, where: str) -> str:
    """The field a scalar given for section ``hint`` sets: its first field when that is a selector."""
    first = dataclasses.fields(hint)[0].name
    if first not in _SELECTOR_FIELDS:
        fields = ", ".join(field.name for field in dataclasses.fields(hint) if field.init)
        raise ConfigError(
            f"{where}: {value!r} given for a whole section: expected a mapping of its fields ({fields}); "
            f"set one field with {where}.<field>=value"
        )
    return first


def to_dict(config: Any) -> Any:
    """The plain-data form of a config dataclass (enums as values, tuples as lists), for YAML and JSON."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {field.name: to_dict(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, enum.Enum):
        return config.value
    if isinstance(config, (list, tuple)):
        return [to_dict(item) for item in config]
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a YAML-parsed value.

    >>> parse_override("head.fan_in=32")
    (['head', 'fan_in'], 32)
    """
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, for example head.fan_in=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def get_path(data: dict[str, Any], path: list[str]) -> Any:
    """``data[path[0]][path[1]]...``."""
    for key in path:
        data = data[key]
    return data


def covered(key: str, keys: Collection[str], *, inside: bool = False) -> bool:
    """Whether the dotted ``keys`` hold ``key`` or a section holding it (``inside``: or a key within it)."""
    parts = key.split(".")
    if any(".".join(parts[:end]) in keys for end in range(1, len(parts) + 1)):
        return True
    return inside and any(other.startswith(f"{key}.") for other in keys)


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating mappings on the way."""
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {key!r} is not a section")
        node = child
    node[path[-1]] = value
