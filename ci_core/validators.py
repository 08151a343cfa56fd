"""Validators for the frozen attrs configs of plugins: every number finite and in range, every choice named.

attrs' own comparison validators let NaN through (every comparison with NaN is false, so ``gt(0)``
accepts it), accept ``True`` as the integer 1 and 4.0 as an epoch count, and raise errors whose
arguments are attrs internals.  These raise ``ConfigError`` with one line that names the field, what
it must be and the value given, e.g. "loss must be one of margin, ce, logit, got 'hinge'";
``ci_core.interfaces.make_config`` adds which plugin's options they are.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from ci_core.errors import ConfigError

Validator = Callable[[Any, Any, Any], None]


def is_finite_number(value: Any) -> bool:
    """An int or float (never a bool) that is not NaN or infinite; ints too large for a float are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def printable(text: str) -> str:
    """``text`` with every unprintable character escaped, so that an error message about it stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _bounds(gt, ge, lt, le) -> str:
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if lt is not None:
        parts.append(f"< {lt:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    return " and ".join(parts)


def _in_range(value, gt, ge, lt, le) -> bool:
    return ((gt is None or value > gt) and (ge is None or value >= ge)
            and (lt is None or value < lt) and (le is None or value <= le))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
           optional: bool = False) -> Validator:
    """A finite int or float within the bounds (None allowed where ``optional``)."""
    what = "a finite number" + (f" {_bounds(gt, ge, lt, le)}" if (gt, ge, lt, le) != (None,) * 4 else "")

    def check(instance, attribute, value) -> None:
        if optional and value is None:
            return
        if not is_finite_number(value) or not _in_range(value, gt, ge, lt, le):
            raise ConfigError(f"{attribute.name} must be {what}{' (or null)' if optional else ''}, got {_show(value)}")

    return check


def integer(*, ge: int | None = None, le: int | None = None, optional: bool = False) -> Validator:
    """An int (never a bool, never a float such as 4.0) within the bounds (None allowed where ``optional``)."""
    what = "an integer" + (f" {_bounds(None, ge, None, le)}" if (ge, le) != (None, None) else "")

    def check(instance, attribute, value) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not _in_range(value, None, ge, None, le):
            raise ConfigError(f"{attribute.name} must be {what}{' (or null)' if optional else ''}, got {_show(value)}")

    return check


def one_of(choices: Iterable[str]) -> Validator:
    """One of ``choices`` (compared exactly)."""
    choices = tuple(choices)

    def check(instance, attribute, value) -> None:
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(choices)}, got {_show(value)}")

    return check


def boolean(instance, attribute, value) -> None:
    """true or false (never 0 or 1)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, got {_show(value)}")
