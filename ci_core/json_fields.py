"""Typed reading of JSON objects that a stranger may have written: one field at a time, every error naming where.

``JsonFields(data, where, error)`` checks that ``data`` is an object; each accessor (``number``, ``integer``,
``text``, ``flag``, ``texts``, ``numbers``, ``mapping``, ``rows``, ``child``) returns the field as its type or
raises ``error`` naming ``where`` and the key.  Numbers must be finite (JSON has no NaN; a file may still
spell one).  The scan report, the reference cache and the per-class evidence read through it.
"""

from __future__ import annotations

import math
from typing import Any

from ci_core.errors import DataError


class JsonFields:
    """Field-by-field reading of one JSON object, every error naming the file and the key."""

    def __init__(self, data: Any, where: str, error: type[Exception] = DataError):
        if not isinstance(data, dict):
            raise error(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data, self.where, self.error = data, where, error

    def fail(self, key: str, expected: str, value: Any) -> None:
        shown = repr(value)
        raise self.error(f"{self.where}: '{key}' must be {expected}, got {shown[:80]}{'...' if len(shown) > 80 else ''}")

    def has(self, key: str) -> bool:
        return key in self.data

    def number(self, key: str, *, optional: bool = False, default: Any = None) -> float | None:
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, "a finite number" + (" or null" if optional else ""), value)
        return float(value)

    def integer(self, key: str, *, optional: bool = False, default: Any = None) -> int | None:
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, "an integer" + (" or null" if optional else ""), value)
        return int(value)

    def text(self, key: str, *, optional: bool = False, default: Any = None) -> str | None:
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(key, "a string" + (" or null" if optional else ""), value)
        return value

    def flag(self, key: str, *, optional: bool = False, default: Any = None) -> bool | None:
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            self.fail(key, "true or false" + (" or null" if optional else ""), value)
        return value

    def texts(self, key: str, *, default: Any = None) -> tuple[str, ...]:
        value = self.data.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, "a list of strings", value)
        return tuple(value)

    def numbers(self, key: str, *, default: Any = None) -> tuple[float, ...]:
        value = self.data.get(key, default)
        if not isinstance(value, list) or not all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in value):
            self.fail(key, "a list of finite numbers", value)
        return tuple(float(v) for v in value)

    def mapping(self, key: str, *, optional: bool = False, default: Any = None) -> dict | None:
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            self.fail(key, "a JSON object" + (" or null" if optional else ""), value)
        return value

    def rows(self, key: str) -> list:
        value = self.data.get(key)
        if not isinstance(value, list):
            self.fail(key, "a list", value)
        return value

    def child(self, key: str, *, optional: bool = False) -> "JsonFields | None":
        value = self.mapping(key, optional=optional)
        return None if value is None else JsonFields(value, f"{self.where}: {key}", self.error)
