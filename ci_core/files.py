"""Reading the toolkit's small JSON files (bundle metadata, scan reports) with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from ci_core.errors import CIError

# What a JSON value that is not an object is, in JSON's own words.
_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
               type(None): "null"}


def read_json_object(path: str | Path, error_cls: type[CIError], what: str) -> dict:
    """The JSON object stored in ``path``.

    A missing file, text that is not JSON, or JSON that is not an object raises
    ``error_cls`` naming the file and ``what`` it should hold (e.g. "a scan report").
    """
    path = Path(path)
    if not path.is_file():
        raise error_cls(f"{path}: no such file; expected {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error_cls(f"{path}: not valid JSON ({exc}); expected {what}") from exc
    if not isinstance(data, dict):
        raise error_cls(f"{path}: holds {_JSON_KINDS[type(data)]}, not a JSON object; expected {what}")
    return data
