"""The bundled tiny world's datasets; the Dataset interface is in ``ci_core.interfaces``, labelled image sets
and the CoOp base/new split in ``ci_core.data.labeled`` (both re-exported here)."""

from __future__ import annotations

from typing import Callable, ClassVar


from ci_core.data import tiny_world
from ci_core.data.labeled import SPLITS, LabeledImages, base_new_split, check_counts  # noqa: F401
from ci_core.errors import DataError
from ci_core.interfaces import Dataset
from ci_core.models.backbone import TINY_MODEL
from ci_core.models.weights import BUILTIN


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
