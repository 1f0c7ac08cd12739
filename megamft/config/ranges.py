"""The allowed values of every numeric config key, declared with its type.

A numeric field of the schema is annotated with one of the aliases below
(``num_layers: Size = 2``), or with ``Annotated[int | float, Range(...)]`` where
none fits. ``validation.range_problems`` walks every field and checks its value
against the ``Range`` found in its annotation (inside ``Optional``, dict values
and list items too); a test fails when a numeric field has none, so a new key
cannot escape the check. Floats must also be finite: a NaN or an infinity is
never a meaningful setting.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Iterator


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric key: `low` and `high` (None: unbounded), each included unless `*_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, finite: bool = False) -> str:
        """'>= 1', 'in [0, 1)', ..., or 'a finite number > 0' when `finite` is what to stress."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            bounds = f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            bounds = ""
        return f"a finite number {bounds}".rstrip() if finite else bounds

    def problem(self, key: str, value: Any) -> str | None:
        """The message for a value outside the range, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or self.allows(value):
            return None
        return f"{key} must be {self.describe(not math.isfinite(value))}, got {value!r}"


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


Size = Annotated[int, Range(1)]
"""A size, a count of things that must exist, or an interval that cannot be zero."""
Count = Annotated[int, Range(0)]
"""A count or interval that may be zero (0 often means 'none' or 'only at the end')."""
Seed = Annotated[int, Range(0, 2**32 - 1)]
"""A random seed (numpy's legacy seeding, and so many tools, take 0 .. 2^32 - 1)."""
Positive = Annotated[float, Range(0, low_open=True)]
"""A finite float > 0 (epsilons, scales, temperatures)."""
NonNegative = Annotated[float, Range(0)]
"""A finite float >= 0 (coefficients, weights, learning rates)."""
Probability = Annotated[float, Range(0, 1)]
"""A finite float in [0, 1]."""


def declared_range(annotation: Any) -> Range | None:
    """The Range an annotation carries at its top level (Annotated[..., Range]), or None."""
    if typing.get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, Range)), None)
    return None


def leaves(annotation: Any, path: str = "") -> Iterator[tuple[str, Any, Range | None]]:
    """Every scalar type inside an annotation, with where it sits ('' itself, '{}' a dict value,
    '[]' a list item) and the Range declared for it (None: none declared)."""
    declared = declared_range(annotation)
    if declared is not None:
        annotation = typing.get_args(annotation)[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is not type(None):
                for where, leaf, found in leaves(option, path):
                    yield where, leaf, found or declared
    elif origin is dict:
        yield from leaves(args[1], path + "{}")
    elif origin in (list, tuple):
        for item in args:
            if item is not Ellipsis:
                yield from leaves(item, path + "[]")
    else:
        yield path, annotation, declared


def values_at(value: Any, where: str, key: str) -> Iterator[tuple[str, Any]]:
    """The values of a config value at a leaf position of its annotation ('{}': each dict value, ...)."""
    if not where:
        yield key, value
    elif where[:2] == "{}" and isinstance(value, dict):
        for name, item in value.items():
            yield from values_at(item, where[2:], f"{key}.{name}")
    elif where[:2] == "[]" and isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from values_at(item, where[2:], f"{key}[{index}]")
