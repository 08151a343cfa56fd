"""The benchmark store: every finished cell of a sweep, filed by the hash of what determines it.

Layout of a store folder::

    store.json                 marks the folder as a store (format, version)
    models/<key>/cell.json     a trained model: its spec, metrics, target ...
    models/<key>/bundle/       ... the model bundle, and trigger.safetensors (+ .json) unless clean
    references/<key>/cell.json the detector run on the untuned backbone (zero-shot) ...
    references/<key>/reference.json  ... its per-class evidence (ci_core.scanning.reference)
    scans/<key>/cell.json      a scan of one model by one detector: its spec and verdict ...
    scans/<key>/scan/          ... report.json and the reconstructed triggers
    repairs/<key>/cell.json    a repair of one model by one repairer: ACC and ASR before and after ...
    repairs/<key>/bundle/      ... the repaired model
    floors/<key>/cell.json     a backdoored model's trigger on a clean model of its dataset: the repair's floor
    */<key>/manifest.json      the SHA-256 of every other file of the cell, written last
    failed/<key>.json          a cell that raised: its spec and the error (retried by the next run)
    declined/<key>.json        a cell with nothing to do (``NotApplicable``): its spec and the reason (not rerun)
    corrupt/<key>.<time>/      a finished cell whose files no longer match its manifest, moved aside
    plans/<hash>.json          the cells each `ci-bench run` planned
    .tmp/<key>.<random>/       cells being written right now
    .lock                      held by the running `ci-bench run`

A cell is written into a fresh folder under ``.tmp`` and renamed to its final
place only once complete, so a final folder is always whole: a run killed at
any moment leaves at most a folder under ``.tmp``, which the next run deletes
before redoing that cell.  A cell is reused only if its files still match its
manifest (``verify``); one that does not (a file edited, truncated or deleted)
is moved under ``corrupt/``, reported, and computed again.  The key is a hash of the cell's full spec (plugin
name and config, dataset, seed, backbone weights, pool sizes, the keys of the
upstream model and scan), so a changed setting never finds a stale result.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from ci_core.errors import ConfigError
from ci_core.files import file_sha256, read_json_object, temporary_folder, write_json_atomic
from ci_core.harness.records import RECORDS, VERSION, Record, spec_hash  # noqa: F401  (VERSION: the store's)
from ci_core.learning.protocol import MODEL_BUNDLE, MODEL_TRIGGER

FORMAT = "ci-bench-store"
MARKER = "store.json"
CELL_FILE = "cell.json"
MANIFEST = "manifest.json"
KINDS = {"model": "models", "reference": "references", "scan": "scans", "repair": "repairs", "floor": "floors"}
# What a finished cell holds besides cell.json and manifest.json.
SCAN_FOLDER = "scan"  # a scan cell's scan output (report.json, triggers/)
REFERENCE_FILE = "reference.json"  # a reference cell's scan of the backbone (ci_core.scanning.reference)


def write_json(path: Path, data) -> None:
    """Write ``path`` atomically (a temporary file beside it, then a rename); no NaN."""
    write_json_atomic(path, data)


def read_json(path: Path, what: str) -> dict:
    return read_json_object(path, ConfigError, what)


def _rename(src: Path, dst: Path) -> None:
    """The one step that publishes a cell (a module-level function so tests can interrupt it)."""
    os.replace(src, dst)


class Store:
    """A store folder; ``Store.open`` checks (or, with ``create``, makes) it."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def open(cls, root: str | Path, *, create: bool = False) -> "Store":
        root = Path(root)
        marker = root / MARKER
        if marker.is_file():
            meta = read_json(marker, "the store marker")
            if meta.get("format") != FORMAT:
                raise ConfigError(f"{marker}: format {meta.get('format')!r}, expected {FORMAT!r}")
            version = meta.get("version")
            if version != VERSION:
                earlier = isinstance(version, int) and not isinstance(version, bool) and version < VERSION
                why = ("written by an earlier clip-inspector, whose scans this one cannot reuse (they are not "
                       "paired with reference scans)" if earlier else "not one this clip-inspector knows")
                raise ConfigError(f"{root} is a version {version!r} store, {why}; this one reads version {VERSION}: "
                                  "give --out a new folder")
            return cls(root)
        if not create:
            raise ConfigError(f"{root} is not a ci-bench store (no {MARKER}); give the --out folder of `ci-bench run`")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ConfigError(f"--out {root} exists and is not a ci-bench store (no {MARKER}); choose another folder")
        root.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"format": FORMAT, "version": VERSION})
        return cls(root)

    # ------------------------------------------------------------------ places

    def cell_dir(self, kind: str, key: str) -> Path:
        return self.root / KINDS[kind] / key

    def bundle_path(self, kind: str, key: str) -> Path:
        """The bundle a model cell trained, or a repair cell repaired."""
        return self.cell_dir(kind, key) / MODEL_BUNDLE

    def trigger_path(self, model_key: str) -> Path:
        """A backdoored model cell's ground-truth trigger."""
        return self.cell_dir("model", model_key) / MODEL_TRIGGER

    def scan_folder(self, scan_key: str) -> Path:
        return self.cell_dir("scan", scan_key) / SCAN_FOLDER

    def reference_file(self, reference_key: str) -> Path:
        return self.cell_dir("reference", reference_key) / REFERENCE_FILE

    def failure_path(self, key: str) -> Path:
        return self.root / "failed" / f"{key}.json"

    def declined_path(self, key: str) -> Path:
        return self.root / "declined" / f"{key}.json"

    @property
    def tmp_root(self) -> Path:
        return self.root / ".tmp"

    # ------------------------------------------------------------------ state

    def is_done(self, kind: str, key: str) -> bool:
        return (self.cell_dir(kind, key) / MANIFEST).is_file()

    def is_declined(self, key: str) -> bool:
        return self.declined_path(key).is_file()

    def read_cell(self, kind: str, key: str) -> Record:
        """The typed record (``ci_core.harness.records``) a finished cell wrote, checked field by field."""
        path = self.cell_dir(kind, key) / CELL_FILE
        data = read_json(path, f"finished {kind} cell")
        if data.get("kind") != kind or data.get("key") != key:
            raise ConfigError(f"{path}: not the record of {kind} cell {key}")
        return RECORDS[kind].from_json(data, str(path))

    def verify(self, kind: str, key: str) -> str | None:
        """Why the finished cell ``key`` cannot be trusted (None if every file matches its manifest)."""
        folder = self.cell_dir(kind, key)
        try:
            manifest = read_json(folder / MANIFEST, "cell manifest")
            files = manifest.get("files")
            if not isinstance(files, dict) or CELL_FILE not in files:
                return "its manifest lists no files"
            present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
            if present != set(files):
                return f"its files differ from its manifest ({sorted(present ^ set(files))[:3]})"
            for name, digest in files.items():
                if file_sha256(folder / name) != digest:
                    return f"{name} does not match its recorded SHA-256"
            self.read_cell(kind, key)
        except (ConfigError, OSError) as exc:
            return str(exc)
        return None

    def set_aside(self, kind: str, key: str) -> Path:
        """Move a finished cell that failed ``verify`` under ``corrupt/``, out of the way of its recomputation."""
        target = self.root / "corrupt" / f"{key}.{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.cell_dir(kind, key), target)
        return target

    def cells(self, kind: str) -> list[Record]:
        """Every finished cell of ``kind`` whose files check out, sorted by key (see ``broken`` for the others)."""
        folder = self.root / KINDS[kind]
        if not folder.is_dir():
            return []
        return [self.read_cell(kind, d.name) for d in sorted(folder.iterdir())
                if self.is_done(kind, d.name) and self.verify(kind, d.name) is None]

    def broken(self) -> list[dict]:
        """Finished cells whose files do not check out: {kind, key, problem}."""
        found = []
        for kind, sub in KINDS.items():
            folder = self.root / sub
            for cell in sorted(folder.iterdir()) if folder.is_dir() else ():
                problem = self.verify(kind, cell.name)
                if problem is not None:
                    found.append({"kind": kind, "key": cell.name, "problem": problem})
        return found

    def failures(self) -> list[dict]:
        folder = self.root / "failed"
        if not folder.is_dir():
            return []
        return [read_json(p, "failure record") for p in sorted(folder.glob("*.json"))]

    def declines(self) -> list[dict]:
        """Cells that had nothing to do (``NotApplicable``), with the reason."""
        folder = self.root / "declined"
        if not folder.is_dir():
            return []
        return [read_json(p, "declined cell record") for p in sorted(folder.glob("*.json"))]

    def running(self) -> int:
        """Cells being written right now (folders under ``.tmp``)."""
        return sum(1 for _ in self.tmp_root.iterdir()) if self.tmp_root.is_dir() else 0

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the store by one `ci-bench run` (released by the OS if the process dies)."""
        with open(self.root / ".lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{self.root} is in use by another `ci-bench run`; wait for it to finish") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def discard_unfinished(self) -> list[str]:
        """Delete what killed runs left half-written (folders under ``.tmp``, final folders without cell.json)."""
        removed = []
        if self.tmp_root.is_dir():
            for leftover in sorted(self.tmp_root.iterdir()):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()
                removed.append(str(leftover.relative_to(self.root)))
        for sub in KINDS.values():
            folder = self.root / sub
            for cell in sorted(folder.iterdir()) if folder.is_dir() else ():
                if not (cell / MANIFEST).is_file():  # not made by this code (only whole folders are renamed here)
                    shutil.rmtree(cell, ignore_errors=True)
                    removed.append(str(cell.relative_to(self.root)))
        return removed

    @contextlib.contextmanager
    def writing(self, kind: str, key: str) -> Iterator[Path]:
        """A fresh folder to write cell ``key`` into; on success it becomes the cell's final folder.

        The body must write ``cell.json``; the manifest is written after it.  On any exception the folder is removed.
        """
        final = self.cell_dir(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with temporary_folder(self.tmp_root, f"{key}.") as work:
            yield work
            if not (work / CELL_FILE).is_file():
                raise RuntimeError(f"cell {key}: {CELL_FILE} was not written")
            files = {str(p.relative_to(work)): file_sha256(p) for p in sorted(work.rglob("*")) if p.is_file()}
            write_json(work / MANIFEST, {"files": files})
            if final.exists():  # a retried task finished twice: the first whole result stands
                shutil.rmtree(work)
            else:
                _rename(work, final)
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(key).unlink()

    def record_failure(self, record: dict) -> None:
        write_json(self.failure_path(record["key"]), {**record, "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def record_declined(self, record: dict) -> None:
        """File a cell that has nothing to do; a failure recorded for it earlier goes."""
        write_json(self.declined_path(record["key"]), {**record, "declined_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(record["key"]).unlink()

    def forget_declined(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.declined_path(key).unlink()

    def record_plan(self, plan: dict) -> Path:
        path = self.root / "plans" / f"{spec_hash(plan)[:16]}.json"
        if not path.exists():
            write_json(path, plan)
        return path

    def plans(self) -> list[dict]:
        folder = self.root / "plans"
        return [read_json(p, "sweep plan") for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
