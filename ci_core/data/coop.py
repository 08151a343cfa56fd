"""The ten benchmark datasets of CoOp and CoCoOp, read from the folder layout CoOp publishes.

Every dataset lives in its own folder under one data root (``--data-root`` or
``CI_DATA_ROOT``), laid out as CoOp's DATASETS.md describes:

================  ===================  =========================  ==================================
dataset           folder               images under               labels from
================  ===================  =========================  ==================================
imagenet          imagenet/            images/train, images/val   classnames.txt (no split file)
caltech101        caltech-101/         101_ObjectCategories/      split_zhou_Caltech101.json
oxford-pets       oxford_pets/         images/                    split_zhou_OxfordPets.json
flowers102        oxford_flowers/      jpg/                       split_zhou_OxfordFlowers.json
food101           food-101/            images/                    split_zhou_Food101.json
fgvc-aircraft     fgvc_aircraft/       images/                    variants.txt, images_variant_*.txt
sun397            sun397/              SUN397/                    split_zhou_SUN397.json
dtd               dtd/                 images/                    split_zhou_DescribableTextures.json
eurosat           eurosat/             2750/                      split_zhou_EuroSAT.json
ucf101            ucf101/              UCF-101-midframes/         split_zhou_UCF101.json
================  ===================  =========================  ==================================

A split file is JSON ``{"train" | "val" | "test": [[relative path, label, class
name], ...]}``.  The exceptions: ImageNet has no split file; its classes are
the lines ``<wnid> <class name>`` of classnames.txt in wnid order, its images the
folders ``images/train/<wnid>/`` and ``images/val/<wnid>/``, and its val images
are its test set (so "val" and "test" are the same images).  FGVC Aircraft
lists its classes in variants.txt and each split as lines ``<image id> <class
name>`` of images_variant_<split>.txt (image ``images/<id>.jpg``).  Caltech101
leaves out the BACKGROUND_Google and Faces_easy folders and singularises four
class names; EuroSAT spells its ten class names out; UCF101 writes its
CamelCase actions with underscores.  Those name fixes are applied whether or not
the split file already carries them, so every copy of the layout gives the
same class names.  Labels are renumbered densely in the order of the file's
labels, so CoOp's base/new split (``datasets.base_new_split``: the first
ceil(n/2) labels are base) is the split of ``classnames``.  Underscores stay in
class names as in CoOp; the prompt learner reads them as spaces.

The split files are not generated here: CoOp draws them once at random and
publishes them, and results are only comparable on those files.  Every file the
layout names is checked before use; a missing one is reported with the first
missing path and how many are missing.

Memory: only the images a ``load`` asks for are decoded.  The few-shot training
set (``shots`` per class, drawn by the seed) is small; a whole test split is
not (ImageNet's 50,000 images at 224 px are 30 GB as float32), so CPU users
evaluate a sample with ``max_per_class`` (the same images for every seed).
"""

from __future__ import annotations

import abc
import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Sequence

import attrs
import torch

from ci_core.data.datasets import SPLITS, Dataset, LabeledImages, check_counts
from ci_core.data.images import UNREADABLE, ReadProgress, describe_unreadable, read_image
from ci_core.errors import DataError

DATA_ROOT_ENV = "CI_DATA_ROOT"
SPLIT_FILES_FROM = "CoOp publishes the split files with its dataset instructions (KaiyangZhou/CoOp, DATASETS.md)"
# CoOp's largest split file (SUN397's) has about 5 MB; a far larger one is not a split file.
MAX_SPLIT_FILE_BYTES = 64 * 1024**2


@attrs.frozen(eq=False)
class SplitFiles:
    """The labelled image files of one split: ``by_label[label]`` holds paths relative to ``base``, sorted.

    Relative strings rather than ``Path`` objects keep ImageNet's 1.28 million training files small.
    """

    base: Path
    by_label: tuple[tuple[str, ...], ...]

    @classmethod
    def group(cls, base: Path, items: Sequence[tuple[str, int]], n_classes: int) -> "SplitFiles":
        by_label: list[list[str]] = [[] for _ in range(n_classes)]
        for relative, label in items:
            by_label[label].append(relative)
        return cls(base, tuple(tuple(sorted(files)) for files in by_label))


