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

    def describe(self) -> dict:
        return {"source": self.source, "inversion": len(self.inversion), "holdout": len(self.holdout),
                "image_files_found": self.files_found,
                "skipped_unreadable": len(self.skipped), "skipped_files": list(self.skipped[:20])}


@attrs.frozen(eq=False)
class FolderSample:
    images: torch.Tensor
    skipped: tuple[str, ...]  # unreadable files met, relative to the folder
    files_found: int


def load_folder(folder: Path, count: int, size: int, seed: int,
                progress: Callable[[str], None] | None = None) -> FolderSample:
    """``count`` readable images sampled from ``folder`` by ``seed``, and the unreadable files met."""
    if not folder.is_dir():
        raise DataError(f"OOD folder {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"OOD folder {folder} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
    random.Random(seed).shuffle(files)
    images, skipped = [], []
    reading = ReadProgress(progress, f"OOD folder {folder}", count)
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
            f"OOD folder {folder}: {len(images)} readable images, but the pool needs {count} "
            f"({len(files)} image files found, {len(skipped)} unreadable)"
        )
    return FolderSample(torch.stack(images), tuple(skipped), len(files))


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
