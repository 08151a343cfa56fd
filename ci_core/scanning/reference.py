"""The reference scan: the same detector, run unchanged on the model's public backbone as a zero-shot classifier.

Why: with no backdoor at all some classes are easy to reach from any image,
and which ones is a property of the backbone, not of the provider (on the tiny
world the classes a clean CoCoOp model makes stand out are the ones the untuned
backbone makes stand out; per-class loss correlates at Pearson 0.98).  The
defender has that backbone (a CoCoOp model freezes both encoders; the bundle
names the backbone and its weights' hash), so each class can be judged against
what the backbone alone does with it.

The reference of a model is ``ZeroShotCLIP(backbone, template)``: CLIP's own
zero-shot classifier with the bundle's template ("a photo of a {}."), over the
same candidate classes, OOD pool, seed and detector config, each class drawing
the same trigger initialisation and batch order as in the model's scan
(``ci_core.scanning.inversion.class_generator``: the loop of
``ci_core.scanning.inversion`` is the one the model's scan runs).  For a zero-shot bundle (an image encoder
fine-tuned by the provider) the reference is the backbone it was fine-tuned
from, the same thing.

A reference depends only on ``reference_spec`` (the backbone as ``keys.backbone_key``
sees it: architecture, QuickGELU, weights, image size and statistics; template,
classes, the pool's images, seed, detector and config), not on the model, so it
is computed once and cached under the hash of that spec: auditing many models on
one backbone pays for it once.  A cache entry is JSON holding its spec, the
result, the SHA-256 of the result, and an HMAC-SHA256 of spec and result under a
key this toolkit creates on first use in the cache folder (``.hmac-key``, 32
random bytes, readable by its owner only).  A reference decides verdicts, so an
entry written anywhere else (copied from another machine, shipped beside a
delivery, planted by another user who can write the folder but not read the
key) does not check out; it is ignored and recomputed, never trusted, as is an
entry that is unreadable, whose spec is not the one asked for, or whose hash or
content does not check out.  Where the key itself cannot be trusted (a link, or
a file another user owns or can read), the cache is not used at all.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs

from ci_core.data.ood import OODPool
from ci_core.errors import CIError, ConfigError
from ci_core.files import read_json_object, write_json_atomic
from ci_core.keys import backbone_key, canonical_json, spec_hash
from ci_core.interfaces import ClassEvidence, Detector, Progress, Stopwatch, silent, to_json
from ci_core.models.backbone import Backbone
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.scanning.inversion import PoolHealth, evidence_from_json, health_from_json, invert_classes, pool_health
from ci_core.json_fields import JsonFields

# 2: per-class margins on T; the backbone key holds QuickGELU, image size and statistics; entries carry the
# machine's HMAC.  Entries of 1 lack all three and are computed again.
VERSION = 2
CACHE_ENV = "CI_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$CI_CACHE_DIR/references``, else ``$XDG_CACHE_HOME/clip-inspector/references`` (``~/.cache`` by default)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "references"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "clip-inspector" / "references"


def reference_spec(backbone: Backbone, template: str, classnames: Sequence[str], pool: OODPool, seed: int,
                   detector: Detector) -> dict:
    """Everything a reference scan depends on (its cache key is the hash of this)."""
    return {
        "kind": "reference", "version": VERSION,
        "backbone": backbone_key(backbone),
        "template": template, "classnames": list(classnames),
        "pool": {"inversion": len(pool.inversion), "holdout": len(pool.holdout), "sha256": pool.digest()},
        "seed": int(seed), "detector": detector.name, "detector_config": to_json(detector.config),
    }


@attrs.frozen(kw_only=True)
class ReferenceScan:
    """Per-class evidence of the detector on the untuned backbone (triggers are not kept)."""

    spec: dict
    classes: tuple[ClassEvidence, ...]
    health: PoolHealth
    seconds: float
    cached: bool = False  # read from a cache rather than computed now

    @property
    def key(self) -> str:
        return spec_hash(self.spec)

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.classes)

    def describe(self) -> dict:
        return {"key": self.key, "model": "zero-shot backbone", "template": self.spec["template"],
                "cached": self.cached, "seconds": self.seconds}

    def result_json(self) -> dict:
        return {"classes": [to_json(e) for e in self.classes], "health": to_json(self.health), "seconds": self.seconds}

    def to_json(self) -> dict:
        result = self.result_json()
        return {"spec": self.spec, "result": result, "result_sha256": spec_hash(result)}


class InvalidReference(CIError):
    """A stored reference that does not check out (never trusted; recomputed instead)."""


def reference_from_json(data: Any, spec: Mapping[str, Any], source: str) -> ReferenceScan:
    """A stored reference, checked field by field against the ``spec`` it must have been computed for."""
    if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
        raise InvalidReference(f"{source}: not a reference scan")
    if data.get("spec") != spec:
        raise InvalidReference(f"{source}: computed for another spec than the one asked for")
    result = data["result"]
    if data.get("result_sha256") != spec_hash(result):
        raise InvalidReference(f"{source}: its content does not match its recorded SHA-256")
    rows = result.get("classes")
    if not isinstance(rows, list) or [r.get("name") if isinstance(r, dict) else None for r in rows] != spec["classnames"]:
        raise InvalidReference(f"{source}: its classes are not the ones of its spec")
    # The rows and the pool health are read as a scan report's are (ci_core.scanning.inversion): one parser of each.
    classes = [evidence_from_json(row, f"{source}: classes[{index}]", InvalidReference) for index, row in enumerate(rows)]
    read = JsonFields(result, source, InvalidReference)
    health = health_from_json(read.child("health"))
    return ReferenceScan(spec=dict(spec), classes=tuple(classes), health=health, seconds=read.number("seconds"),
                         cached=True)


KEY_FILE = ".hmac-key"
_KEY_BYTES = 32


def _mac(key: bytes, data: dict) -> str:
    return hmac.new(key, canonical_json({"spec": data["spec"], "result": data["result"]}), "sha256").hexdigest()


class ReferenceCache:
    """A folder of reference scans, one JSON file per spec hash, each bound to this folder's key by an HMAC."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, spec: Mapping[str, Any]) -> Path:
        return self.folder / f"{spec_hash(spec)}.json"

    def _key(self, create: bool) -> bytes | None:
        """This cache's HMAC key, created on first use; None where there is none or it cannot be trusted."""
        path = self.folder / KEY_FILE
        if create and not os.path.lexists(path):
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                pass  # another process made it meanwhile: read theirs
            else:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(secrets.token_bytes(_KEY_BYTES))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            key = handle.read(_KEY_BYTES + 1)
        # A key that another user owns or can read could have signed (or could sign) anything.
        if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077
                or len(key) != _KEY_BYTES):
            return None
        return key

    def get(self, spec: Mapping[str, Any], progress: Progress = silent) -> ReferenceScan | None:
        path = self.path(spec)
        if not path.is_file():
            return None
        try:
            data = read_json_object(path, InvalidReference, "a cached reference scan")
            key = self._key(create=False)
            if key is None:
                raise InvalidReference(f"{self.folder / KEY_FILE}: no key of this cache that can be trusted (missing, "
                                       "a link, or owned or readable by another user), so no entry can be verified")
            if not isinstance(data, dict) or not isinstance(data.get("mac"), str) or not hmac.compare_digest(
                    data["mac"], _mac(key, data)):
                raise InvalidReference(f"{path}: not written by this toolkit with this cache's key (its HMAC does not "
                                       "check out)")
            return reference_from_json(data, spec, str(path))
        except InvalidReference as exc:
            progress(f"ignoring the cached reference {path}: {exc}; recomputing it")
            return None
        except (TypeError, ValueError) as exc:  # e.g. a spec or result that is not JSON-serialisable
            progress(f"ignoring the cached reference {path}: {type(exc).__name__}: {exc}; recomputing it")
            return None

    def put(self, reference: ReferenceScan, progress: Progress = silent) -> Path | None:
        key = self._key(create=True)
        if key is None:
            progress(f"not caching the reference: {self.folder / KEY_FILE} cannot be trusted (a link, or owned or "
                     "readable by another user)")
            return None
        data = reference.to_json()
        data["mac"] = _mac(key, data)
        path = self.path(reference.spec)
        write_json_atomic(path, data)
        return path


