"""argparse `type=` helpers that refuse out-of-range numbers at the command line, naming the allowed range.

Flags that set a config field reuse that field's check (`spec_type`), so the flag and the key accept the same values.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from loopdlm.settings import NON_NEGATIVE, POSITIVE, PROBABILITY, Check, Range, field_check


def number(kind: type, check: Check) -> Callable[[str], Any]:
    """An argparse type: parse `kind` (int or float) and require `check`, e.g. number(float, Range(0, 1))."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {check}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def spec_type(cls: type, name: str, kind: type) -> Callable[[str], Any]:
    """The argparse type for a flag that sets field `name` of config dataclass `cls`: that field's check."""
    check = field_check(cls, name)
    return number(kind, check) if check is not None else kind


positive_int = number(int, POSITIVE)
non_negative_int = number(int, NON_NEGATIVE)
probability = number(float, PROBABILITY)
non_negative_float = number(float, NON_NEGATIVE)
positive_float = number(float, Range(0, low_open=True))

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
SEED_HELP = "random seed (same seed, same output)"

