"""The dataset contract: ``check_dataset``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ci_core.contracts.common import _Subject, _recorder, check_plugin_class
from ci_core.data.labeled import LabeledImages
from ci_core.errors import DataError
from ci_core.interfaces import Dataset


def check_dataset(cls: type[Dataset], *, data_root: str | Path | None = None, image_size: int = 32) -> None:
    """A dataset names its classes and loads labelled images.

    * A dataset that ``needs_data_root`` refuses to open without one (a DataError that says to pass
      --data-root) and is not ``present`` in an empty folder; its images are checked only when
      ``data_root`` (a folder in its layout) is given.
    * ``classnames`` are at least two distinct non-empty strings, the same on every call;
      ``default_backbone`` is an (architecture, pretrained) pair of strings.
    * ``load("train", shots=1)`` gives LabeledImages of its classes: one image of each, float (N, 3, H, W)
      in [0, 1] at ``image_size``, integer labels in range; the same seed gives the same images.
    * ``load("test", max_per_class=1)`` holds at most one image per class, the same for every seed.
    * an unknown split is a DataError; progress receives text.
    """
    subject = _Subject("dataset", cls)
    check_plugin_class("dataset", cls)
    subject.require(issubclass(cls, Dataset), "it is not a ci_core.interfaces.Dataset")
    default = cls.default_backbone
    subject.require(isinstance(default, tuple) and len(default) == 2 and all(isinstance(v, str) and v for v in default),
                    f"default_backbone must be an (open_clip name, pretrained) pair, got {default!r}")
    if cls.needs_data_root:
        subject.refuses(DataError, lambda: cls.open(None), "without a data root it must refuse to open",
                        match="--data-root")
        with tempfile.TemporaryDirectory(prefix="ci-contract-") as empty:
            subject.require(not cls.present(empty), "it says it is present in an empty folder")
        if data_root is None:
            return
        subject.require(cls.present(data_root), f"it is not present under {data_root}")
    dataset = cls.open(data_root)
    subject.require(isinstance(dataset, cls), f"open must return a {cls.__name__}")
    names = tuple(dataset.classnames)
    subject.require(len(names) >= 2 and all(isinstance(n, str) and n.strip() for n in names)
                    and len(set(names)) == len(names),
                    f"classnames must be at least two distinct non-empty strings, got {names[:10]!r}")
    subject.require(tuple(dataset.classnames) == names, "classnames changed from one call to the next")
    messages, progress = _recorder()
    train = dataset.load("train", image_size=image_size, seed=0, shots=1, progress=progress)
    subject.require(all(isinstance(m, str) for m in messages), "progress must receive text")
    _check_split(subject, train, names, image_size, "load('train', shots=1)")
    subject.require(torch.bincount(train.labels, minlength=len(names)).tolist() == [1] * len(names),
                    "load('train', shots=1) must give one image of every class")
    repeat = dataset.load("train", image_size=image_size, seed=0, shots=1)
    subject.require(torch.equal(repeat.images, train.images) and torch.equal(repeat.labels, train.labels),
                    "the same seed gave other training images")
    tests = [dataset.load("test", image_size=image_size, seed=seed, max_per_class=1) for seed in (0, 1)]
    _check_split(subject, tests[0], names, image_size, "load('test', max_per_class=1)")
    subject.require(int(torch.bincount(tests[0].labels, minlength=len(names)).max()) <= 1,
                    "load('test', max_per_class=1) gave more than one image of a class")
    subject.require(torch.equal(tests[0].images, tests[1].images) and torch.equal(tests[0].labels, tests[1].labels),
                    "an evaluation sample (max_per_class) must be the same for every seed")
    subject.refuses(DataError, lambda: dataset.load("no-such-split", image_size=image_size, seed=0, shots=1),
                    "an unknown split must be refused")


def _check_split(subject: _Subject, data: LabeledImages, names, size: int, what: str) -> None:
    subject.require(isinstance(data, LabeledImages), f"{what} must return LabeledImages")
    subject.require(tuple(data.classnames) == names, f"{what}: its classnames must be the dataset's")
    images, labels = data.images, data.labels
    subject.require(images.dim() == 4 and images.shape[1:] == (3, size, size) and images.is_floating_point()
                    and len(images) == len(labels),
                    f"{what} must give (N, 3, {size}, {size}) float images, one per label; got {tuple(images.shape)}")
    subject.require(bool(torch.isfinite(images).all()) and float(images.min()) >= 0 and float(images.max()) <= 1,
                    f"{what}: pixels must be finite and in [0, 1]")
    subject.require(labels.dtype == torch.long and labels.dim() == 1 and (len(labels) == 0 or (
        int(labels.min()) >= 0 and int(labels.max()) < len(names))), f"{what}: labels must be class indices (int64)")
