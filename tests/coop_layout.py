"""A miniature copy of each CoOp-layout dataset's folder (``ci_core.data.coop``), built in a given folder.

Every image is split in two: its top half is its class's colour, its bottom half noise unique to
the file, so a loaded image shows both which class it was labelled with and which file it was.
``build_layout(root, name)`` writes dataset ``name``'s folder under ``root``; ``EXPECTED[name]`` are
the class names the dataset must read from it.
"""

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ci_core.data.coop import COOP_DATASETS, CoopDataset

SIZE = 16
PALETTE = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (200, 40, 220), (30, 220, 220)]
PER_SPLIT = {"train": 5, "val": 2, "test": 3}  # images per class in each split


def write_image(path: Path, colour: int, index: int) -> None:
    """A top half in ``PALETTE[colour]`` over noise unique to the file; sizes vary so resizing and cropping are exercised."""
    width, height = 20 + 4 * (index % 3), 18 + 3 * (index % 2)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    array[: height // 2 + 2] = PALETTE[colour]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else \
        Image.fromarray(array).save(path)


def label_of_colour(image: torch.Tensor) -> int:
    """The palette index nearest to the top rows of a loaded image."""
    top = image[:, :3].mean(dim=(1, 2)) * 255
    return int(torch.cdist(top[None], torch.tensor(PALETTE, dtype=torch.float)[None]).argmin())


# Each layout: the classes as (image folder, class name in the split file, class name expected), the
# dataset writes the rest.  Caltech101's background folder and raw names, EuroSAT's raw folder names
# and a UCF101 CamelCase name test the name fixes of the layout.
SPLIT_FILE_LAYOUTS = {
    "caltech101": [("accordion", "accordion", "accordion"), ("BACKGROUND_Google", "BACKGROUND_Google", None),
                   ("airplanes", "airplanes", "airplane"), ("Faces", "face", "face"),
                   ("Leopards", "Leopards", "leopard")],
    "oxford-pets": [("", "abyssinian", "abyssinian"), ("", "american_bulldog", "american_bulldog"),
                    ("", "basset_hound", "basset_hound")],
    "flowers102": [("", "pink primrose", "pink primrose"), ("", "hard-leaved pocket orchid", "hard-leaved pocket orchid"),
                   ("", "canterbury bells", "canterbury bells")],
    "food101": [("apple_pie", "apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs", "baby_back_ribs"),
                ("baklava", "baklava", "baklava"), ("beef_tartare", "beef_tartare", "beef_tartare")],
    "sun397": [("a/abbey", "abbey", "abbey"), ("a/airplane_cabin", "airplane_cabin", "airplane_cabin"),
               ("b/bakery/shop", "shop bakery", "shop bakery")],
    "dtd": [("banded", "banded", "banded"), ("blotchy", "blotchy", "blotchy"), ("braided", "braided", "braided"),
            ("bubbly", "bubbly", "bubbly"), ("bumpy", "bumpy", "bumpy")],
    "eurosat": [("AnnualCrop", "AnnualCrop", "Annual Crop Land"), ("Forest", "Forest", "Forest"),
                ("Highway", "Highway or Road", "Highway or Road"), ("SeaLake", "SeaLake", "Sea or Lake")],
    "ucf101": [("Apply_Eye_Makeup", "Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Basketball", "Basketball", "Basketball"),
               ("Yo_Yo", "YoYo", "Yo_Yo")],
}
FGVC_VARIANTS = ["707-320", "A300B4", "F/A-18", "Falcon 2000"]
# ImageNet: classnames.txt out of wnid order; classes are numbered in wnid order.
IMAGENET_LINES = [("n01530575", "brambling"), ("n01440764", "tench"), ("n01514859", "hen"), ("n01443537", "goldfish")]
EXPECTED = {
    **{name: [expected for *_, expected in classes if expected] for name, classes in SPLIT_FILE_LAYOUTS.items()},
    "fgvc-aircraft": FGVC_VARIANTS,
    "imagenet": ["tench", "goldfish", "hen", "brambling"],
}


def dataset_class(name: str) -> type[CoopDataset]:
    return next(cls for cls in COOP_DATASETS if cls.name == name)


def build_split_file_layout(root: Path, name: str) -> None:
    cls = dataset_class(name)
    image_dir = root / cls.folder / cls.image_folder
    split = {s: [] for s in PER_SPLIT}
    for label, (folder, json_name, expected) in enumerate(SPLIT_FILE_LAYOUTS[name]):
        # colour = the label after the dataset drops left-out folders (their images get the last colour)
        colour = EXPECTED[name].index(expected) if expected else len(PALETTE) - 1
        for s, count in PER_SPLIT.items():
            for i in range(count):
                stem = f"{json_name.replace(' ', '_').replace('/', '_')}_{s}_{i}.jpg"
                relative = f"{folder}/{stem}" if folder else stem
                write_image(image_dir / relative, colour, i)
                split[s].append([relative, label, json_name])
    (root / cls.folder / cls.split_file).write_text(json.dumps(split))


def build_fgvc(root: Path) -> None:
    folder = root / "fgvc_aircraft"
    folder.mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(FGVC_VARIANTS) + "\n")
    for s, count in PER_SPLIT.items():
        lines = []
        for label, variant in enumerate(FGVC_VARIANTS):
            for i in range(count):
                image_id = f"{label}{i}{len(s)}0{i}"
                write_image(folder / "images" / f"{image_id}.jpg", label, i)
                lines.append(f"{image_id} {variant}")
        (folder / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")


def build_imagenet(root: Path) -> None:
    folder = root / "imagenet"
    folder.mkdir(parents=True)
    (folder / "classnames.txt").write_text("".join(f"{wnid} {name}\n" for wnid, name in IMAGENET_LINES))
    for label, wnid in enumerate(sorted(w for w, _ in IMAGENET_LINES)):
        for i in range(PER_SPLIT["train"]):
            write_image(folder / "images" / "train" / wnid / f"{wnid}_{i}.JPEG", label, i)
        for i in range(PER_SPLIT["test"]):
            write_image(folder / "images" / "val" / wnid / f"ILSVRC2012_val_{label}{i}.JPEG", label, i)
        (folder / "images" / "train" / wnid / ".DS_Store").write_bytes(b"not an image")  # hidden files are skipped


def build_layout(root: Path, name: str) -> Path:
    if name == "imagenet":
        build_imagenet(root)
    elif name == "fgvc-aircraft":
        build_fgvc(root)
    else:
        build_split_file_layout(root, name)
    return root
