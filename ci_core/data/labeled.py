"""Labelled image sets, and CoOp's split of a class list into base (seen) and new (unseen) classes."""

from __future__ import annotations

import math
from typing import Sequence

import attrs
import torch

from ci_core.errors import DataError

SPLITS = ("train", "val", "test")


@attrs.frozen(eq=False)
class LabeledImages:
    """Pixel-space images (N, 3, H, W) in [0, 1] with labels indexing ``classnames``."""

    images: torch.Tensor
    labels: torch.Tensor
    classnames: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def restrict(self, classnames: Sequence[str]) -> "LabeledImages":
        """Only the images of ``classnames``, relabelled to their order there."""
        unknown = [c for c in classnames if c not in self.classnames]
        if unknown:
            raise DataError(f"classes {unknown} are not in this image set")
        old_to_new = torch.full((len(self.classnames),), -1, dtype=torch.long)
        for new, name in enumerate(classnames):
            old_to_new[self.classnames.index(name)] = new
        mapped = old_to_new[self.labels]
        keep = mapped >= 0
        return LabeledImages(self.images[keep], mapped[keep], tuple(classnames))


def base_new_split(classnames: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """CoOp's split: the first ceil(n/2) labels are base (seen), the rest new (unseen)."""
    m = math.ceil(len(classnames) / 2)
    return tuple(classnames[:m]), tuple(classnames[m:])


def check_counts(shots: int | None, max_per_class: int | None) -> None:
    """Both per-class counts, when given, must be positive integers."""
    for label, value in (("shots", shots), ("max_per_class", max_per_class)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{label} must be a positive integer, got {value!r}")


def is_one_path_part(name: str) -> bool:
    """Whether ``name`` joined onto a folder stays one entry inside it: no separator or NUL, not '.' or '..'."""
    return name not in (".", "..") and not any(c in name for c in "/\\\x00")


def class_folder_name(name: str) -> str:
    """A class's subfolder in a labelled image folder: its name, refused where it would not be one path part."""
    if not name or not is_one_path_part(name) or not name.isprintable():
        raise DataError(f"class {name!r} cannot name a folder (a path separator, NUL, '.' or '..', or an "
                        "unprintable character)")
    return name


def write_labelled_folder(images: LabeledImages, folder) -> int:
    """Each image as ``folder/<class>/<index>.png``, one subfolder per class (the layout ``ci-scan --own-images``
    reads); returns the number written."""
    from pathlib import Path

    from torchvision.utils import save_image

    folder = Path(folder)
    names = [class_folder_name(n) for n in images.classnames]
    for index, (image, label) in enumerate(zip(images.images, images.labels.tolist())):
        target = folder / names[label]
        target.mkdir(exist_ok=True)
        save_image(image, target / f"{index:05d}.png")
    return len(images)
