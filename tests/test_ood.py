import numpy as np
import pytest
import torch
from PIL import Image

from ci_core.data import tiny_world
from ci_core.data.images import UNREADABLE, read_image
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


# --------------------------------------------------------------------------- real files of every kind


SOLID = (200, 80, 30)


def solid(mode_image: Image.Image, path, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    mode_image.save(path, **save)
    return path


def test_each_file_kind_is_read_as_rgb_with_its_colours(tmp_path):
    rgb = Image.new("RGB", (30, 20), SOLID)
    palette = Image.new("P", (30, 20))
    palette.putpalette([*SOLID, 10, 20, 30] + [0] * 762)
    files = {
        "cmyk.jpg": solid(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=100),
        "lossless.webp": solid(rgb, tmp_path / "sub" / "lossless.webp", lossless=True),
        "palette.png": solid(palette, tmp_path / "sub" / "deeper" / "palette.png"),
        "gray.png": solid(Image.new("L", (20, 30), 90), tmp_path / "gray.png"),
        "gray16.png": solid(Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)), tmp_path / "gray16.png"),
        "alpha.png": solid(Image.new("RGBA", (20, 20), (*SOLID, 7)), tmp_path / "alpha.PNG"),
    }
    modes = {name: Image.open(path).mode for name, path in files.items()}
    assert modes == {"cmyk.jpg": "CMYK", "lossless.webp": "RGB", "palette.png": "P", "gray.png": "L",
                     "gray16.png": "I;16", "alpha.png": "RGBA"}
    expected = {"cmyk.jpg": SOLID, "lossless.webp": SOLID, "palette.png": SOLID, "gray.png": (90,) * 3,
                "gray16.png": (128,) * 3, "alpha.png": SOLID}
    for name, path in files.items():
        pixels = read_image(path, 8) * 255
        assert pixels.shape == (3, 8, 8)
        tolerance = 3 if name == "cmyk.jpg" else 0.01  # JPEG's colour transform is lossy; the rest are exact
        assert torch.allclose(pixels, torch.tensor(expected[name], dtype=torch.float).view(3, 1, 1).expand(3, 8, 8),
                              atol=tolerance), (name, pixels[:, 0, 0])
    # the folder pool finds all six, recursively and whatever the case of the suffix
    pool = load_pool(tmp_path, inversion=4, holdout=2, image_size=8, seed=0)
    assert pool.skipped == () and pool.files_found == 6


def test_read_image_matches_open_clips_preprocessing(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    rng = np.random.default_rng(3)
    for index, (w, h) in enumerate([(37, 23), (23, 37), (50, 50), (33, 34), (16, 41)]):
        path = tmp_path / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        for size in (16, 24):
            transform = open_clip.image_transform(size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
            with Image.open(path) as img:
                reference = transform(img)
            assert torch.allclose(read_image(path, size), reference, atol=1e-6), (w, h, size)


def test_truncated_and_corrupt_files_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(tmp_path / f"good{i}.jpg")
    whole = (tmp_path / "good0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    png = tmp_path / "truncated.png"
    Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:-30])
    (tmp_path / "text.webp").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    bad = ["text.webp", "truncated.jpg", "truncated.png"]
    for name in bad:
        with pytest.raises(UNREADABLE):
            read_image(tmp_path / name, 16)
    # the pool stops reading once full: the bad files met on the way are skipped and counted
    pool = load_pool(tmp_path, inversion=4, holdout=2, image_size=16, seed=0)
    assert set(pool.skipped) <= set(bad)
    report = pool.describe()
    assert report["skipped_unreadable"] == len(pool.skipped) and report["image_files_found"] == 9
    # a pool that needs more than the readable images reads every file, and says what it found
    with pytest.raises(DataError, match=rf"OOD folder {tmp_path}: 6 readable images, but the pool needs 7 "
                                        r"\(9 image files found, 3 unreadable\)"):
        load_pool(tmp_path, inversion=5, holdout=2, image_size=16, seed=0)


def test_d_and_t_are_disjoint_samples_of_the_folder(tmp_path):
    for i in range(20):
        Image.new("RGB", (12, 12), (i * 12, 255 - i * 12, 7)).save(tmp_path / f"{i:02d}.png")
    pool = load_pool(tmp_path, inversion=6, holdout=4, image_size=8, seed=4)
    colours = [tuple((img[:, 0, 0] * 255).round().tolist()) for img in torch.cat([pool.inversion, pool.holdout])]
    assert len(set(colours)) == 10  # ten different files, none in both D and T
    again = load_pool(tmp_path, inversion=6, holdout=4, image_size=8, seed=4)
    assert torch.equal(pool.holdout, again.holdout)


def test_read_progress_lines():
    from ci_core.data.images import ReadProgress

    lines = []
    every_step = ReadProgress(lines.append, "pool", 3, every=0.0)
    for done in (1, 2, 3):
        every_step.step(done)
    assert [line.split(" (")[0] for line in lines] == [f"pool: {n}/3 images read" for n in (1, 2, 3)]
    lines.clear()
    quiet = ReadProgress(lines.append, "pool", 3, every=1e9)  # a fast read prints nothing
    for done in (1, 2, 3):
        quiet.step(done)
    assert lines == []
    ReadProgress(None, "pool", 3, every=0.0).step(1)  # no callback: nothing to call
