"""How a config field declares its limits (``option``) and how a section lists its cross-field rules.

``option(default, allowed, choices=..., check=...)`` puts the field's choices or its range
(in words, parsed into the test, so the two cannot drift apart) beside the field.
``_Section.problems()`` yields (field, allowed) pairs for rules that tie a section's fields
together. ``FrozenTable`` is how a frozen section holds a table (a TOML inline table). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class FrozenTable(dict):
    """A string -> string table as a frozen config section holds it: read-only and hashable, so the
    section stays usable as a cache key; it is still a ``dict`` for JSON, equality and ``asdict``."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def _read_only(self, *args, **kwargs):
        raise TypeError("a config table is read-only; build a new section with dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _read_only

    def __reduce__(self):
        return (FrozenTable, (dict(self),))


# A range in words, as the error shows it: "an integer >= 1", "a number > 0 (note)", "a number in [0, 1)".
_RANGE = re.compile(r"(?:an integer|a number) (?:(>=?) ([-\d.]+)|in ([\[(])([-\d.]+), ([-\d.]+)([\])]))")


def _range_check(allowed: str) -> Callable[[Any], bool]:
    """The test that a range in words states (a note after the range is for the reader only)."""
    match = _RANGE.match(allowed)
    if match is None:
        raise ValueError(f"not a range in words: {allowed!r}; pass check= as well")
    op, bound, left, low, high, right = match.groups()
    if op:
        limit = float(bound)
        return (lambda v: v >= limit) if op == ">=" else (lambda v: v > limit)
    lo, hi = float(low), float(high)
    return lambda v: (lo <= v if left == "[" else lo < v) and (v <= hi if right == "]" else v < hi)


def option(default: Any, allowed: str = "", *, choices: tuple = (), check: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with its limit: one of ``choices``, or what ``allowed`` says.

    ``allowed`` is the error's "expected ..." text. A range ("an integer >= 1", "a number in
    (0, 1]") is its own test; anything else states its test as ``check``.
    """
    if choices:
        allowed, check = "one of " + ", ".join(repr(c) for c in choices), choices.__contains__
    return field(default=default, metadata={"choices": choices, "check": check or _range_check(allowed),
                                            "allowed": allowed})


# The optimizer fields of [train] and [dpo]: one declaration each (default and limit), listed by each section
# where it wants them. A shared base class would put them first in both, reordering their repr and dicts.
def _learning_rate() -> Any:
    return option(1e-3, "a number > 0")


def _lr_schedule() -> Any:
    return option("cosine", choices=("constant", "linear", "cosine"))


def _warmup_steps() -> Any:
    return option(0, "an integer >= 0")


def _max_grad_norm() -> Any:
    return option(1.0, "a number >= 0 (0 disables clipping)")


class _Section:
    """A config section. One whose fields constrain each other says how in ``problems``."""

    def problems(self) -> Iterator[tuple[str, str]]:
        """(field, what is allowed) for each broken rule between this section's fields."""
        return iter(())
