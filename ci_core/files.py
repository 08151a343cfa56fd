"""Files and folders: reading the small JSON files with errors that name the file, writing atomically, output folders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ci_core.errors import CIError, ConfigError

# What a JSON value that is not an object is, in JSON's own words.
_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
               type(None): "null"}


# The largest JSON file read: the toolkit's own metadata and reports are far smaller, so anything larger is
# refused before it is read (a hostile file could otherwise take memory without bound).
MAX_JSON_BYTES = 64 * 1024**2


def read_json_object(path: str | Path, error_cls: type[CIError], what: str, *, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object stored in ``path``.

    A missing file, a file over ``max_bytes``, text that is not JSON (nesting too deep for the
    parser included), or JSON that is not an object raises ``error_cls`` naming the file and
    ``what`` it should hold (e.g. "a scan report").
    """
    path = Path(path)
    if not path.is_file():
        raise error_cls(f"{path}: no such file; expected {what}")
    size = path.stat().st_size
    if size > max_bytes:
        raise error_cls(f"{path}: {size} bytes, more than the {max_bytes} a JSON file here may have; expected {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error_cls(f"{path}: not valid JSON ({exc}); expected {what}") from exc
    except RecursionError:
        raise error_cls(f"{path}: JSON nested too deeply to read; expected {what}") from None
    if not isinstance(data, dict):
        raise error_cls(f"{path}: holds {_JSON_KINDS[type(data)]}, not a JSON object; expected {what}")
    return data


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (weights files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def slug(text: str, *, keep: str = "", limit: int | None = None) -> str:
    """``text`` as a file-name fragment: letters and digits (and the characters of ``keep``), the rest "_".

    ``limit`` caps the length: a class name may be as long as the context allows, a file name only 255 bytes.
    """
    return "".join(ch if ch.isalnum() or ch in keep else "_" for ch in text)[:limit]


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the body to write; on success it is renamed over ``path``.

    The one temp-then-rename of a file: on any exception (Ctrl-C included) the temporary file is removed and
    ``path`` is left as it was.  The file is made by the body, so it gets the mode any new file gets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (``atomic_file``).

    Non-finite floats are refused (JSON has no NaN), so a report can never carry one silently.
    """
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def temporary_folder(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A fresh folder in ``parent`` (named ``prefix`` + random) for the body to fill and then rename into place.

    The one temp-folder-then-rename: on any exception the folder is removed with everything in it.  What the
    rename replaces is the caller's (``publishing`` below, ``Store.writing``, ``save_bundle``).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- output folders
#
# Every folder a command writes (a scan, a demo, an attack's outputs, a bench report) carries a marker
# file naming what kind of output it is.  A folder is only ever replaced when it carries the marker of
# the same kind: a folder the user made, or another command's output, is never deleted.  The output
# is built in a temporary folder beside it, whose name says whose it is, and renamed into place whole.

OUTPUT_MARKER = ".clip-inspector-output.json"
_TMP_TAG = ".ci-tmp-"


def output_kind(folder: Path) -> str | None:
    """The kind of toolkit output ``folder`` holds (from its marker), or None if it is not one."""
    marker = folder / OUTPUT_MARKER
    if folder.is_symlink() or not marker.is_file() or marker.is_symlink():
        return None
    try:
        kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def check_output_folder(out: str | Path, kind: str, option: str = "--out") -> Path:
    """``out`` as an absolute path that may be written: missing, or an earlier ``kind`` output of this toolkit.

    Checked before any work, so a run never computes for minutes and then finds it cannot write.
    A symbolic link is refused (replacing it would replace the link, not what it points to).
    """
    out = Path(out)
    if out.is_symlink():
        raise ConfigError(f"{option} {out} is a symbolic link; give the folder it points to ({os.path.realpath(out)}) "
                          "or a new folder")
    out = out.absolute()
    if out.exists():
        found = output_kind(out)
        if found != kind:
            what = f"a {found} output, not a {kind} output" if found else "not a folder this toolkit wrote"
            raise ConfigError(f"{option} {out} exists and is {what}; it is never replaced: choose another folder")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Delete the temporary output folders in ``parent`` that a killed run of this toolkit left behind.

    Only folders named by ``publishing`` whose process no longer runs are removed.
    """
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        name = entry.name
        if not (name.startswith(".") and _TMP_TAG in name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            pid = int(name.split(_TMP_TAG, 1)[1].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def publishing(out: str | Path, kind: str, option: str = "--out") -> Iterator[Path]:
    """A fresh folder to build a ``kind`` output in; on success it replaces ``out`` whole, with its marker.

    ``out`` must pass ``check_output_folder``.  On any exception (Ctrl-C and, in the CLI, SIGTERM
    included) the temporary folder is removed and ``out`` is left as it was.
    """
    out = check_output_folder(out, kind, option)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    with temporary_folder(out.parent, f".{out.name}{_TMP_TAG}{os.getpid()}.") as work:
        yield work
        (work / OUTPUT_MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
        check_output_folder(out, kind, option)  # still ours: nothing else appeared there meanwhile
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_TAG}{os.getpid()}.old.", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(work, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(work, out)
