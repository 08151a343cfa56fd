"""Issue 17, "fail closed against hostile models and inputs": the red team's cases, one test each or in a table.

A scan's input comes from the party being audited.  Each case must end in a clear, one-line error that
names the file, field or option (a ``CIError``; exit status 1 or 2 in a CLI), or in a correct result:
never a traceback, a silent wrong result, unbounded memory or time, or a read outside the folder given.

* images: bounded from the header before decoding (``ci_core.data.images``);
* bundle metadata: the schema and the unallocated architecture (``ci_core.models.bundle_schema``), the
  weights' header before the backbone, backbone weights never from a path, URL or download a bundle names;
* paths: class folders and delivery checkpoints never leave the folder given;
* CLI values: every plugin config number finite and in range, named in the error, before any work.

Everything runs on the tiny CLIP with random weights, through the library functions the CLIs call, and
through the CLIs only where the order of the checks is what is tested.
"""

import functools
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

import ci_core.models.backbone as backbone_module
import ci_core.models.weights as weights_module
import ci_core.models.bundle as bundle_module
from ci_core.cli.common import parse_options
from ci_core.cli.repair import _class_folder, load_class_folders, main as ci_repair
from ci_core.cli.scan import main as ci_scan
from ci_core.data import images as images_module
from ci_core.data.images import MAX_ASPECT, MAX_PIXELS, ImageTooLarge, read_image
from ci_core.data.ood import load_folder
from ci_core.models.delivery import resolve_checkpoint
from ci_core.errors import BundleError, ConfigError, DataError
from ci_core.interfaces import make_config
from ci_core.models.backbone import TINY_MODEL, architecture
from ci_core.models.bundle import load_bundle, read_meta, save_bundle
from ci_core.models.bundle_schema import MAX_CLASSES, MAX_META_BYTES, check_meta, expected_tensors
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.coop import CoOpCLIP
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.plugins import registry
from ci_detectors.inspector import InspectorConfig

CLASSES = ["red circle", "blue square", "green star", "pink ring"]
ROOT = Path(__file__).resolve().parent.parent
SIZE = 96  # the tiny CLIP's images


# --------------------------------------------------------------------------- helpers


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only its signature and header chunk: it says how big it is, and holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def write_good(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (20 + i, 16), (i * 20, 100, 200 - i * 20)).save(folder / f"good{i}.png")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, random_backbone):
    """One bundle of each kind on the random tiny CLIP, to be copied and broken by each test."""
    root = tmp_path_factory.mktemp("hostile-bundles")
    torch.manual_seed(0)
    made = {
        "cocoop": save_bundle(PromptTunedCLIP(random_backbone), CLASSES, root / "cocoop", base_classes=CLASSES[:2]),
        "coop": save_bundle(CoOpCLIP(random_backbone, n_ctx=4, ctx_classes=CLASSES), CLASSES, root / "coop"),
        "zeroshot": save_bundle(ZeroShotCLIP(random_backbone), CLASSES, root / "zeroshot"),
    }
    return made


def copy_of(bundles, kind, tmp_path) -> Path:
    return Path(shutil.copytree(bundles[kind], tmp_path / kind))


