"""Typed run configurations: one dataclass per config or argument set, checked when it is built.

A config class derives from `Schema` and declares each field with `setting(default, parse)`; `parse(name, value)`
returns the normalised value or raises a `ConfigError` that names the field and what it must be. The same class
checks a YAML file (`Schema.from_file`), a nested mapping (`Schema.from_dict`), command-line flags and Python
keyword arguments, so every value is checked once, before any model or data is loaded. YAML's quirks are
forgiven where the intent is clear: ``1e5`` (a string to PyYAML) and ``'256'`` are numbers.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

Parse = Callable[[str, Any], Any]
S = TypeVar("S", bound="Schema")


class ConfigError(ValueError):
    """A value a user gave is wrong; the message names the field (and file) and what to give instead."""


# ---------------------------------------------------------------- value parsers: (name, value) -> value


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """An integer (``3``, ``3.0``, ``'3'``, ``'1e5'``), not a bool, at least `minimum`."""
    number = _number(name, value, "an integer")
    if not float(number).is_integer():
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def as_float(name: str, value: Any) -> float:
    """A finite real number (numpy scalars and numeric strings included), not a bool."""
    return float(_number(name, value, "a number"))


def _number(name: str, value: Any, kind: str) -> numbers.Real:
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".en") else int(value)
        except ValueError:
            raise ConfigError(f"{name} must be {kind}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    return value


def integer(minimum: int | None = None) -> Parse:
    """Parser for an integer field, at least `minimum`."""
    return lambda name, value: as_int(name, value, minimum)


def positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    number = as_float(name, value)
    if number <= 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    return number


def one_of(*choices: Any) -> Parse:
    """Parser for a field that takes one of `choices`."""
    def parse(name: str, value: Any) -> Any:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    return parse


DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")


def text(name: str, value: Any) -> str:
    """A non-empty string (paths are taken as their string)."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value


def optional(parse: Parse) -> Parse:
    """Parser for a field that may also be None (null in YAML)."""
    return lambda name, value: None if value is None else parse(name, value)


def flag(name: str, value: Any) -> bool:
    """A bool (YAML true/false)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def directory(name: str, value: Any) -> str:
    """A directory to write into: it may not exist yet, but must not be a file."""
    path = Path(text(name, value))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}: {path} is a file; name a directory (new or existing) to write into")
    return str(path)


def given(cls: type[S]) -> Parse:
    """Parser for a sub-mapping checked by `cls`, kept as a plain dict of the keys given (normalised), so that
    what a config left out stays distinguishable from a default."""
    def parse(name: str, value: Any) -> dict[str, Any]:
        checked = cls.from_dict(value or {}, name)
        return {key: getattr(checked, key) for key in (value or {})}
    return parse


def mapping_of(parse: Parse) -> Parse:
    """Parser for a mapping from names to values that `parse` checks (named ``field[key]``)."""
    def parse_mapping(name: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping, got {type(value).__name__}")
        return {str(key): parse(f"{name}[{key}]", item) for key, item in value.items()}
    return parse_mapping


def list_of(parse: Parse) -> Parse:
    """Parser for a list whose items `parse` checks (named ``field[i]``)."""
    def parse_list(name: str, value: Any) -> list:
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {type(value).__name__}")
        return [parse(f"{name}[{i}]", item) for i, item in enumerate(value)]
    return parse_list


# ---------------------------------------------------------------- schemas


def setting(default: Any = MISSING, parse: Parse | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field: its default (or `factory` for mutable ones) and the parser that checks it."""
    if factory is not None:
        return field(default_factory=factory, metadata={"parse": parse})
    return field(default=default, metadata={"parse": parse})


@dataclass
class Schema:
    """Base of the typed configs: every field is parsed (checked, normalised) when an instance is built."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if parse := f.metadata.get("parse"):
                setattr(self, f.name, parse(f.name, getattr(self, f.name)))

    @classmethod
    def keys(cls) -> list[str]:
        """The field names."""
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        """The values by field name (not copied, unlike `dataclasses.asdict`)."""
        return {name: getattr(self, name) for name in self.keys()}

    @classmethod
    def from_dict(cls: type[S], data: Any, source: str = "config") -> S:
        """Build from a mapping; unknown keys and bad values raise a ConfigError prefixed with `source`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a mapping of {', '.join(cls.keys())}; got {type(data).__name__}")
        if unknown := sorted(set(map(str, data)) - set(cls.keys())):
            raise ConfigError(f"{source}: unknown keys {unknown}; allowed: {sorted(cls.keys())}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                   and f.name not in data]
        if missing:
            raise ConfigError(f"{source}: missing {', '.join(missing)} (required)")
        try:
            return cls(**data)
        except ValueError as err:  # ConfigError, or a check shared with the Python API
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls: type[S], path: str | Path, **overrides: Any) -> S:
        """Read a YAML file, set the `overrides` that are not None (flags given), and check it all."""
        data = load_config(path)
        return cls.from_dict(override(data, **overrides), str(path))


# ---------------------------------------------------------------- YAML


def load_config(path: str | Path, allowed: set[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping; with `allowed`, unknown top-level keys are an error (typos fail loudly)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping, got {type(data).__name__}")
    if allowed is not None and (unknown := set(data) - allowed):
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return data


def override(config: dict[str, Any], **values: Any) -> dict[str, Any]:
    """Copy of `config` with the given values set, skipping those that are None (flags not given)."""
    return {**config, **{k: v for k, v in values.items() if v is not None}}
