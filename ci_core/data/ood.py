"""Unlabelled OOD image pools: the inversion set D and the held-out set T of a scan.

``load_pool("builtin", ...)`` renders the tiny world's OOD images; any other
source is a folder searched recursively for JPEG, PNG and WebP files (any case
of suffix), which are converted to RGB (grayscale, 16-bit grayscale, palette,
CMYK, alpha) and resized and centre-cropped as CLIP's preprocessing does (see
``ci_core.data.images``).  The files are shuffled by the seed and read in that
order until the pool is full, so only the images the pool needs are decoded.
Unreadable files (corrupt, truncated, not an image) are skipped and counted,
never fatal, unless too few readable images remain.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Callable

import attrs
import torch

from ci_core.data import tiny_world
from ci_core.data.images import IMAGE_SUFFIXES, UNREADABLE, ReadProgress, read_image
from ci_core.errors import DataError

__all__ = ["BUILTIN", "IMAGE_SUFFIXES", "OODPool", "load_folder", "load_pool", "read_image"]

BUILTIN = "builtin"


@attrs.frozen(kw_only=True, eq=False)
class OODPool:
    inversion: torch.Tensor  # D
    holdout: torch.Tensor  # T
    source: str
    skipped: tuple[str, ...] = ()  # unreadable files passed over while sampling
    files_found: int | None = None  # image files in the folder (None for the builtin pool)
    _digest: str | None = attrs.field(default=None, init=False, repr=False)

    def describe(self) -> dict:
        return {"source": self.source, "inversion": len(self.inversion), "holdout": len(self.holdout),
                "image_files_found": self.files_found, "sha256": self.digest(),
                "skipped_unreadable": len(self.skipped), "skipped_files": list(self.skipped[:20])}

    def digest(self) -> str:
        """SHA-256 of the images themselves (D, then T): what any result computed on this pool depends on."""
        if self._digest is None:
            sha = hashlib.sha256()
            for part in (self.inversion, self.holdout):
                sha.update(f"{tuple(part.shape)};".encode())
                sha.update(part.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            object.__setattr__(self, "_digest", sha.hexdigest())
        return self._digest


@attrs.frozen(eq=False)
class FolderSample:
    images: torch.Tensor
    skipped: tuple[str, ...]  # unreadable files met, relative to the folder
    files_found: int


def load_folder(folder: Path, count: int, size: int, seed: int,
                progress: Callable[[str], None] | None = None, what: str = "OOD folder") -> FolderSample:
    """``count`` readable images sampled from ``folder`` by ``seed``, and the unreadable files met; errors name the
    folder as ``what``."""
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{what} {folder} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
    random.Random(seed).shuffle(files)
    images, skipped = [], []
    reading = ReadProgress(progress, f"{what} {folder}", count)
    for path in files:
        if len(images) == count:
            break
        try:
            images.append(read_image(path, size))
        except UNREADABLE:
            skipped.append(str(path.relative_to(folder)))
        reading.step(len(images))
    if len(images) < count:
        raise DataError(
            f"{what} {folder}: {len(images)} readable images, but the pool needs {count} "
            f"({len(files)} image files found, {len(skipped)} unreadable)"
        )
    return FolderSample(torch.stack(images), tuple(skipped), len(files))


def source_fingerprint(source: str | Path) -> str:
    """What a pool drawn from ``source`` depends on, cheaply: 'builtin', or a SHA-256 over the image files of the
    folder (relative path, size and modification time of each), so that refilling a folder changes it."""
    if str(source) == BUILTIN:
        return BUILTIN
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(f"OOD folder {folder} does not exist or is not a directory")
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        stat = path.stat()
        sha.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{folder.resolve()}#sha256:{sha.hexdigest()}"


def load_pool(source: str | Path, *, inversion: int, holdout: int, image_size: int, seed: int,
              progress: Callable[[str], None] | None = None) -> OODPool:
    """Sample ``inversion + holdout`` images by ``seed``: the first ``inversion`` are D, the rest T."""
    if inversion < 1 or holdout < 1:
        raise DataError(f"the OOD pool needs at least one inversion and one held-out image, got {inversion} and {holdout}")
    total = inversion + holdout
    if str(source) == BUILTIN:
        images, skipped, found = tiny_world.ood_pool(total, image_size, seed), (), None
    else:
        sample = load_folder(Path(source), total, image_size, seed, progress)
        images, skipped, found = sample.images, sample.skipped, sample.files_found
    return OODPool(inversion=images[:inversion], holdout=images[inversion:], source=str(source), skipped=skipped,
                   files_found=found)


ID_FOLDER = "in-distribution folder"
OWN_FOLDER = "own-images folder"


def check_folder_labels(folder: Path, classnames, what: str = ID_FOLDER) -> None:
    """A folder of in-distribution images is unlabelled, or holds one subfolder per class (the class name, spaces
    or underscores): a subfolder that names no candidate class is an error naming it."""
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist or is not a directory")
    known = {name for c in classnames for name in (c, c.replace(" ", "_"))}
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in known)
    if unknown:
        raise DataError(f"{what} {folder}: subfolders {', '.join(repr(u) for u in unknown[:10])}"
                        f"{' ...' if len(unknown) > 10 else ''} name no candidate class (a subfolder is read as a "
                        "class label; put the images of other classes elsewhere, or give them unlabelled)")


def folder_classes(folder: Path, classnames) -> tuple[str, ...]:
    """The candidate classes a folder of labelled images holds (one subfolder per class, the class name with spaces
    or underscores), in candidate order; every image must be in a class's subfolder and every subfolder hold one."""
    check_folder_labels(folder, classnames, OWN_FOLDER)
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise DataError(f"{OWN_FOLDER} {folder}: {len(loose)} image file(s) ({', '.join(map(repr, loose[:3]))}"
                        f"{' ...' if len(loose) > 3 else ''}) lie outside the class subfolders; put each image in "
                        "the subfolder of its class")
    # Matched against the folder's own entries, never joined from a class name (the bundle's, untrusted).
    subfolders = {p.name: p for p in folder.iterdir() if p.is_dir()}
    linked = sorted(name for name, p in subfolders.items() if p.is_symlink())
    if linked:
        raise DataError(f"{OWN_FOLDER} {folder}: subfolders {', '.join(map(repr, linked[:5]))} are links, which the "
                        "images are not read through; put each class's images in the folder itself")
    classes, empty = [], []
    for name in classnames:
        folders = [subfolders[label] for label in dict.fromkeys((name, name.replace(" ", "_"))) if label in subfolders]
        if not folders:
            continue
        if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for f in folders for p in f.rglob("*")):
            classes.append(name)
        else:
            empty.append(name)
    if empty:
        raise DataError(f"{OWN_FOLDER} {folder}: the subfolders of {', '.join(map(repr, empty[:5]))} hold no images")
    if not classes:
        raise DataError(f"{OWN_FOLDER} {folder} has no class subfolders: it needs one subfolder of images per class "
                        "you deploy, named by the class")
    return tuple(classes)


