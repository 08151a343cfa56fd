"""Labelled image sets and the Dataset plugin interface, with the CoOp base/new class split."""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import attrs
import torch

from ci_core.data import tiny_world
from ci_core.errors import DataError
from ci_core.models.backbone import BUILTIN, DEFAULT_REAL, TINY_MODEL

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


class Dataset(abc.ABC):
    """A classification dataset that a plugin registers under ``name``.

    ``open(data_root)`` makes an instance; datasets that read files from disk set
    ``needs_data_root`` and find their folder under the root, the others ignore it.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    needs_data_root: ClassVar[bool] = False

    @classmethod
    def open(cls, data_root: str | Path | None = None) -> "Dataset":
        """An instance of this dataset; ``data_root`` is where datasets that need files find them."""
        return cls()

    @classmethod
    def present(cls, data_root: str | Path) -> bool:
        """Whether this dataset's folder is under ``data_root`` (always, for datasets that need no files)."""
        return True
    # (open_clip name, pretrained) that commands use on this dataset unless told otherwise.
    default_backbone: ClassVar[tuple[str, str]] = DEFAULT_REAL

    @property
    @abc.abstractmethod
    def classnames(self) -> tuple[str, ...]: ...

    @abc.abstractmethod
    def load(self, split: str, *, image_size: int, seed: int, shots: int | None = None,
             max_per_class: int | None = None, progress: Callable[[str], None] | None = None) -> LabeledImages:
        """Images of ``split``.

        ``shots`` samples that many per class by ``seed`` (the few-shot protocol); ``max_per_class``
        caps each class at that many images drawn independently of ``seed``, so an evaluation
        subset is the same for every run; both None take the whole split.  ``progress`` receives
        progress lines while images are read.
        """


class TinyWorldDataset(Dataset):
    """One class set of the bundled tiny world (see ``tiny_world.DATASETS``)."""

    spec: ClassVar[tiny_world.TinyDatasetSpec]
    default_backbone: ClassVar[tuple[str, str]] = (TINY_MODEL, BUILTIN)
    # The tiny world renders splits on demand; these are the sizes of a "whole" split.
    split_sizes: ClassVar[dict[str, int]] = {"train": 64, "val": 8, "test": 30}

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.spec.classnames)

    def load(self, split: str, *, image_size: int, seed: int, shots: int | None = None,
             max_per_class: int | None = None, progress: Callable[[str], None] | None = None) -> LabeledImages:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        check_counts(shots, max_per_class)
        per_class = shots if shots is not None else self.split_sizes[split]
        if max_per_class is not None:
            per_class = min(per_class, max_per_class)
        # Few-shot training samples depend on the seed; val and test are fixed, as in CoOp.
        images, labels = tiny_world.make_split(self.spec, split, per_class, image_size, seed if split == "train" else 0)
        return LabeledImages(images, labels, self.classnames)


def _tiny_dataset_class(spec: tiny_world.TinyDatasetSpec) -> type[TinyWorldDataset]:
    return type(
        "TinyWorld_" + spec.name.replace("-", "_"), (TinyWorldDataset,),
        {"name": spec.name, "description": spec.description, "spec": spec},
    )


TINY_DATASETS = tuple(_tiny_dataset_class(spec) for spec in tiny_world.DATASETS.values())