def _require(dataset: str, paths: Sequence[Path], what: str, hint: str = "") -> None:
    """Fail on missing ``paths``, naming the first missing one and how many are missing."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{dataset}: {len(missing)} of {len(paths)} {what} are missing; first missing: {missing[0]}"
                        + (f" ({hint})" if hint else ""))


def _check_relative(dataset: str, relative: str, named_in: str, what: str = "image") -> None:
    """A path from a metadata file stays under the image folder: relative, without '..'."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts or "\0" in relative:
        raise DataError(f"{dataset}: {named_in} names the {what} {relative!r}; expected a path relative to the "
                        "image folder, without '..'")


def _check_unique(dataset: str, source: Path, classnames: Sequence[str]) -> None:
    duplicates = sorted(name for name, count in Counter(classnames).items() if count > 1)
    if duplicates:
        raise DataError(f"{dataset}: {source} gives the same class name to several labels: {duplicates[:5]}")


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


class CoopDataset(Dataset):
    """One dataset of the CoOp layout under a data root (see the module docstring)."""

    needs_data_root: ClassVar[bool] = True
    folder: ClassVar[str]  # the dataset's folder under the data root
    image_folder: ClassVar[str]  # where its images are, inside ``folder``
    files_from: ClassVar[str] = SPLIT_FILES_FROM  # where the metadata files come from, for the error message

    def __init__(self, data_root: str | Path):
        self.data_root = Path(data_root).expanduser()
        if not self.data_root.is_dir():
            raise DataError(f"data root {self.data_root} does not exist or is not a folder")
        self.root = self.data_root / self.folder
        if not self.root.is_dir():
            raise DataError(f"{self.name}: no folder {self.root}; the data root must hold {self.folder}/ "
                            f"in the CoOp layout")
        _require(self.name, self.required_files(), "files the CoOp layout needs", self.files_from)
        self._classnames: tuple[str, ...] | None = None
        self._files: dict[str, SplitFiles] = {}

    @classmethod
    def open(cls, data_root: str | Path | None = None) -> "CoopDataset":
        if data_root is None or str(data_root) == "":
            raise DataError(f"dataset {cls.name!r} is read from files in the CoOp layout: pass --data-root DIR "
                            f"(the folder that holds {cls.folder}/) or set {DATA_ROOT_ENV}")
        return cls(data_root)

    @classmethod
    def present(cls, data_root: str | Path) -> bool:
        return (Path(data_root).expanduser() / cls.folder).is_dir()

    @property
    def image_dir(self) -> Path:
        return self.root / self.image_folder

    @abc.abstractmethod
    def required_files(self) -> list[Path]:
        """The metadata files the layout needs, checked when the dataset is opened."""

    @abc.abstractmethod
    def _read_classnames(self) -> tuple[str, ...]: ...

    @abc.abstractmethod
    def _read_files(self, split: str) -> SplitFiles:
        """Every labelled image of ``split``, each checked to exist."""

    def _image_files(self, items: Sequence[tuple[str, int]], named_in: str) -> SplitFiles:
        """``items`` (paths relative to ``image_dir``, labels) as a split, after checking that every image exists."""
        for relative, _ in items:
            _check_relative(self.name, relative, named_in)
        _require(self.name, [self.image_dir / rel for rel, _ in items],
                 f"images named in {named_in} (under {self.image_dir})")
        return SplitFiles.group(self.image_dir, items, len(self.classnames))

    @property
    def classnames(self) -> tuple[str, ...]:
        if self._classnames is None:
            self._classnames = self._read_classnames()
        return self._classnames

    def files(self, split: str) -> SplitFiles:
        """The labelled image files of ``split`` (read once)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._files:
            self._files[split] = self._read_files(split)
        return self._files[split]

    def select(self, split: str, *, seed: int, shots: int | None = None,
               max_per_class: int | None = None) -> list[tuple[Path, int]]:
        """The (file, label) pairs a ``load`` with these arguments reads, by label and then path.

        ``shots`` draws that many per class by ``seed`` (a class with fewer keeps all, as in CoOp);
        ``max_per_class`` draws at most that many per class by a fixed seed, so an evaluation sample
        is the same for every run; with both, the smaller count is drawn by ``seed``.
        """
        check_counts(shots, max_per_class)
        files = self.files(split)
        counts = [c for c in (shots, max_per_class) if c is not None]
        draw = seed if shots is not None else "fixed"
        chosen: list[tuple[Path, int]] = []
        for label, names in enumerate(files.by_label):
            if counts and len(names) > min(counts):
                # One generator per class, so that one class's draw never shifts another's.
                rng = random.Random(f"{self.name}/{split}/{draw}/{label}")
                names = sorted(rng.sample(names, min(counts)))
            chosen.extend((files.base / name, label) for name in names)
        return chosen

    def load(self, split: str, *, image_size: int, seed: int, shots: int | None = None,
             max_per_class: int | None = None, progress: Callable[[str], None] | None = None) -> LabeledImages:
        chosen = self.select(split, seed=seed, shots=shots, max_per_class=max_per_class)
        # Filled in place: the list of decoded images and their stack never coexist.
        images = torch.empty((len(chosen), 3, image_size, image_size))
        reading = ReadProgress(progress, f"{self.name} {split}", len(chosen))
        for index, (path, _) in enumerate(chosen):
            try:
                images[index] = read_image(path, image_size)
            except UNREADABLE as exc:
                raise DataError(f"{self.name}: {path} is not a readable image ({describe_unreadable(exc)})") from exc
            reading.step(index + 1)
        labels = torch.tensor([label for _, label in chosen], dtype=torch.long)
        return LabeledImages(images, labels, self.classnames)


def _relabel(dataset: str, source: Path, names_by_label: Mapping[int, str]) -> tuple[dict[int, int], tuple[str, ...]]:
    """Dense labels 0..n-1 in the order of the file's labels, and the class names in that order."""
    order = sorted(names_by_label)
    classnames = tuple(names_by_label[label] for label in order)
    _check_unique(dataset, source, classnames)
    return {old: new for new, old in enumerate(order)}, classnames


