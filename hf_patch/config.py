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
import os
import reprlib
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

Parse = Callable[[str, Any], Any]
S = TypeVar("S", bound="Schema")


class ConfigError(ValueError):
    """A value a user gave is wrong; the message names the field (and file) and what to give instead."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 2, 60, 40, 60
_REPR.maxtuple = _REPR.maxlist = _REPR.maxarray = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4
SHOWN_LENGTH = 80


def shown(value: Any) -> str:
    """`value` as a message shows it: its repr, abridged (nested and long values elided) to at most 80 characters,
    so that no value a user gave, however large, makes a long message or a slow one."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_LENGTH else text[:SHOWN_LENGTH - 3] + "..."


# ---------------------------------------------------------------- value parsers: (name, value) -> value


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """An integer (``3``, ``3.0``, ``'3'``, ``'1e5'``), not a bool, at least `minimum`."""
    number = _number(name, value, "an integer")
    if not float(number).is_integer():
        raise ConfigError(f"{name} must be an integer, got {shown(value)}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {shown(value)}")
    return int(number)


def as_float(name: str, value: Any) -> float:
    """A finite real number (numpy scalars and numeric strings included), not a bool."""
    return float(_number(name, value, "a number"))


def _number(name: str, value: Any, kind: str) -> numbers.Real:
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".en") else int(value)
        except ValueError:
            raise ConfigError(f"{name} must be {kind}, got {shown(value)}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be {kind}, got {shown(value)}")
    return value


def integer(minimum: int | None = None) -> Parse:
    """Parser for an integer field, at least `minimum`."""
    return lambda name, value: as_int(name, value, minimum)


def positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    number = as_float(name, value)
    if number <= 0:
        raise ConfigError(f"{name} must be a number > 0, got {shown(value)}")
    return number


def one_of(*choices: Any) -> Parse:
    """Parser for a field that takes one of `choices`."""
    def parse(name: str, value: Any) -> Any:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {shown(value)}")
        return value
    return parse


DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")


def text(name: str, value: Any) -> str:
    """A non-empty string (paths are taken as their string)."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {shown(value)}")
    return value


def optional(parse: Parse) -> Parse:
    """Parser for a field that may also be None (null in YAML)."""
    return lambda name, value: None if value is None else parse(name, value)


def flag(name: str, value: Any) -> bool:
    """A bool (YAML true/false)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {shown(value)}")
    return value


def directory(name: str, value: Any) -> str:
    """A directory to write into: it may not exist yet, but must not be a file, and the directory itself or, when
    it does not exist yet, the nearest one above it that does must take a new file (tried, not inferred from its
    permission bits: a read-only file system, or root's writes to sysfs, fail too)."""
    path = Path(text(name, value))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}: {path} is a file; name a directory (new or existing) to write into")
    existing = path.absolute()
    while not existing.is_dir():
        if existing.exists():  # a file above it: the directory cannot be made
            raise ConfigError(f"{name}: {existing} is a file, so {path} cannot be made; name another directory")
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{name}: cannot write into {existing} ({os.strerror(err.errno) if err.errno else err}); "
                          f"name a directory you can write to") from None
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


def setting(default: Any = MISSING, parse: Parse | None = None, factory: Callable[[], Any] | None = None,
            help: str | None = None) -> Any:
    """A schema field: its default (or `factory` for mutable ones), the parser that checks it and an optional
    one-line `help` (what command-line flags generated from the schema show)."""
    metadata = {"parse": parse, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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
            raise ConfigError(f"{source}: unknown keys [{', '.join(map(shown, unknown))}]; allowed: "
                              f"{sorted(cls.keys())}")
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


def _plain_loader():
    """PyYAML's safe loader without anchors and aliases (``&name``, ``*name``, ``<<: *name``): a config never needs
    them, and nested aliases expand a few hundred bytes into billions of values."""
    import yaml

    class PlainLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ConfigError(f"line {event.start_mark.line + 1}: YAML anchors and aliases (&{event.anchor}, "
                                  f"*{event.anchor}) are not allowed in a config; write each value out")
            return super().compose_node(parent, index)

    return PlainLoader


def load_config(path: str | Path, allowed: set[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping (anchors and aliases refused); with `allowed`, unknown top-level keys are an error (typos
    fail loudly)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_plain_loader()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping, got {type(data).__name__}")
    if allowed is not None and (unknown := set(data) - allowed):
        raise ConfigError(f"{path}: unknown keys [{', '.join(map(shown, sorted(map(str, unknown))))}]; allowed: "
                          f"{sorted(allowed)}")
    return data


def override(config: dict[str, Any], **values: Any) -> dict[str, Any]:
    """Copy of `config` with the given values set, skipping those that are None (flags not given)."""
    return {**config, **{k: v for k, v in values.items() if v is not None}}
