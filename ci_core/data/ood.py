"""Unlabelled OOD image pools: the inversion set D and the held-out set T of a scan.

``load_pool("builtin", ...)`` renders the tiny world's OOD images; any other
source is a folder searched recursively for JPEG, PNG and WebP files, which are
converted to RGB (grayscale, palette, CMYK, alpha), resized on the shorter side
and centre-cropped.  Unreadable files are skipped and counted, never fatal,
unless too few readable images remain.
"""

from __future__ import annotations

import random
from pathlib import Path

import attrs
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ci_core.data import tiny_world
from ci_core.errors import DataError

BUILTIN = "builtin"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@attrs.frozen(kw_only=True, eq=False)
class OODPool:
    inversion: torch.Tensor  # D
    holdout: torch.Tensor  # T
    source: str
    skipped: tuple[str, ...] = ()  # unreadable files passed over

    def describe(self) -> dict:
        return {"source": self.source, "inversion": len(self.inversion), "holdout": len(self.holdout),
                "skipped_unreadable": len(self.skipped), "skipped_files": list(self.skipped[:20])}


def read_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) float image in [0, 1]; raises OSError/ValueError for unreadable files."""
    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
    scale = size / min(rgb.size)
    resized = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def load_folder(folder: Path, count: int, size: int, seed: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """``count`` readable images sampled from ``folder`` by ``seed``, and the unreadable files met."""
    if not folder.is_dir():
        raise DataError(f"OOD folder {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"OOD folder {folder} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
    random.Random(seed).shuffle(files)
    images, skipped = [], []
    for path in files:
        if len(images) == count:
            break
        try:
            images.append(read_image(path, size))
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
            skipped.append(str(path.relative_to(folder)))
    if len(images) < count:
        raise DataError(
            f"OOD folder {folder}: {len(images)} readable images, but the pool needs {count} "
            f"({len(files)} image files found, {len(skipped)} unreadable)"
        )
    return torch.stack(images), tuple(skipped)


def load_pool(source: str | Path, *, inversion: int, holdout: int, image_size: int, seed: int) -> OODPool:
    """Sample ``inversion + holdout`` images and split them into D and T."""
    if inversion < 1 or holdout < 1:
        raise DataError(f"the OOD pool needs at least one inversion and one held-out image, got {inversion} and {holdout}")
    total = inversion + holdout
    if str(source) == BUILTIN:
        images, skipped = tiny_world.ood_pool(total, image_size, seed), ()
    else:
        images, skipped = load_folder(Path(source), total, image_size, seed)
    return OODPool(inversion=images[:inversion], holdout=images[inversion:], source=str(source), skipped=skipped)