def rewrite(bundle: Path, change) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    change(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("width, height", [(1, 1_000_000), (13000, 13000), (8193, 8192), (2100, 100)])
def test_an_image_too_large_or_elongated_is_refused_from_its_header(tmp_path, monkeypatch, width, height):
    path = tmp_path / "big.png"
    path.write_bytes(png_header(width, height))
    Image.init()  # PIL's own plugins load small images as they register
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an image over the bounds"))
    with pytest.raises(ImageTooLarge, match=rf"{width} x {height} pixels"):
        read_image(path, SIZE)


def test_the_bounds_keep_every_ordinary_image(tmp_path):
    for width, height in ((8192, 8192), (8000, 6000), (MAX_ASPECT * 50, 50), (1, 1)):
        assert width * height <= MAX_PIXELS
        images_module.check_image_size(width, height)  # no error
    Image.new("RGB", (400, 20), (1, 2, 3)).save(tmp_path / "wide.png")  # 20:1, the widest kept
    assert read_image(tmp_path / "wide.png", SIZE).shape == (3, SIZE, SIZE)


def test_the_pool_skips_and_counts_oversized_foreign_and_memory_hungry_files(tmp_path, monkeypatch):
    folder = tmp_path / "ood"
    write_good(folder, 4)
    (folder / "tall.png").write_bytes(png_header(1, 1_000_000))
    (folder / "huge.png").write_bytes(png_header(13000, 13000))
    Image.new("RGB", (8, 8)).save(folder / "bitmap.png", format="BMP")  # another format under .png
    Image.new("RGB", (9, 9), (5, 5, 5)).save(folder / "greedy.png")
    real = images_module.to_rgb

    def out_of_memory_for_one(img):
        if img.size == (9, 9):
            raise MemoryError
        return real(img)

    monkeypatch.setattr(images_module, "to_rgb", out_of_memory_for_one)
    sample = load_folder(folder, 4, SIZE, seed=0)
    assert len(sample.images) == 4 and set(sample.skipped) <= {"tall.png", "huge.png", "bitmap.png", "greedy.png"}
    with pytest.raises(DataError, match=r"4 readable images, but the pool needs 5 \(8 image files found, 4 unreadable\)"):
        load_folder(folder, 5, SIZE, seed=0)


def test_a_postscript_file_under_an_image_suffix_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    path = tmp_path / "photo.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("ran Ghostscript"))
    with pytest.raises(images_module.UNREADABLE):
        read_image(path, SIZE)


def test_repair_class_folders_name_an_oversized_image(tmp_path):
    for name in CLASSES[:2]:
        write_good(tmp_path / "data" / "train" / name.replace(" ", "_"), 1)
    (tmp_path / "data" / "train" / "blue_square" / "wide.png").write_bytes(png_header(5000, 100))
    with pytest.raises(DataError, match=r"wide.png: unreadable image \(5000 x 100 pixels, longer than 20 times"):
        load_class_folders(tmp_path / "data", "train", CLASSES[:2], image_size=SIZE, per_class=None, seed=0)


# --------------------------------------------------------------------------- bundle metadata


def _classes(names):
    return lambda m: m.update(classnames=names, base_classes=None)


BROKEN_METADATA = [
    # n_ctx: types, NaN, allocation-sized, beyond the context, silently truncated
    ("n_ctx abc", lambda m: m.update(n_ctx="abc"), r"'n_ctx' must be a positive integer .* got 'abc'"),
    ("n_ctx null", lambda m: m.update(n_ctx=None), r"'n_ctx' must be a positive integer .* got None"),
    ("n_ctx NaN", lambda m: m.update(n_ctx=float("nan")), r"'n_ctx' must be a positive integer .* got nan"),
    ("n_ctx 1e10", lambda m: m.update(n_ctx=10**10), r"'n_ctx' .* at most 512, got 10000000000"),
    ("n_ctx 16", lambda m: m.update(n_ctx=16), r"'n_ctx' is 16, but backbone ci-tiny-clip has a context of 16 tokens"),
    ("n_ctx 13", lambda m: m.update(n_ctx=13), r"'n_ctx' is 13, .* holds at most 12 context vectors"),
    ("n_ctx 12", lambda m: m.update(n_ctx=12), r"'classnames\[0\]' \('red circle'\) makes the prompt .* it would be cut"),
    ("n_ctx 4.9", lambda m: m.update(n_ctx=4.9), r"'n_ctx' must be a positive integer .* got 4.9"),
    ("n_ctx 4.0", lambda m: m.update(n_ctx=4.0), r"'n_ctx' must be a positive integer .* got 4.0"),
    ("n_ctx true", lambda m: m.update(n_ctx=True), r"'n_ctx' must be a positive integer .* got True"),
    # classes: count, duplicates, one prompt under two names, blank or multi-line names, base classes
    ("100,000 classes", _classes([f"c{i}" for i in range(100_000)]),
     rf"'classnames' must be a list of 1 to {MAX_CLASSES} class names, got a list of 100000 items"),
    ("no classes", _classes([]), r"'classnames' must be a list of 1 to"),
    ("duplicate class", _classes(["red circle", "red circle"]), r"'classnames': class 2 'red circle' is repeated"),
    ("underscore twin", _classes(["red circle", "red_circle"]), r"'classnames': class 2 'red_circle' and 'red circle' are one class to CLIP"),
    ("case twin", _classes(["red circle", "Red  Circle"]), r"'classnames': class 2 'Red  Circle' and 'red circle' are one class to CLIP"),
    ("blank class", _classes(["red circle", "   "]), r"'classnames\[1\]' must be a class name"),
    ("two-line class", _classes(["red circle", "a\nb"]), r"'classnames\[1\]' must be a class name: printable text on one"),
    ("class not text", _classes(["red circle", 7]), r"'classnames\[1\]' must be a class name"),
    ("base not a class", lambda m: m.update(base_classes=["purple moon"]), r"\['purple moon'\] are not classes"),
    ("base repeated", lambda m: m.update(base_classes=["red circle"] * 2), r"\['red circle'\] repeat"),
    # the template: str.format syntax, none or two slots
    ("template {0}", lambda m: m.update(template="a {0} photo of {}"), r"'template' must be a string holding exactly one"),
    ("template {}{}", lambda m: m.update(template="{} and {}"), r"'template' must be a string holding exactly one"),
    ("template brace", lambda m: m.update(template="{}}"), r"'template' must be a string holding exactly one"),
    ("template none", lambda m: m.update(template="a photo"), r"'template' must be a string holding exactly one"),
    ("template attr", lambda m: m.update(template="{.__class__}"), r"'template' must be a string holding exactly one"),
    # the backbone, the image, the tensors, the kind
    ("unknown model", lambda m: m["backbone"].update(name="ViT-B-61"), r"'backbone.name': unknown open_clip model"),
    ("foreign text tower", lambda m: m["backbone"].update(name="EVA02-B-16"), r"not a CLIP with open_clip's own text"),
    ("hf tokenizer", lambda m: m["backbone"].update(name="ViT-B-16-SigLIP"), r"not a CLIP with open_clip's own text"),
    ("bad sha", lambda m: m["backbone"].update(weights_sha256="abc"), r"'backbone.weights_sha256' must be a SHA-256"),
    ("no backbone name", lambda m: m["backbone"].pop("name"), r"'backbone' must be an object .* \(missing \['name'\]\)"),
    ("image size", lambda m: m["image"].update(size=224), r"'image.size' is 224, but backbone ci-tiny-clip takes .* 96"),
    ("image mean NaN", lambda m: m["image"].update(mean=[float("nan"), 0.4, 0.4]), r"'image.mean\[0\]' must be a finite"),
    ("image std 0", lambda m: m["image"].update(std=[0, 0.3, 0.3]), r"'image.std\[0\]' must be a finite number above 0"),
    ("tensor shape lie", lambda m: m["tensors"].update({"prompt_learner.ctx": [10**10, 64]}),
     r"'tensors.prompt_learner.ctx' is \[10000000000, 64\], but a cocoop bundle on backbone ci-tiny-clip holds it as \[4, 64\]"),
    ("extra tensor", lambda m: m["tensors"].update({"evil": [1]}), r"'tensors' names tensors a cocoop bundle does not hold"),
    ("kind", lambda m: m.update(kind="lora"), r"kind 'lora' is not supported"),
    ("kind list", lambda m: m.update(kind=["cocoop"]), r"kind \['cocoop'\] is not supported"),
    ("version", lambda m: m.update(version=2), r"'version' must be 1, got 2"),
    ("missing template", lambda m: m.pop("template"), r"missing keys \['template'\]"),
]


@pytest.mark.parametrize("name, change, message", BROKEN_METADATA, ids=[c[0] for c in BROKEN_METADATA])
def test_broken_metadata_is_refused_before_anything_is_allocated(bundles, tmp_path, monkeypatch, name, change, message):
    bundle = copy_of(bundles, "cocoop", tmp_path)
    rewrite(bundle, change)
    monkeypatch.setattr(bundle_module, "load_backbone", lambda *a, **k: pytest.fail("built a backbone"))
    monkeypatch.setattr(bundle_module, "safetensors_load", lambda *a, **k: pytest.fail("read the weights"))
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle)
    assert one_line(caught.value).startswith(str(bundle))