def run_reference(backbone: Backbone, template: str, detector: Detector, pool: OODPool, classnames: Sequence[str], *,
                  seed: int, cache: ReferenceCache | None = None, progress: Progress = silent) -> ReferenceScan:
    """The reference scan of ``classnames``: from ``cache`` when it holds a valid one, else computed (and cached)."""
    spec = reference_spec(backbone, template, classnames, pool, seed, detector)
    if cache is not None:
        found = cache.get(spec, progress)
        if found is not None:
            progress(f"reference scan {spec_hash(spec)[:12]} read from the cache {cache.folder}")
            return found
    clock = Stopwatch()
    model = ZeroShotCLIP(backbone, template, own_visual=False).eval()
    progress(f"reference scan: {detector.name} on the untuned backbone {backbone.name} as a zero-shot classifier "
             f"({len(classnames)} classes)")
    health = pool_health(model, pool, classnames)
    if health.non_finite:
        raise ConfigError(f"the backbone {backbone.name} itself gives non-finite logits on "
                          f"{health.non_finite} of {health.images} OOD images; check its weights")
    evidence, problems = invert_classes(model, detector, pool, classnames, seed=seed, progress=progress,
                                        label=f"reference {detector.name}")
    if problems:
        raise ConfigError(f"the reference scan on the backbone {backbone.name} failed: {'; '.join(problems)}")
    reference = ReferenceScan(spec=spec, classes=tuple(attrs.evolve(e, trigger=None) for e in evidence),
                              health=health, seconds=clock.seconds)
    if cache is not None:
        cache.put(reference, progress)
    return reference
