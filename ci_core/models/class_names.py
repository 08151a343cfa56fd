"""Class names, as a bundle's ``classnames`` or an auditor's class file gives them: one set of rules for both.

A class list decides which classes a scan tests, so a list from the audited party must not be able to
hide the target: a second spelling of the target class ("Yellow Stripes" beside "yellow stripes") gives
CLIP the same prompt (its tokenizer folds case and reads underscores as spaces), splits the target's
score between two candidates and pins its margin near zero.  So every list, bundle or file:

* is normalised to Unicode NFC and stripped of surrounding spaces;
* holds printable text only (``str.isprintable``: no control, format, separator or unassigned
  characters, so no NUL, no line or paragraph separator, no invisible joiner), at most
  ``MAX_NAME_CHARS`` characters per name and ``MAX_CLASSES`` names;
* has no twins: two names with the same ``class_key`` (NFC, case-folded, underscores as spaces,
  runs of spaces as one) are refused, both named.

Checks are linear in the list's length (one dict of keys); a file is refused by its size before it is read.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Sequence

from ci_core.errors import CIError, DataError
from ci_core.validators import printable

# ImageNet, the largest class set of the CoOp benchmarks, has 1,000 classes; four times that is a bound no
# real deployment reaches, while 100,000 classes take minutes of tokenising before a scan even starts.
MAX_CLASSES = 4096
# CLIP's 77-token context holds about 300 characters of text; longer names could never fit a prompt.
MAX_NAME_CHARS = 300
# A class file of MAX_CLASSES names of MAX_NAME_CHARS characters of 4 UTF-8 bytes, with comments beside them.
MAX_CLASS_FILE_BYTES = 2 * MAX_CLASSES * (4 * MAX_NAME_CHARS + 2)


def class_key(name: str) -> str:
    """What a CLIP prompt keeps of ``name``: two names with one key are the same class to the model."""
    return " ".join(unicodedata.normalize("NFC", name).casefold().replace("_", " ").split())


def _show(name: str) -> str:
    return "'" + printable(name if len(name) <= 60 else name[:57] + "...") + "'"


def check_class_names(names: Sequence, where: str, error_cls: type[CIError] = DataError, *,
                      min_count: int = 1) -> tuple[str, ...]:
    """``names``, NFC-normalised and stripped, after the checks of the module docstring.

    Errors are ``error_cls`` with one line starting with ``where`` (e.g. "bundle.json: 'classnames'").
    """
    if len(names) > MAX_CLASSES:
        raise error_cls(f"{where}: {len(names)} class names, more than the {MAX_CLASSES} allowed")
    if len(names) < min_count:
        raise error_cls(f"{where}: needs at least {min_count} class names (found {len(names)})")
    seen: dict[str, str] = {}
    result = []
    for index, raw in enumerate(names):
        if not isinstance(raw, str):
            raise error_cls(f"{where}: class {index + 1} is {type(raw).__name__}, not text")
        name = unicodedata.normalize("NFC", raw).strip()
        if not name or len(name) > MAX_NAME_CHARS:
            raise error_cls(f"{where}: class {index + 1} ({_show(name)}) must be 1 to {MAX_NAME_CHARS} characters, "
                            f"has {len(name)}")
        if not name.isprintable():
            bad = next(c for c in name if not c.isprintable())
            raise error_cls(f"{where}: class {index + 1} ({_show(name)}) holds the unprintable character "
                            f"U+{ord(bad):04X}; a class name is printable text on one line")
        key = class_key(name)
        if key in seen:
            same = "is repeated" if seen[key] == name else f"and {_show(seen[key])} are one class to CLIP"
            raise error_cls(f"{where}: class {index + 1} {_show(name)} {same} (case, underscores and spacing "
                            "do not change a prompt); each class must be named once")
        seen[key] = name
        result.append(name)
    return tuple(result)


def read_class_list(path: str | Path, *, min_count: int = 2) -> tuple[str, ...]:
    """The classes of a class file: one per line, blank lines and lines starting with '#' skipped.

    Lines end at a line feed only (a carriage return before it is dropped): any other line or paragraph
    separator inside a line is an unprintable character, refused.
    """
    path = Path(path)
    what = "expected one class name per line"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CLASS_FILE_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc}); {what}") from exc
    if len(raw) > MAX_CLASS_FILE_BYTES:
        raise DataError(f"{path}: larger than {MAX_CLASS_FILE_BYTES} bytes, which no list of {MAX_CLASSES} class "
                        f"names of {MAX_NAME_CHARS} characters needs; {what}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); {what}") from exc
    lines = (line.removesuffix("\r").strip() for line in text.split("\n"))
    names = [line for line in lines if line and not line.startswith("#")]
    return check_class_names(names, str(path), DataError, min_count=min_count)