@pytest.mark.parametrize("kind, change, message", [
    ("coop", lambda m: m.update(class_specific="yes"), r"'class_specific' must be true or false, got 'yes'"),
    ("coop", lambda m: m.update(class_token_position="left"), r"'class_token_position' must be one of end, middle"),
    ("coop", lambda m: m.update(classnames=CLASSES[:3]), r"'tensors.prompt_learner.ctx' is \[4, 4, 64\], .* \[3, 4, 64\]"),
    ("zeroshot", lambda m: m.update(image_encoder={"sha256": "0" * 63}), r"'image_encoder.sha256' must be a SHA-256"),
    ("zeroshot", lambda m: m.update(template="a " * 20 + "{}"), r"makes the prompt .* \(template\) .* it would be cut"),
])
def test_the_other_kinds_fields_are_checked_too(bundles, tmp_path, kind, change, message):
    bundle = copy_of(bundles, kind, tmp_path)
    rewrite(bundle, change)
    with pytest.raises(BundleError, match=message):
        read_meta(bundle)


@pytest.mark.parametrize("size, message", [(MAX_META_BYTES + 1, "more than the 4194304"), (None, "nested too deeply")])
def test_a_huge_or_deep_metadata_file_is_refused_before_it_is_parsed(bundles, tmp_path, size, message):
    bundle = copy_of(bundles, "cocoop", tmp_path)
    text = (" " * size) if size else "[" * 200_000 + "]" * 200_000
    (bundle / "bundle.json").write_text(text)
    with pytest.raises(BundleError, match=message):
        read_meta(bundle)


