"""The ten CoOp-layout datasets, each on a miniature copy of its layout built in a temporary folder.

Every image is split in two: its top half is its class's colour, its bottom half noise unique to
the file, so a loaded image shows both which class it was labelled with and which file it was.
"""

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ci_core.cli.bench import main as bench
from ci_core.data.coop import COOP_DATASETS, CoopDataset
from ci_core.data.datasets import base_new_split
from ci_core.errors import DataError
from ci_core.models.bundle import read_meta
from ci_core.plugins import registry
from ci_core.protocol import load_task

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


ALL = [cls.name for cls in COOP_DATASETS]


def per_class(labels: torch.Tensor, n: int) -> list[int]:
    return torch.bincount(labels, minlength=n).tolist()


@pytest.mark.parametrize("name", ALL)
def test_layout_splits_classnames_and_labels(tmp_path, name):
    ds = dataset_class(name).open(build_layout(tmp_path, name))
    assert list(ds.classnames) == EXPECTED[name]
    n = len(ds.classnames)
    test_count = PER_SPLIT["test"]
    counts = {"train": PER_SPLIT["train"], "val": test_count if name == "imagenet" else PER_SPLIT["val"],
              "test": test_count}
    for split, count in counts.items():
        images = ds.load(split, image_size=SIZE, seed=1)
        assert images.images.shape == (n * count, 3, SIZE, SIZE)
        assert 0 <= float(images.images.min()) and float(images.images.max()) <= 1
        assert per_class(images.labels, n) == [count] * n
        # the top half of every image shows the colour of the label it was given
        assert [label_of_colour(img) for img in images.images] == images.labels.tolist()
    if name == "imagenet":  # ImageNet's val images are its test set
        assert torch.equal(ds.load("val", image_size=SIZE, seed=1).images, ds.load("test", image_size=SIZE, seed=1).images)


@pytest.mark.parametrize("name", ALL)
def test_few_shot_by_seed_and_base_new_split(tmp_path, name):
    ds = dataset_class(name).open(build_layout(tmp_path, name))
    n = len(ds.classnames)
    two = ds.load("train", image_size=SIZE, seed=1, shots=2)
    assert per_class(two.labels, n) == [2] * n
    assert torch.equal(two.images, ds.load("train", image_size=SIZE, seed=1, shots=2).images)
    assert ds.select("train", seed=1, shots=2) == ds.select("train", seed=1, shots=2)
    assert ds.select("train", seed=1, shots=2) != ds.select("train", seed=2, shots=2)
    assert not torch.equal(two.images, ds.load("train", image_size=SIZE, seed=2, shots=2).images)
    # a class with fewer images than shots keeps them all, as CoOp does
    assert per_class(ds.load("train", image_size=SIZE, seed=1, shots=50).labels, n) == [PER_SPLIT["train"]] * n
    # an evaluation cap draws the same images for every seed
    capped = ds.select("test", seed=1, max_per_class=2)
    assert capped == ds.select("test", seed=7, max_per_class=2) and len(capped) == 2 * n
    assert {path for path, _ in capped} <= {path for path, _ in ds.select("test", seed=1)}

    base, new = base_new_split(ds.classnames)
    assert base == tuple(EXPECTED[name][: math.ceil(n / 2)]) and new == tuple(EXPECTED[name][math.ceil(n / 2):])
    train = two.restrict(base)
    assert per_class(train.labels, len(base)) == [2] * len(base)
    assert [base[label] for label in train.labels] == [ds.classnames[label] for label in two.labels if ds.classnames[label] in base]


def test_load_task_on_a_coop_dataset(tmp_path, random_backbone):
    ds = dataset_class("dtd").open(build_layout(tmp_path, "dtd"))
    task = load_task(ds, random_backbone, seed=1, shots=2, test_per_class=1)
    size = random_backbone.image_size
    assert task.base == ("banded", "blotchy", "braided") and task.new == ("bubbly", "bumpy")
    assert task.train.images.shape == (6, 3, size, size) and task.train.classnames == task.base
    assert task.test.images.shape == (5, 3, size, size) and task.test.classnames == ds.classnames