class SplitFileDataset(CoopDataset):
    """A dataset whose splits are one ``split_zhou_<Name>.json`` file."""

    split_file: ClassVar[str]
    ignored_folders: ClassVar[frozenset[str]] = frozenset()  # image folders the benchmark leaves out
    renames: ClassVar[Mapping[str, str]] = {}  # raw class name -> the benchmark's class name

    def __init__(self, data_root: str | Path):
        super().__init__(data_root)
        self._split: dict[str, list[tuple[str, int]]] | None = None  # split -> (relative path, label), file order

    def required_files(self) -> list[Path]:
        return [self.root / self.split_file]

    @classmethod
    def fix_name(cls, name: str) -> str:
        return cls.renames.get(name, name)

    def _parse(self) -> None:
        path = self.root / self.split_file
        size = path.stat().st_size
        if size > MAX_SPLIT_FILE_BYTES:
            raise DataError(f"{self.name}: {path} has {size} bytes, more than the {MAX_SPLIT_FILE_BYTES} a split "
                            f"file may have; {SPLIT_FILES_FROM}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.name}: {path} is not valid JSON ({exc}); {SPLIT_FILES_FROM}") from exc
        except RecursionError:
            raise DataError(f"{self.name}: {path} is not valid JSON (nested too deeply); {SPLIT_FILES_FROM}") from None
        if not isinstance(data, dict):
            raise DataError(f"{self.name}: {path} holds a {type(data).__name__}; expected an object with the keys "
                            f"{', '.join(SPLITS)}")
        absent = [split for split in SPLITS if not isinstance(data.get(split), list)]
        if absent:
            raise DataError(f"{self.name}: {path} has no list under {absent[0]!r}; expected the keys {', '.join(SPLITS)}, "
                            f"each a list of [relative image path, label, class name]")
        names_by_label: dict[int, str] = {}
        raw: dict[str, list[tuple[str, int]]] = {}
        for split in SPLITS:
            raw[split] = []
            for index, item in enumerate(data[split]):
                if not (isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
                        and isinstance(item[1], int) and not isinstance(item[1], bool) and isinstance(item[2], str)):
                    raise DataError(f"{self.name}: {path}: {split}[{index}] is {item!r}; expected "
                                    f"[relative image path, integer label, class name]")
                relative, label, name = item
                if Path(relative).parts[:1] and Path(relative).parts[0] in self.ignored_folders:
                    continue  # e.g. Caltech101's background folder, if a split file lists it
                name = self.fix_name(name)
                known = names_by_label.setdefault(label, name)
                if known != name:
                    raise DataError(f"{self.name}: {path}: label {label} is called both {known!r} and {name!r} "
                                    f"({split}[{index}])")
                raw[split].append((relative, label))
        if not names_by_label:
            raise DataError(f"{self.name}: {path} lists no images")
        new_label, self._classnames = _relabel(self.name, path, names_by_label)
        self._split = {split: [(rel, new_label[label]) for rel, label in items] for split, items in raw.items()}

    def _read_classnames(self) -> tuple[str, ...]:
        self._parse()
        assert self._classnames is not None
        return self._classnames

    def _read_files(self, split: str) -> SplitFiles:
        if self._split is None:
            self._parse()
        assert self._split is not None
        return self._image_files(self._split[split], f"the {split} split of {self.split_file}")