@pytest.mark.parametrize("source", ["/etc/passwd", "../../weights.safetensors", "weights.pt",
                                    "https://example.invalid/w.safetensors", "hf-hub:someone/tiny-clip",
                                    "random:99999999999999999999999", "random:1e3"])
def test_weights_a_bundle_names_are_never_opened_or_fetched(bundles, tmp_path, monkeypatch, source):
    bundle = copy_of(bundles, "cocoop", tmp_path)
    rewrite(bundle, lambda m: m["backbone"].update(pretrained=source))
    for name in ("load_local_weights", "is_torchscript", "load_openai_archive", "reachable"):
        monkeypatch.setattr(weights_module, name, lambda *a, **k: pytest.fail(f"opened or fetched {source}"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(ConfigError, match=r"cannot load the bundle's backbone ci-tiny-clip .*--pretrained FILE") as caught:
        load_bundle(bundle)
    one_line(caught.value)


def test_a_tag_a_bundle_names_comes_from_the_cache_or_not_at_all(bundles, tmp_path, monkeypatch, random_backbone):
    import open_clip

    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_MODEL,
                        {"hostile": {"url": "https://example.invalid/weights/tiny.safetensors"}})
    monkeypatch.setattr(weights_module, "reachable", lambda *a, **k: pytest.fail("looked up the network"))
    bundle = copy_of(bundles, "cocoop", tmp_path)
    rewrite(bundle, lambda m: m["backbone"].update(pretrained="hostile"))
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ConfigError, match=r"'hostile' for ci-tiny-clip is not in the open_clip cache, and it is not "
                                          r"downloaded here"):
        load_bundle(bundle, cache_dir=str(cache))
    save_file({k: v.contiguous() for k, v in random_backbone.model.state_dict().items()}, str(cache / "tiny.safetensors"))
    model, _ = load_bundle(bundle, cache_dir=str(cache))  # the same weights, from the cache: fine
    assert model.backbone.weights_sha256 == random_backbone.weights_sha256


def _vit_bigg_bundle(bundles, tmp_path, header_ok: bool) -> Path:
    """A cocoop bundle whose metadata names ViT-bigG-14 (5 GB of weights) consistently."""
    arch = architecture("ViT-bigG-14")
    bundle = copy_of(bundles, "cocoop", tmp_path)

    def bigg(meta):
        meta["backbone"].update(name="ViT-bigG-14", pretrained="laion2b_s39b_b160k")
        meta["image"]["size"] = arch.image_size
        meta["tensors"] = {k: list(shape) for k, (shape, _) in expected_tensors(meta, arch).items()}

    rewrite(bundle, bigg)
    if header_ok:
        meta = read_meta(bundle)
        save_file({k: torch.zeros(shape) for k, (shape, _) in expected_tensors(meta, arch).items()},
                  str(bundle / "weights.safetensors"))
    return bundle