def test_every_coop_dataset_is_registered():
    names = set(registry().names("dataset"))
    assert set(ALL) <= names and {"tiny-colorshapes", "tiny-patterns", "tiny-palette"} <= names
    listing = CliRunner().invoke(bench, ["plugins"])
    assert listing.exit_code == 0
    for name in ALL:
        assert re.search(rf"^dataset\s+{name}\s+clip-inspector .*CoOp layout", listing.output, re.M), name


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ALL)
def test_a_dataset_without_a_data_root_says_how_to_give_one(name):
    with pytest.raises(DataError, match=r"pass --data-root DIR .* or set CI_DATA_ROOT"):
        dataset_class(name).open(None)


def test_a_root_without_the_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=r"caltech101: no folder .*caltech-101"):
        dataset_class("caltech101").open(tmp_path)
    with pytest.raises(DataError, match="data root .* does not exist"):
        dataset_class("caltech101").open(tmp_path / "nowhere")
    assert not dataset_class("caltech101").present(tmp_path)


@pytest.mark.parametrize("name, removed, count", [
    ("dtd", "dtd/split_zhou_DescribableTextures.json", 1),
    ("eurosat", "eurosat/split_zhou_EuroSAT.json", 1),
    ("fgvc-aircraft", "fgvc_aircraft/images_variant_val.txt", 1),
    ("imagenet", "imagenet/classnames.txt", 1),
])
def test_a_missing_split_file_is_named(tmp_path, name, removed, count):
    build_layout(tmp_path, name)
    (tmp_path / removed).unlink()
    with pytest.raises(DataError, match=rf"{name}: {count} of \d+ files the CoOp layout needs are missing; "
                                        rf"first missing: {tmp_path / removed}"):
        dataset_class(name).open(tmp_path)


def test_missing_images_name_the_first_and_count_them(tmp_path):
    build_layout(tmp_path, "food101")
    ds = dataset_class("food101").open(tmp_path)
    split = json.loads((tmp_path / "food-101" / "split_zhou_Food101.json").read_text())
    gone = [split["test"][4][0], split["test"][1][0]]
    for relative in gone:
        (tmp_path / "food-101" / "images" / relative).unlink()
    first = tmp_path / "food-101" / "images" / split["test"][1][0]  # first in the split file's order
    with pytest.raises(DataError, match=rf"food101: 2 of 12 images named in the test split of split_zhou_Food101.json "
                                        rf".* are missing; first missing: {first}"):
        ds.load("test", image_size=SIZE, seed=1)
    assert len(ds.load("train", image_size=SIZE, seed=1, shots=1)) == 4  # the other splits are whole


def test_fgvc_missing_images_and_unknown_variants(tmp_path):
    build_layout(tmp_path, "fgvc-aircraft")
    folder = tmp_path / "fgvc_aircraft"
    first_id = (folder / "images_variant_train.txt").read_text().split()[0]
    (folder / "images" / f"{first_id}.jpg").unlink()
    ds = dataset_class("fgvc-aircraft").open(tmp_path)
    with pytest.raises(DataError, match=rf"1 of 20 images named in images_variant_train.txt .* first missing: "
                                        rf"{folder / 'images' / first_id}.jpg"):
        ds.load("train", image_size=SIZE, seed=1, shots=1)
    (folder / "images_variant_test.txt").write_text("123 Concorde\n")
    with pytest.raises(DataError, match=r"images_variant_test.txt, line 1: class 'Concorde' is not in variants.txt"):
        dataset_class("fgvc-aircraft").open(tmp_path).load("test", image_size=SIZE, seed=1)


