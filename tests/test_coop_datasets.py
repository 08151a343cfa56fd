"""The ten CoOp-layout datasets, each on a miniature copy of its layout built in a temporary folder
(``coop_layout``: every image's top half is its class's colour, its bottom half noise unique to the file)."""

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

from ci_core.cli.bench import main as bench
from ci_core.data.coop import COOP_DATASETS
from ci_core.data.datasets import base_new_split
from ci_core.errors import DataError
from ci_core.models.bundle import read_meta
from ci_core.plugins import registry
from ci_core.learning.protocol import load_task

from coop_layout import EXPECTED, PER_SPLIT, SIZE, build_layout, dataset_class, label_of_colour


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