def test_a_big_architecture_is_not_allocated_before_everything_is_checked(bundles, tmp_path, monkeypatch):
    import open_clip

    wrong_header = _vit_bigg_bundle(bundles, tmp_path / "a", header_ok=False)
    right_header = _vit_bigg_bundle(bundles, tmp_path / "b", header_ok=True)
    for module, name in ((open_clip, "create_model"), (backbone_module, "_create_bare"), (weights_module, "reachable")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("allocated the backbone or looked up the network"))
    monkeypatch.setattr(weights_module, "cached_pretrained_file", lambda cfg, cache_dir=None: None)  # an empty cache
    with pytest.raises(BundleError, match=r"tensor 'prompt_learner.ctx' has shape \[4, 64\], expected \[4, 1280\]"):
        load_bundle(wrong_header)
    with pytest.raises(ConfigError, match=r"'laion2b_s39b_b160k' for ViT-bigG-14 is not in the open_clip cache, and it "
                                          r"is not downloaded here"):
        load_bundle(right_header)


def test_random_weights_of_a_huge_architecture_are_never_built_on_a_bundles_say_so(bundles, tmp_path, monkeypatch):
    bundle = _vit_bigg_bundle(bundles, tmp_path, header_ok=True)
    rewrite(bundle, lambda m: m["backbone"].update(pretrained="random:0"))
    monkeypatch.setattr(backbone_module, "_create_bare", lambda *a, **k: pytest.fail("allocated 10 GB"))
    with pytest.raises(ConfigError, match=r"random weights of ViT-bigG-14, 2540M parameters; a bundle may ask for "
                                          r"random weights of at most 500M .* pass --pretrained random:0"):
        load_bundle(bundle)