class ImageNet(CoopDataset):
    name = "imagenet"
    description = "ImageNet (CoOp layout: imagenet/, 1000 classes; val is the test set)"
    folder = "imagenet"
    image_folder = "images"
    files_from = "CoOp's DATASETS.md gives classnames.txt and the train/ and val/ folders of images/"
    split_folders: ClassVar[Mapping[str, str]] = {"train": "train", "val": "val", "test": "val"}

    def required_files(self) -> list[Path]:
        return [self.root / "classnames.txt", self.image_dir / "train", self.image_dir / "val"]

    def _wnids_and_names(self) -> list[tuple[str, str]]:
        path = self.root / "classnames.txt"
        pairs = []
        for number, line in enumerate(_read_lines(path), start=1):
            if not line:
                continue
            wnid, _, name = line.partition(" ")
            _check_relative(self.name, wnid, f"{path}, line {number},", "class folder")
            if not name.strip():
                raise DataError(f"{self.name}: {path}, line {number}: {line!r}; expected '<folder> <class name>'")
            pairs.append((wnid, name.strip()))
        if not pairs:
            raise DataError(f"{self.name}: {path} names no classes")
        wnids = [w for w, _ in pairs]
        if len(set(wnids)) != len(wnids):
            raise DataError(f"{self.name}: {path} names a folder twice: {sorted({w for w in wnids if wnids.count(w) > 1})[:5]}")
        # CoOp numbers the classes in the sorted order of their folders.
        return sorted(pairs)

    def _read_classnames(self) -> tuple[str, ...]:
        names = tuple(name for _, name in self._wnids_and_names())
        _check_unique(self.name, self.root / "classnames.txt", names)
        return names

    def _read_files(self, split: str) -> SplitFiles:
        split_dir = self.image_dir / self.split_folders[split]
        wnids = [wnid for wnid, _ in self._wnids_and_names()]
        _require(self.name, [split_dir / wnid for wnid in wnids], f"class folders of {split_dir} named in classnames.txt",
                 self.files_from)
        by_label = []
        for wnid in wnids:
            with os.scandir(split_dir / wnid) as listing:
                names = sorted(entry.name for entry in listing if entry.is_file() and not entry.name.startswith("."))
            if not names:
                raise DataError(f"{self.name}: class folder {split_dir / wnid} holds no images")
            by_label.append(tuple(f"{wnid}/{name}" for name in names))
        return SplitFiles(split_dir, tuple(by_label))