def test_imagenet_missing_class_folders(tmp_path):
    build_layout(tmp_path, "imagenet")
    val = tmp_path / "imagenet" / "images" / "val"
    for wnid in ("n01514859", "n01443537"):
        for f in (val / wnid).iterdir():
            f.unlink()
        (val / wnid).rmdir()
    ds = dataset_class("imagenet").open(tmp_path)
    assert len(ds.load("train", image_size=SIZE, seed=0, shots=1)) == 4
    with pytest.raises(DataError, match=rf"imagenet: 2 of 4 class folders of {val} named in classnames.txt are missing; "
                                        rf"first missing: {val / 'n01443537'}"):
        ds.load("test", image_size=SIZE, seed=0)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"is not valid JSON"),
    ('[["a.jpg", 0, "x"]]', r"holds a list; expected an object with the keys train, val, test"),
    ('{"train": [], "val": []}', r"has no list under 'test'"),
    ('{"train": [["a.jpg", "0", "x"]], "val": [], "test": []}', r"train\[0\] is \['a.jpg', '0', 'x'\]; expected "
                                                                 r"\[relative image path, integer label, class name\]"),
    ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "val": [], "test": []}', r"label 0 is called both 'x' and 'y'"),
    ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 1, "x"]], "val": [], "test": []}', r"same class name to several labels"),
])
def test_malformed_split_files(tmp_path, content, message):
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(content)
    with pytest.raises(DataError, match=message):
        dataset_class("dtd").open(tmp_path).classnames


def test_an_unreadable_image_is_named(tmp_path):
    build_layout(tmp_path, "oxford-pets")
    ds = dataset_class("oxford-pets").open(tmp_path)
    path, _ = ds.select("train", seed=3, shots=1)[0]
    path.write_bytes(path.read_bytes()[:40])  # truncated JPEG
    with pytest.raises(DataError, match=rf"oxford-pets: {path} is not a readable image"):
        ds.load("train", image_size=SIZE, seed=3, shots=1)


def test_counts_must_be_positive(tmp_path):
    ds = dataset_class("dtd").open(build_layout(tmp_path, "dtd"))
    with pytest.raises(DataError, match="shots must be a positive integer, got 0"):
        ds.load("train", image_size=SIZE, seed=1, shots=0)
    with pytest.raises(DataError, match="max_per_class must be a positive integer"):
        ds.load("test", image_size=SIZE, seed=1, max_per_class=-1)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        ds.load("dev", image_size=SIZE, seed=1)


# --------------------------------------------------------------------------- the CLI


def test_ci_bench_attack_needs_a_data_root_for_coop_datasets(tmp_path, monkeypatch):
    monkeypatch.delenv("CI_DATA_ROOT", raising=False)
    result = CliRunner().invoke(bench, ["attack", "clean", "--dataset", "dtd", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "pass --data-root DIR" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(bench, ["attack", "clean", "--dataset", "dtd", "--data-root", str(tmp_path),
                                        "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "dtd: no folder" in result.output
    assert not (tmp_path / "out").exists()


def test_ci_bench_attack_trains_on_a_coop_layout_from_the_environment(tmp_path):
    build_layout(tmp_path / "data", "dtd")
    out = tmp_path / "out"
    result = CliRunner(env={"CI_DATA_ROOT": str(tmp_path / "data")}).invoke(bench, [
        "attack", "clean", "--dataset", "dtd", "--shots", "1", "--test-per-class", "2", "--option", "epochs=1",
        "--backbone", "ci-tiny-clip", "--pretrained", "builtin",  # real datasets default to ViT-B/16 (not offline)
        "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.json").read_text())
    assert record["dataset"] == "dtd" and record["shots"] == 1 and record["test_per_class"] == 2
    meta = read_meta(out / "bundle")
    assert meta["classnames"] == EXPECTED["dtd"] and meta["base_classes"] == EXPECTED["dtd"][:3]


def test_ci_repair_finds_the_coop_dataset_with_the_bundles_classes(tmp_path):
    from ci_core.cli.repair import builtin_dataset

    build_layout(tmp_path, "dtd")
    build_layout(tmp_path, "ucf101")
    (tmp_path / "eurosat").mkdir()  # present but without its split file
    found = builtin_dataset(EXPECTED["ucf101"], tmp_path)
    assert found.name == "ucf101" and found.classnames == tuple(EXPECTED["ucf101"])
    with pytest.raises(DataError, match=r"no registered dataset has the bundle's 2 classes .*could not open: eurosat "
                                        r"\(eurosat: 1 of 1 files the CoOp layout needs are missing"):
        builtin_dataset(["x", "y"], tmp_path)
    with pytest.raises(DataError, match=r"or --data-root DIR with the CoOp-layout datasets"):
        builtin_dataset(EXPECTED["dtd"], None)
