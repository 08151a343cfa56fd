import numpy as np
import pytest
import torch
from PIL import Image

from ci_core.data import tiny_world
from ci_core.data.ood import load_pool
from ci_core.errors import DataError


def write_images(folder, count, mode="RGB", suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        array = rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
        img = Image.fromarray(array).convert(mode)
        img.save(folder / f"img{i}{suffix}")


def test_folder_pool_converts_modes_resizes_and_splits(tmp_path):
    write_images(tmp_path / "a", 3, "L", ".png")
    write_images(tmp_path / "b" / "deep", 3, "P", ".png")
    write_images(tmp_path / "c", 3, "CMYK", ".jpg")
    write_images(tmp_path / "d", 3, "RGBA", ".webp")
    pool = load_pool(tmp_path, inversion=8, holdout=4, image_size=32, seed=0)
    assert pool.inversion.shape == (8, 3, 32, 32) and pool.holdout.shape == (4, 3, 32, 32)
    assert 0 <= float(pool.inversion.min()) and float(pool.inversion.max()) <= 1
    again = load_pool(tmp_path, inversion=8, holdout=4, image_size=32, seed=0)
    assert torch.equal(pool.inversion, again.inversion)
    other = load_pool(tmp_path, inversion=8, holdout=4, image_size=32, seed=1)
    assert not torch.equal(pool.inversion, other.inversion)


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    write_images(tmp_path, 5)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "empty.jpg").write_bytes(b"")
    pool = load_pool(tmp_path, inversion=3, holdout=2, image_size=16, seed=0)
    assert len(pool.inversion) + len(pool.holdout) == 5
    assert sorted(pool.skipped) == ["broken.png", "empty.jpg"]
    assert pool.describe()["skipped_unreadable"] == 2


def test_too_few_readable_images_says_how_many(tmp_path):
    write_images(tmp_path, 3)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"3 readable images, but the pool needs 10 \(4 image files found, 1 unreadable\)"):
        load_pool(tmp_path, inversion=8, holdout=2, image_size=16, seed=0)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        load_pool(tmp_path, inversion=1, holdout=1, image_size=16, seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_pool(tmp_path / "missing", inversion=1, holdout=1, image_size=16, seed=0)


def test_builtin_pool_is_seeded():
    a = load_pool("builtin", inversion=4, holdout=4, image_size=32, seed=5)
    b = load_pool("builtin", inversion=4, holdout=4, image_size=32, seed=5)
    assert torch.equal(a.inversion, b.inversion) and torch.equal(a.holdout, b.holdout)


def test_ood_classes_are_disjoint_from_every_dataset():
    ood = dict(tiny_world.OOD_SPEC.free)
    for spec in tiny_world.DATASETS.values():
        for _, fixed in spec.classes:
            fixed = dict(fixed)
            # every dataset class fixes a colour or shape the OOD pool never draws
            assert fixed.get("colour") not in ood["colour"] and fixed.get("shape") not in ood["shape"]
            assert ("colour" in fixed and fixed["colour"] not in ood["colour"]) or \
                   ("shape" in fixed and fixed["shape"] not in ood["shape"])


def test_datasets_have_base_new_split_and_sizes():
    from ci_core.data.datasets import TINY_DATASETS, base_new_split

    for cls in TINY_DATASETS:
        ds = cls()
        assert 20 <= len(ds.classnames) <= 60
        base, new = base_new_split(ds.classnames)
        assert len(base) == -(-len(ds.classnames) // 2) and set(base).isdisjoint(new)
        train = ds.load("train", image_size=32, seed=1, shots=2)
        assert len(train) == 2 * len(ds.classnames)
        assert torch.equal(ds.load("test", image_size=32, seed=1, shots=1).images,
                           ds.load("test", image_size=32, seed=2, shots=1).images)  # test split is fixed
        assert not torch.equal(train.images, ds.load("train", image_size=32, seed=2, shots=2).images)
