"""Documented, range-checked config fields.

Every field of a config dataclass says what it means (`metadata["help"]`, printed by `loopdlm config --list`) and,
where only some values make sense, which ones (`metadata["check"]`, a `Range` or `OneOf`). `check_fields` applies
the checks of one dataclass; the command line reuses the same checks for its flags (`commands/arguments.py`), so a
config key and the flag that sets it accept the same values and say so in the same words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loopdlm.errors import ConfigError

HELP = "help"
CHECK = "check"


@dataclass(frozen=True)
class Range:
    """A number between `low` and `high` (either may be None = unbounded), ends closed unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # value != value: NaN
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of names."""

    choices: tuple[str, ...]

    def __call__(self, value: Any) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return "one of " + ", ".join(self.choices)


@dataclass(frozen=True)
class Each:
    """A non-empty list whose every item passes `item`."""

    item: Range

    def __call__(self, value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, int) and self.item(v) for v in value)

    def __str__(self) -> str:
        return f"a non-empty list of integers {self.item}"


Check = Callable[[Any], bool]

POSITIVE = Range(1)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)


def setting(default: Any = dataclasses.MISSING, help: str = "", check: Check | None = None,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its meaning and (optionally) its allowed values in the metadata."""
    metadata = {HELP: help} if check is None else {HELP: help, CHECK: check}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def check_value(name: str, value: Any, check: Check) -> None:
    """Raise ConfigError `name must be <allowed>, got <value>` unless `check(value)`."""
    if not check(value):
        raise ConfigError(f"{name} must be {check}, got {value!r}")


def check_fields(config: Any, prefix: str = "") -> None:
    """Check every field of the dataclass instance `config` that declares a check, and the fields of nested
    dataclasses (named 'prefix.field.'); a field whose default is None may also be None (= unset), no other may.
    `prefix` names the section in messages, e.g. 'train.'."""
    for spec in dataclasses.fields(config):
        check = spec.metadata.get(CHECK)
        value = getattr(config, spec.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{spec.name}.")
            continue
        if value is None and spec.default is not None:
            raise ConfigError(f"{prefix}{spec.name} needs a value")
        if check is not None and value is not None:
            check_value(prefix + spec.name, value, check)


def field_help(cls: type, name: str) -> str:
    """The documented meaning of field `name` of dataclass `cls` ('' when undocumented)."""
    return next(f.metadata.get(HELP, "") for f in dataclasses.fields(cls) if f.name == name)


def field_check(cls: type, name: str) -> Check | None:
    """The allowed-values check of field `name` of dataclass `cls`, if it declares one."""
    return next(f.metadata.get(CHECK) for f in dataclasses.fields(cls) if f.name == name)