def test_a_bundles_own_files_never_lead_out_of_it(bundles, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("bundle.json", "weights.safetensors"):
        bundle = copy_of(bundles, "cocoop", tmp_path / name)
        shutil.move(bundle / name, outside / name)  # the very file, so that only the link can fail the load
        os.symlink(outside / name, bundle / name)
        with pytest.raises(BundleError, match=rf"{name}: a symbolic link to .*outside/{name}, outside the bundle"):
            load_bundle(bundle)
        shutil.move(outside / name, tmp_path / f"{name}.kept")


def test_a_huge_tensor_in_the_weights_header_is_refused_before_any_tensor_is_read(bundles, tmp_path, monkeypatch):
    bundle = copy_of(bundles, "cocoop", tmp_path)
    tensors = load_file(str(bundle / "weights.safetensors"))
    monkeypatch.setattr(bundle_module, "safetensors_load", lambda *a, **k: pytest.fail("read the tensors"))
    monkeypatch.setattr(bundle_module, "load_backbone", lambda *a, **k: pytest.fail("built a backbone"))
    save_file({**tensors, "prompt_learner.ctx": torch.zeros(400, 64)}, str(bundle / "weights.safetensors"))
    with pytest.raises(BundleError, match=r"tensor 'prompt_learner.ctx' has shape \[400, 64\], expected \[4, 64\]"):
        load_bundle(bundle)
    header = json.dumps({"prompt_learner.ctx": {"dtype": "F32", "shape": [100_000, 100_000],
                                                 "data_offsets": [0, 40_000_000_000]}}).encode()
    (bundle / "weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(bundle)
    save_file({**tensors, "prompt_learner.ctx": torch.zeros(4, 64, dtype=torch.int32)}, str(bundle / "weights.safetensors"))
    with pytest.raises(BundleError, match=r"'prompt_learner.ctx' is I32, expected floating point"):
        load_bundle(bundle)


def test_recorded_image_statistics_must_be_the_backbones(bundles, tmp_path, random_backbone):
    bundle = copy_of(bundles, "cocoop", tmp_path)
    rewrite(bundle, lambda m: m["image"].update(std=[0.5, 0.5, 0.5]))
    with pytest.raises(BundleError, match=r"'image.std' is \[0.5, 0.5, 0.5\], but backbone ci-tiny-clip"):
        load_bundle(bundle, backbone=random_backbone)


def test_bundles_written_before_the_schema_still_load(bundles, tmp_path, random_backbone):
    for kind in ("cocoop", "coop", "zeroshot"):
        bundle = copy_of(bundles, kind, tmp_path)
        expected, _ = load_bundle(bundles[kind], backbone=random_backbone)

        def older(meta):
            meta["backbone"].pop("quick_gelu")
            for key in ("base_classes", "ctx_init", "source"):
                meta.pop(key, None)
            if meta["kind"] == "cocoop":
                meta.pop("kind")  # the first bundles had no kind
            if "image_encoder" in meta:
                meta["image_encoder"].pop("tensor_prefix")
            meta["written_by_a_later_version"] = {"anything": [1, 2]}  # unknown keys are ignored

        rewrite(bundle, older)
        model, meta = load_bundle(bundle, backbone=None if kind == "cocoop" else random_backbone)  # rebuilt: random:0
        assert meta["kind"] == kind and model.backbone.weights_sha256 == random_backbone.weights_sha256
        loaded, original = model.trainable_state(), expected.trainable_state()
        assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in loaded)


def test_every_builtin_dataset_fits_the_tiny_clip_prompts():
    """The prompt checks refuse nothing the project's own datasets and templates produce."""
    arch = architecture(TINY_MODEL)
    plugins = registry()
    for name in plugins.names("dataset"):
        cls = plugins.get("dataset", name)
        if cls.needs_data_root:
            continue
        names = list(cls().classnames)
        meta = {"format": "clip-inspector-bundle", "version": 1, "kind": "cocoop", "n_ctx": 4,
                "backbone": {"name": TINY_MODEL, "pretrained": "builtin", "weights_sha256": "0" * 64},
                "classnames": names, "base_classes": names[:len(names) // 2], "template": "a photo of a {}.",
                "image": {"size": arch.image_size, "mean": [0.5] * 3, "std": [0.25] * 3}}
        meta["tensors"] = {k: list(shape) for k, (shape, _) in expected_tensors(meta, arch).items()}
        check_meta(meta, Path(name))


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["..", ".", "../outside", "/", "/etc", "a/b", "a\\b", "nul\0x"])
def test_a_class_name_never_leaves_the_data_folder(tmp_path, name):
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    (tmp_path / "data" / "outside").mkdir()
    write_good(tmp_path / "etc", 1)
    with pytest.raises(DataError, match="cannot name a class folder"):
        _class_folder(split, name)


def test_links_out_of_the_data_folder_are_refused(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    write_good(secret, 2)
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    os.symlink(secret, split / "red_circle")  # a class folder that is a link out
    read = []
    monkeypatch.setattr("ci_core.cli.repair.read_image", lambda path, size: read.append(path) or torch.zeros(3, SIZE, SIZE))
    with pytest.raises(DataError, match=r"red_circle: a symbolic link to .*secret, outside"):
        load_class_folders(tmp_path / "data", "train", ["red circle"], image_size=SIZE, per_class=None, seed=0)
    (split / "red_circle").unlink()
    write_good(split / "red_circle", 1)
    os.symlink(secret / "good0.png", split / "red_circle" / "linked.png")  # an image that is a link out
    with pytest.raises(DataError, match=r"linked.png: a symbolic link to .*good0.png, outside"):
        load_class_folders(tmp_path / "data", "train", ["red circle"], image_size=SIZE, per_class=None, seed=0)
    assert all(secret not in p.resolve().parents for p in read)


def test_a_delivery_folder_never_leads_out_of_itself(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.pth.tar-9").write_bytes(b"not yours")
    (outside / "passwd").write_text("root:x:0:0\n")
    output = tmp_path / "OUTPUT"
    learner = output / "prompt_learner"
    learner.mkdir(parents=True)
    (learner / "model.pth.tar-2").write_bytes(b"checkpoint 2")
    # the checkpoint file (Dassl's resume pointer, which CoCoOp's evaluation ignores) is not followed
    for named in ("../../outside/model.pth.tar-9", str(outside / "model.pth.tar-9"), "model.pth.tar-" + "9" * 5000):
        (learner / "checkpoint").write_text(named + "\n")
        assert resolve_checkpoint(output) == learner / "model.pth.tar-2"
    os.symlink(outside / "model.pth.tar-9", learner / "model.pth.tar-9")
    with pytest.raises(BundleError, match=r"model.pth.tar-9: a symbolic link to .*outside.*outside the delivery folder"):
        resolve_checkpoint(output)
    (learner / "model.pth.tar-9").unlink()
    (learner / "checkpoint").unlink()
    os.symlink(outside / "passwd", learner / "checkpoint")
    assert resolve_checkpoint(output) == learner / "model.pth.tar-2"  # Dassl's resume pointer is never opened
    shutil.rmtree(output)
    output.mkdir()
    os.symlink(outside, output / "prompt_learner")
    with pytest.raises(BundleError, match="outside the delivery folder"):
        resolve_checkpoint(output)


def test_a_coop_split_file_never_names_an_image_outside_the_dataset(tmp_path):
    from ci_core.data.coop import OxfordPets

    root = tmp_path / "oxford_pets"
    (root / "images").mkdir(parents=True)
    for bad in ("../../etc/passwd", "/etc/passwd"):
        (root / "split_zhou_OxfordPets.json").write_text(json.dumps(
            {"train": [[bad, 0, "abyssinian"]], "val": [], "test": []}))
        with pytest.raises(DataError, match=r"names the image .*; expected a path relative to the image folder"):
            OxfordPets(tmp_path).files("train")


# --------------------------------------------------------------------------- CLI values


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400", "[1, NaN]", "9" * 5000])
def test_non_finite_or_unreadable_numbers_are_refused_naming_the_option(raw):
    with pytest.raises(ConfigError, match=r"^--scorer-option k=") as caught:
        parse_options((f"k={raw}",), "--scorer-option")
    one_line(caught.value)


def test_a_bad_choice_says_what_is_allowed_without_attrs_internals():
    with pytest.raises(ConfigError) as caught:
        make_config(InspectorConfig, {"loss": "hinge"}, "ci options")
    assert str(caught.value) == "ci options: loss must be one of margin, ce, logit, got 'hinge'"


def _baseline_detectors():
    """NC and PixB from plugins/, imported without leaving them importable afterwards: the tests that discover
    them through their entry points (test_baselines.py, plugins/*/tests) make them look installed themselves."""
    import importlib
    import sys

    packages = ("ci_detectors_nc", "ci_detectors_pixb")
    before = {name for name in sys.modules if name.startswith(packages)}
    added = [str(ROOT / "plugins" / f) for f in ("ci-detectors-nc", "ci-detectors-pixb")]
    sys.path[:0] = added  # an installed copy, if imported already, is the one used
    try:
        return (importlib.import_module("ci_detectors_nc.detector").NeuralCleanse,
                importlib.import_module("ci_detectors_pixb.detector").PixelBackdoor)
    finally:
        for path in added:
            sys.path.remove(path)
        for name in [n for n in sys.modules if n.startswith(packages) and n not in before]:
            del sys.modules[name]


@functools.lru_cache(maxsize=1)
def _plugin_classes():
    """Every registered attack, detector, scorer and repairer, and the NC and PixB plugins from plugins/."""
    plugins = registry()
    found = {cls for kind in ("attack", "detector", "scorer", "repairer")
             for cls in (plugins.get(kind, n) for n in plugins.names(kind))}
    return sorted(found | set(_baseline_detectors()), key=lambda c: c.name)


def _numeric_fields(cls):
    for field in attrs.fields(cls.Config):
        default = field.default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            yield field.name, default


def test_every_plugin_refuses_non_finite_and_non_numeric_values_by_name():
    """The contract: no numeric config field of any plugin takes NaN, an infinity or text, nor an int field 2.5."""
    checked = 0
    for cls in _plugin_classes():
        cls.from_options()  # the defaults
        for preset in cls.presets:
            cls.from_options(preset=preset)  # and every preset are valid
        for name, default in _numeric_fields(cls):
            bad = [float("nan"), float("inf"), float("-inf"), "abc", None, [1]]
            if isinstance(default, int):
                bad += [2.5, True]
            for value in bad:
                with pytest.raises(ConfigError, match=rf"^{cls.name} options: {name} must ") as caught:
                    cls.from_options({name: value})
                one_line(caught.value)
                checked += 1
    assert checked > 300  # every plugin's fields were reached


def _run(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


def test_ci_scan_refuses_bad_values_by_name_before_the_pool_is_read(bundles, tmp_path, monkeypatch):
    monkeypatch.setattr("ci_core.cli.scan.load_pool", lambda *a, **k: pytest.fail("read the OOD pool"))
    base = [bundles["cocoop"], "--ood", "builtin", "--no-reference", "--out", tmp_path / "out", "--quiet"]
    for args, status, message in [
        (["--scorer-option", "k=NaN"], 1, "--scorer-option k=NaN: k must be a finite number"),
        (["--scorer-option", "k=-Infinity"], 1, "--scorer-option k=-Infinity: k must be a finite number"),
        (["--scorer-option", "k=abc"], 1, "ci options: k must be a finite number > 0, got 'abc'"),
        (["--option", "epsilon=Infinity"], 1, "--option epsilon=Infinity: epsilon must be a finite number"),
        (["--option", "loss=hinge"], 1, "ci options: loss must be one of margin, ce, logit, got 'hinge'"),
        (["--option", "batch_size=2.5"], 1, "ci options: batch_size must be an integer >= 1, got 2.5"),
        (["--seed", "1e23"], 2, "--seed"),
        (["--seed", "100000000000000000000000"], 2, "--seed"),
    ]:
        result = _run(ci_scan, [*base, *args])
        assert result.exit_code == status, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()


def test_ci_repair_refuses_bad_values_by_name_before_loading_anything(bundles, tmp_path, monkeypatch):
    monkeypatch.setattr("ci_core.cli.repair.load_bundle", lambda *a, **k: pytest.fail("loaded the model"))
    base = [bundles["cocoop"], "--report", tmp_path / "no-scan", "--data", "builtin", "--out", tmp_path / "r", "--quiet"]
    for args, status, message in [
        (["--seed", "1e23"], 2, "'--seed'"),
        (["--seed", "100000000000000000000000"], 2, "'--seed'"),
        (["--test-images", "0"], 2, "'--test-images'"),
        (["--shots", "0"], 2, "'--shots'"),
        (["--option", "epochs=abc"], 1, "ci-trigger options: epochs must be an integer >= 1, got 'abc'"),
        (["--option", "lr=NaN"], 1, "--option lr=NaN: lr must be a finite number"),
        (["--repairer", "random-delta", "--option", "noise=gaussian"], 1, "noise must be one of sign, uniform"),
        (["--json", bundles["cocoop"] / "bundle.json"], 1, "is BUNDLE"),  # would overwrite the input
    ]:
        result = _run(ci_repair, [*base, *args])
        assert result.exit_code == status, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    assert not (tmp_path / "r").exists()


def test_ci_bench_attack_refuses_a_negative_epoch_count_by_name(tmp_path):
    from ci_core.cli.bench import main as ci_bench

    result = _run(ci_bench, ["attack", "clean", "--dataset", "tiny-palette", "--option", "epochs=-3",
                             "--out", tmp_path / "out", "--quiet"])
    assert result.exit_code == 1 and "clean options: epochs must be an integer >= 1, got -3" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_non_finite_stored_tensors_are_named_for_the_scan(bundles, tmp_path, random_backbone):
    """A non-finite buffer can leave every output finite (an Inf BatchNorm mean makes features constant)."""
    for kind, key in (("zeroshot", "visual.bn1.running_mean"), ("cocoop", "prompt_learner.ctx")):
        bundle = copy_of(bundles, kind, tmp_path)
        _, meta = load_bundle(bundle, backbone=random_backbone)
        assert meta["non_finite_tensors"] == {}
        tensors = load_file(str(bundle / "weights.safetensors"))
        tensors[key][0] = float("inf")
        tensors[key].view(-1)[-1] = float("nan")
        save_file(tensors, str(bundle / "weights.safetensors"))
        if kind == "zeroshot":  # a provider writes a consistent bundle: the encoder's recorded hash matches
            rewrite(bundle, lambda m: m["image_encoder"].update(sha256=weights_module.state_dict_sha256(tensors)))
        _, meta = load_bundle(bundle, backbone=random_backbone)
        assert meta["non_finite_tensors"] == {key: 2 if tensors[key].dim() == 1 else tensors[key].shape[-1] + 1}