class FGVCAircraft(CoopDataset):
    name = "fgvc-aircraft"
    description = "FGVC Aircraft (CoOp layout: fgvc_aircraft/, 100 variants)"
    folder = "fgvc_aircraft"
    image_folder = "images"
    files_from = "the data/ folder of the FGVC-Aircraft 2013b archive, renamed fgvc_aircraft/, holds them"

    def required_files(self) -> list[Path]:
        return [self.root / "variants.txt", *(self.root / f"images_variant_{split}.txt" for split in SPLITS)]

    def _read_classnames(self) -> tuple[str, ...]:
        path = self.root / "variants.txt"
        names = tuple(line for line in _read_lines(path) if line)
        if not names:
            raise DataError(f"{self.name}: {path} names no classes")
        _check_unique(self.name, path, names)
        return names

    def _read_files(self, split: str) -> SplitFiles:
        path = self.root / f"images_variant_{split}.txt"
        label_of = {name: label for label, name in enumerate(self.classnames)}
        items = []
        for number, line in enumerate(_read_lines(path), start=1):
            if not line:
                continue
            image_id, _, name = line.partition(" ")
            if name not in label_of:
                raise DataError(f"{self.name}: {path}, line {number}: class {name!r} is not in variants.txt "
                                f"(expected '<image id> <variant>')")
            items.append((f"{image_id}.jpg", label_of[name]))
        return self._image_files(items, path.name)


class Caltech101(SplitFileDataset):
    name = "caltech101"
    description = "Caltech101 (CoOp layout: caltech-101/, 100 classes without the background)"
    folder = "caltech-101"
    image_folder = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    ignored_folders = frozenset({"BACKGROUND_Google", "Faces_easy"})
    renames = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


class OxfordPets(SplitFileDataset):
    name = "oxford-pets"
    description = "Oxford-IIIT Pets (CoOp layout: oxford_pets/, 37 breeds)"
    folder = "oxford_pets"
    image_folder = "images"
    split_file = "split_zhou_OxfordPets.json"


class Flowers102(SplitFileDataset):
    name = "flowers102"
    description = "Oxford Flowers102 (CoOp layout: oxford_flowers/, 102 flowers)"
    folder = "oxford_flowers"
    image_folder = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"


class Food101(SplitFileDataset):
    name = "food101"
    description = "Food-101 (CoOp layout: food-101/, 101 dishes)"
    folder = "food-101"
    image_folder = "images"
    split_file = "split_zhou_Food101.json"


class SUN397(SplitFileDataset):
    name = "sun397"
    description = "SUN397 (CoOp layout: sun397/, 397 scenes)"
    folder = "sun397"
    image_folder = "SUN397"
    split_file = "split_zhou_SUN397.json"


class DTD(SplitFileDataset):
    name = "dtd"
    description = "Describable Textures (CoOp layout: dtd/, 47 textures)"
    folder = "dtd"
    image_folder = "images"
    split_file = "split_zhou_DescribableTextures.json"


class EuroSAT(SplitFileDataset):
    name = "eurosat"
    description = "EuroSAT (CoOp layout: eurosat/, 10 land-cover classes)"
    folder = "eurosat"
    image_folder = "2750"
    split_file = "split_zhou_EuroSAT.json"
    renames = {
        "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
        "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
        "SeaLake": "Sea or Lake",
    }


def _split_camel_case(name: str) -> str:
    """UCF101's folder style: 'ApplyEyeMakeup' -> 'Apply_Eye_Makeup'; names with separators are kept."""
    if "_" in name or " " in name:
        return name
    return "_".join(re.findall(r"^[^A-Z]+|[A-Z][^A-Z]*", name))


class UCF101(SplitFileDataset):
    name = "ucf101"
    description = "UCF101 middle frames (CoOp layout: ucf101/, 101 actions)"
    folder = "ucf101"
    image_folder = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"

    @classmethod
    def fix_name(cls, name: str) -> str:
        return _split_camel_case(name)


COOP_DATASETS: tuple[type[CoopDataset], ...] = (
    ImageNet, Caltech101, OxfordPets, Flowers102, Food101, FGVCAircraft, SUN397, DTD, EuroSAT, UCF101,
)

