"""Reading one image file the way CLIP's evaluation preprocessing does, in pixel space.

CLIP (and open_clip's ``image_transform(size, is_train=False)``) resizes the
shorter side to ``size`` with bicubic filtering (the longer side truncated to an
integer, as torchvision's ``Resize`` does), centre-crops ``size`` x ``size``
(offsets rounded as torchvision's ``CenterCrop``) and scales bytes to [0, 1].
Normalisation is left to the model, so images here stay in [0, 1].

Any mode PIL opens from JPEG, PNG or WebP becomes RGB first: grayscale, palette,
CMYK and alpha directly, 16-bit grayscale PNGs scaled down to 8 bits (PIL's own
conversion would clip them at 255).

Images are untrusted input, and bounded before they are decoded: only PIL's
JPEG, PNG and WebP decoders are ever used (whatever the file's suffix; PIL
would otherwise try every format it knows, EPS through Ghostscript included),
and an image whose header promises more than ``MAX_PIXELS`` pixels, or a longer
side more than ``MAX_ASPECT`` times its shorter one (which CLIP's resize would
blow up: 1 x 1,000,000 pixels become 224 x 224,000,000), is refused from its
header as ``ImageTooLarge``.  That, and a ``MemoryError`` while decoding one
image, are ``UNREADABLE`` like a corrupt file: a pool skips and counts it.
"""

from __future__ import annotations

import struct
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# The only decoders used (PIL's names); a JPEG with several pictures opens as MPO through the JPEG decoder.
FORMATS = ("JPEG", "PNG", "WEBP")

# 8192 x 8192: a 48-megapixel phone photo (8000 x 6000) and an 8K frame pass; at most about 200 MB of RGB
# and a few seconds to decode, and below PIL's own decompression-bomb warning (89 megapixels).
MAX_PIXELS = 8192 * 8192
# Wide panoramas stay under 10:1; beyond 20:1 the resize to CLIP's size would cost 20 times a square image.
MAX_ASPECT = 20


class ImageTooLarge(ValueError):
    """An image whose header promises more pixels, or a more elongated shape, than is ever decoded."""


# What reading one file can raise: unidentified, truncated or corrupt data (OSError and its
# UnidentifiedImageError), bad headers (ValueError, SyntaxError, struct.error), a stream that ends early
# (EOFError), oversized images (ImageTooLarge, PIL's DecompressionBombError) and running out of memory
# while decoding (MemoryError): none of them is more than one bad file.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError, MemoryError)


def check_image_size(width: int, height: int) -> None:
    """Raise ``ImageTooLarge`` for a ``width`` x ``height`` image (from its header) beyond the bounds."""
    if width < 1 or height < 1:
        raise ImageTooLarge(f"{width} x {height} pixels: an image has at least one pixel each way")
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{width} x {height} pixels, more than the {MAX_PIXELS:,} read")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageTooLarge(f"{width} x {height} pixels, longer than {MAX_ASPECT} times its width or height")


def describe_unreadable(exc: BaseException) -> str:
    """One line saying why a file could not be read."""
    if isinstance(exc, MemoryError):
        return "out of memory while decoding it"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
    """(3, size, size) float image in [0, 1]; raises one of ``UNREADABLE`` for a file PIL cannot decode, or one
    over the size bounds (checked from the header, before decoding)."""
    with warnings.catch_warnings():
        # PIL warns of images over 89 megapixels as it opens them; check_image_size refuses them anyway.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path, formats=FORMATS)
    with img:
        check_image_size(*img.size)
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