def load_own_images(folder: Path, classnames, *, inversion: int, holdout: int, image_size: int, seed: int,
                    progress: Callable[[str], None] | None = None) -> tuple[OODPool, tuple[str, ...]]:
    """The auditor's own labelled images of the classes it deploys, as a pool (D and T both drawn from ``folder``
    by ``seed``), and those classes (``folder_classes``): what a scan of the deployed classes inverts on."""
    classes = folder_classes(folder, classnames)
    sample = load_folder(folder, inversion + holdout, image_size, seed, progress, what=OWN_FOLDER)
    return OODPool(inversion=sample.images[:inversion], holdout=sample.images[inversion:],
                   source=f"{folder} (own images of {len(classes)} classes: D and T)", skipped=sample.skipped,
                   files_found=sample.files_found), classes


def with_inversion_folder(pool: OODPool, folder: Path, classnames, *, image_size: int, seed: int,
                          progress: Callable[[str], None] | None = None) -> OODPool:
    """``pool`` with D drawn from the auditor's own in-distribution images in ``folder`` (as many as D had; their
    labels unused); T stays the held-out OOD images, so ASR is measured as before."""
    check_folder_labels(folder, classnames)
    sample = load_folder(folder, len(pool.inversion), image_size, seed, progress, what=ID_FOLDER)
    return OODPool(inversion=sample.images, holdout=pool.holdout,
                   source=f"{pool.source} (held-out T); {folder} (inversion D, in-distribution)",
                   skipped=pool.skipped + tuple(f"{folder}/{s}" for s in sample.skipped),
                   files_found=pool.files_found)
