"""Reading one image file the way CLIP's evaluation preprocessing does, in pixel space.

CLIP (and open_clip's ``image_transform(size, is_train=False)``) resizes the
shorter side to ``size`` with bicubic filtering (the longer side truncated to an
integer, as torchvision's ``Resize`` does), centre-crops ``size`` x ``size``
(offsets rounded as torchvision's ``CenterCrop``) and scales bytes to [0, 1].
Normalisation is left to the model, so images here stay in [0, 1].

Any mode PIL opens from JPEG, PNG or WebP becomes RGB first: grayscale, palette,
CMYK and alpha directly, 16-bit grayscale PNGs scaled down to 8 bits (PIL's own
conversion would clip them at 255).
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

# What PIL raises for a file it cannot decode: unidentified, truncated or corrupt data
# (OSError and its UnidentifiedImageError), bad headers (ValueError, SyntaxError, struct.error),
# a stream that ends early (EOFError), and oversized images (DecompressionBombError).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        # Only 16-bit grayscale PNGs open in these modes here; scale 0..65535 to 0..255.
        gray = np.asarray(img, dtype=np.float64) / 65535.0
        img = Image.fromarray(np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def resize_and_crop(rgb: Image.Image, size: int) -> Image.Image:
    """CLIP's evaluation geometry: shorter side to ``size`` (bicubic), then the central ``size`` square."""
    width, height = rgb.size
    if min(width, height) != size:
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        rgb = rgb.resize(new, Image.BICUBIC)
    left = int(round((rgb.width - size) / 2.0))
    top = int(round((rgb.height - size) / 2.0))
    return rgb.crop((left, top, left + size, top + size))


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """(3, size, size) float image in [0, 1]; raises one of ``UNREADABLE`` for a file PIL cannot decode."""
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
    cropped = resize_and_crop(rgb, size)
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ReadProgress:
    """Progress lines for a long read, at most one every ``every`` seconds, then one at the end if any was printed."""

    def __init__(self, progress: Callable[[str], None] | None, what: str, total: int, every: float = 5.0):
        self.progress, self.what, self.total, self.every = progress, what, total, every
        self.start = self.last = time.perf_counter()
        self.printed = False

    def step(self, done: int) -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        if now - self.last >= self.every or (done == self.total and self.printed):
            self.progress(f"{self.what}: {done}/{self.total} images read ({now - self.start:.0f}s)")
            self.last, self.printed = now, True
