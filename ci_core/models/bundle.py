"""The model bundle: how a prompt-tuned model travels from a provider to an auditor.

A bundle is a directory holding
* ``weights.safetensors``: the trained tensors; and
* ``bundle.json``: everything else, as plain JSON (its kind, backbone name,
  pretrained source and weight hash, class names, template, image
  preprocessing, the name and shape of every tensor).

Three kinds of model travel this way, named by the ``kind`` field:
* ``cocoop`` (also any bundle without a ``kind``): a CoCoOp prompt learner
  (``prompt_learner.*`` tensors and ``n_ctx``) over the frozen backbone;
* ``coop``: a CoOp prompt learner (``prompt_learner.ctx`` only), with its
  ``n_ctx``, ``class_token_position`` (end, middle or front) and
  ``class_specific`` (a context per class, whose rows are the bundle's
  ``classnames`` in order, or one shared context);
* ``zeroshot``: a zero-shot classifier whose image encoder was fine-tuned; it
  stores every image-encoder tensor (``visual.*``) and, besides the backbone's
  original weight hash, the hash of the fine-tuned encoder, which loading
  checks.

A bundle may record where it came from under ``source`` (``ci-import`` writes
the checkpoint it converted, its SHA-256 and epoch); loading ignores it.

A delivered bundle is untrusted input, read in an order that fails closed:
1. ``bundle.json`` (at most ``MAX_META_BYTES``) against its schema and the
   unallocated architecture of the backbone it names
   (``ci_core.models.bundle_schema``: types, ranges, class count, n_ctx, prompts,
   tensor shapes);
2. the header of ``weights.safetensors`` (names, shapes, dtypes; no data)
   against those shapes, so that no tensor is read that the model does not hold;
3. only then the backbone, whose weights come from the auditor's
   ``--pretrained``, or from what the bundle records when that is the builtin
   tiny CLIP, ``random:SEED`` or an open_clip tag already in open_clip's cache:
   never from a file, URL or hub repository a bundle names, and never over the
   network (``recorded_backbone_source``);
4. then the tensors.  Nothing is ever unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import open_clip
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from ci_core.errors import BundleError, ConfigError
from ci_core.files import read_json_object, temporary_folder
from ci_core.models.backbone import Backbone, TextEncoding, architecture, load_backbone
from ci_core.models.weights import BUILTIN, QUICKGELU_SUFFIX, random_seed, state_dict_sha256
from ci_core.models.bundle_schema import (COCOOP, COOP, FORMAT, MAX_META_BYTES, VERSION, ZEROSHOT, check_meta,
                                          expected_tensors)
from ci_core.models.cocoop import DEFAULT_TEMPLATE, PromptTunedCLIP
from ci_core.models.coop import CoOpCLIP
from ci_core.models.zeroshot import ZeroShotCLIP

META_FILE = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"
# Random weights a bundle may ask for (random:SEED is the project's test weights): ViT-L/14 (428M parameters,
# 1.6 GiB) and everything smaller; ViT-H/14 and ViT-bigG/14 (1.0 and 2.5 billion) only from the auditor's
# --pretrained.
MAX_RANDOM_PARAMETERS = 500_000_000
# safetensors dtypes of floating-point tensors.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Every model a bundle can hold.
BundledModel = PromptTunedCLIP | CoOpCLIP | ZeroShotCLIP


def bundle_meta(model: BundledModel, classnames: Sequence[str], *, base_classes: Sequence[str] | None = None,
                template: str | None = None, where: str | Path = "bundle") -> tuple[dict, dict[str, torch.Tensor]]:
    """(the metadata ``bundle.json`` holds, the tensors ``weights.safetensors`` holds) for ``model``.

    ``template`` is recorded for a CoCoOp or CoOp model (default "a photo of a {}."); a zero-shot model
    records its own, and a different ``template`` is refused.  ``where`` names the bundle in errors.
    """
    if not isinstance(model, (PromptTunedCLIP, CoOpCLIP, ZeroShotCLIP)):
        raise BundleError(f"{where}: cannot write a {type(model).__name__}; expected a PromptTunedCLIP, a CoOpCLIP "
                          "or a ZeroShotCLIP")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}
    backbone = model.backbone
    zero_shot = isinstance(model, ZeroShotCLIP)
    if zero_shot and template is not None and template != model.template:
        raise BundleError(f"{where}: the zero-shot model classifies with template {model.template!r}, not {template!r}")
    if isinstance(model, CoOpCLIP) and model.class_specific and tuple(classnames) != model.ctx_classes:
        raise BundleError(f"{where}: the CoOp model's context is class-specific for {len(model.ctx_classes)} classes "
                          f"({', '.join(model.ctx_classes[:5])}{', ...' if len(model.ctx_classes) > 5 else ''}); "
                          "its bundle's classes must be exactly those, in order")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": ZEROSHOT if zero_shot else COOP if isinstance(model, CoOpCLIP) else COCOOP,
        "backbone": backbone.identity(),
        "classnames": list(classnames),
        "base_classes": list(base_classes) if base_classes is not None else None,
        "template": model.template if zero_shot else template or DEFAULT_TEMPLATE,
    }
    if zero_shot:
        # Tensors of the image encoder may share storage with one another; safetensors wants them apart.
        tensors = {k: v.clone() for k, v in tensors.items()}
        meta["image_encoder"] = {"sha256": state_dict_sha256(tensors), "tensor_prefix": "visual."}
    else:
        meta.update(n_ctx=model.n_ctx, ctx_init=model.ctx_init)
    if isinstance(model, CoOpCLIP):
        meta.update(class_token_position=model.class_token_position, class_specific=model.class_specific)
    meta["image"] = {"size": backbone.image_size, "mean": list(backbone.mean), "std": list(backbone.std)}
    meta["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    return meta, tensors


def save_bundle(model: BundledModel, classnames: Sequence[str], path: str | Path, *,
                base_classes: Sequence[str] | None = None, template: str | None = None,
                source: dict | None = None) -> Path:
    """Write ``model`` as a bundle directory at ``path`` (atomically: a temporary directory, then a rename).

    ``template`` as for ``bundle_meta``; ``source`` (JSON) records where the model came from.
    """
    path = Path(path)
    if path.exists():
        raise BundleError(f"{path} already exists; refusing to overwrite a bundle")
    meta, tensors = bundle_meta(model, classnames, base_classes=base_classes, template=template, where=path)
    if source is not None:
        meta["source"] = source
    with temporary_folder(path.parent, f".{path.name}.") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, path)
    return path


def read_meta(path: str | Path) -> dict:
    """The metadata of the bundle at ``path``, checked (``bundle_schema.check_meta``) before anything else is read."""
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise BundleError(f"{path}: a bundle is a directory holding {META_FILE} and {WEIGHTS_FILE}")
    _inside(meta_path, path)
    meta = read_json_object(meta_path, BundleError, "a bundle's metadata", max_bytes=MAX_META_BYTES)
    return check_meta(meta, meta_path)


def _inside(file: Path, bundle: Path) -> None:
    """A bundle's file is the provider's: one that is a link to a file elsewhere is refused, never read."""
    if file.is_symlink() and not file.resolve().is_relative_to(bundle.resolve()):
        raise BundleError(f"{file}: a symbolic link to {file.resolve()}, outside the bundle; a bundle's files are "
                          "read only inside it")


def bundle_sha256(path: str | Path) -> str:
    """Identity of a bundle: hash of its metadata and weights files."""
    digest = hashlib.sha256()
    for name in (META_FILE, WEIGHTS_FILE):
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


def _describe(name: str, pretrained: str, quick_gelu: bool | None, sha: str) -> str:
    gelu = "" if quick_gelu is None else (", QuickGELU" if quick_gelu else ", GELU")
    return f"{name} ({pretrained}{gelu}) with weights sha256 {sha}"


def check_backbone(path: Path, ident: dict, backbone: Backbone) -> None:
    """The bundle's prompt learner only means something on the backbone it was trained on."""
    recorded_gelu = ident.get("quick_gelu")  # absent from bundles written before it was recorded
    same_architecture = (ident["name"].removesuffix(QUICKGELU_SUFFIX) == backbone.architecture[0]
                         and (recorded_gelu is None or bool(recorded_gelu) == backbone.quick_gelu))
    if not same_architecture or backbone.weights_sha256 != ident["weights_sha256"]:
        raise BundleError(
            f"{path}: the bundle was trained on backbone "
            f"{_describe(ident['name'], ident.get('pretrained', '?'), recorded_gelu, ident['weights_sha256'])}, "
            f"but the backbone given is "
            f"{_describe(backbone.name, backbone.pretrained, backbone.quick_gelu, backbone.weights_sha256)}"
        )


def recorded_backbone_source(path: str | Path, ident: dict) -> None:
    """Refuse weights a bundle names that this tool would have to open or fetch on the bundle's say-so.

    A bundle's backbone is rebuilt from what it records only for the builtin tiny CLIP, ``random:SEED``
    and an open_clip pretrained tag (then read from open_clip's cache, never downloaded); any other source
    (a file path, a URL, a hub repository) the auditor must give with ``--pretrained``.
    """
    name, source = ident["name"], ident["pretrained"]
    if random_seed(source) is not None:
        parameters = architecture(name).parameters
        if parameters > MAX_RANDOM_PARAMETERS:
            raise ConfigError(f"the bundle asks for random weights of {name}, {parameters / 1e6:.0f}M parameters; a "
                              f"bundle may ask for random weights of at most {MAX_RANDOM_PARAMETERS / 1e6:.0f}M (the "
                              f"project's test weights), so as not to allocate {parameters * 4 / 2**30:.1f} GiB on its "
                              f"say-so: pass --pretrained {source} to build them anyway")
        return
    if source == BUILTIN or open_clip.is_pretrained_cfg(name, source):
        return
    raise ConfigError(f"the bundle records its weights as {source!r}, which is not an open_clip tag of {name}, "
                      "'builtin' or random:SEED; weights are never read from a file, URL or hub repository that a "
                      "bundle names (it comes from the party being audited)")


def bundle_backbone(path: str | Path, meta: dict, device: str | torch.device = "cpu", *, name: str | None = None,
                    pretrained: str | None = None, text_encoding: TextEncoding | None = None,
                    cache_dir: str | None = None) -> Backbone:
    """The backbone a bundle names, or ``name``/``pretrained`` instead (e.g. a local copy of its weights).

    For weights given as a file or random seed, the activation is the one the bundle records.  Weights the
    bundle names are taken only as ``recorded_backbone_source`` allows, and a tag only from the cache.
    """
    ident = meta["backbone"]
    try:
        if pretrained is None:
            recorded_backbone_source(path, ident)
        return load_backbone(name or ident["name"], pretrained or ident["pretrained"], device,
                             quick_gelu=ident.get("quick_gelu"), text_encoding=text_encoding, cache_dir=cache_dir,
                             allow_download=pretrained is not None)
    except ConfigError as exc:
        if pretrained is not None:
            raise
        raise ConfigError(f"{path}: cannot load the bundle's backbone {ident['name']} ({ident['pretrained']}): {exc}. "
                          "If you have its weights as a file, pass it with --pretrained FILE") from exc


def _read_header(weights_path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every tensor in a safetensors file, from its header alone (no tensor data is read)."""
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: (tuple(handle.get_slice(key).get_shape()), str(handle.get_slice(key).get_dtype()))
                    for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{weights_path}: not a readable safetensors file ({exc})") from exc


def _check_header(weights_path: Path, meta: dict) -> None:
    """The weights file holds exactly the tensors the metadata describes, with those shapes, before any is read."""
    _inside(weights_path, weights_path.parent)
    if not weights_path.is_file():
        raise BundleError(f"{weights_path.parent}: missing {WEIGHTS_FILE}")
    header = _read_header(weights_path)
    expected = expected_tensors(meta, architecture(meta["backbone"]["name"]))
    for key, (shape, floating) in expected.items():
        if key not in header:
            raise BundleError(f"{weights_path}: missing tensor {key!r} (expected shape {list(shape)})")
        found, dtype = header[key]
        if found != shape:
            raise BundleError(f"{weights_path}: tensor {key!r} has shape {list(found)}, expected {list(shape)}")
        if (dtype in _FLOAT_DTYPES) != floating:
            raise BundleError(f"{weights_path}: tensor {key!r} is {dtype}, expected "
                              + ("floating point (F16, BF16, F32 or F64)" if floating else "an integer type"))
    extra = sorted(set(header) - set(expected))
    if extra:
        raise BundleError(f"{weights_path}: unexpected tensors {extra[:10]}")


def _check_image(path: Path, meta: dict, backbone: Backbone) -> None:
    """The image statistics the bundle records are the ones its backbone normalises with."""
    image = meta["image"]
    for key, recorded, actual in (("mean", image["mean"], backbone.mean), ("std", image["std"], backbone.std)):
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(recorded, actual)):
            raise BundleError(f"{path / META_FILE}: 'image.{key}' is {list(recorded)}, but backbone "
                              f"{backbone.name} ({backbone.pretrained}) normalises images with {list(actual)}")


def load_bundle(path: str | Path, backbone: Backbone | None = None, device: str | torch.device = "cpu", *,
                name: str | None = None, pretrained: str | None = None, text_encoding: TextEncoding | None = None,
                cache_dir: str | None = None) -> tuple[BundledModel, dict]:
    """Load a bundle: (model, metadata); ``meta["sha256"]`` is the bundle's identity (``bundle_sha256``).

    ``backbone`` is reused if given, else built from the metadata, with ``name``
    and ``pretrained`` replacing the recorded ones if given.  Either way its
    architecture and weight hash must be the ones the bundle was trained on.
    The model is a ``PromptTunedCLIP`` for a CoCoOp bundle, a ``CoOpCLIP`` for a CoOp one and a
    ``ZeroShotCLIP`` for a zero-shot one.  ``meta["non_finite_tensors"]`` names every stored tensor that holds
    NaN or infinite values, with how many (``non_finite_tensors``); such a model loads, and it is the
    scan's part to call it unscannable.
    """
    path = Path(path)
    meta = read_meta(path)
    weights_path = path / WEIGHTS_FILE
    _check_header(weights_path, meta)  # before the backbone is allocated or any tensor read
    if backbone is None:
        backbone = bundle_backbone(path, meta, device, name=name, pretrained=pretrained, text_encoding=text_encoding,
                                   cache_dir=cache_dir)
    elif text_encoding is not None:
        backbone = backbone.with_text_encoding(text_encoding)
    check_backbone(path, meta["backbone"], backbone)
    _check_image(path, meta, backbone)
    try:
        # The weights are read once: the same bytes are hashed into the bundle's identity and parsed.
        weights = weights_path.read_bytes()
        tensors = safetensors_load(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    meta["sha256"] = hashlib.sha256((path / META_FILE).read_bytes() + weights).hexdigest()  # as bundle_sha256
    meta["non_finite_tensors"] = non_finite_tensors(tensors)
    if meta["kind"] == ZEROSHOT:
        return _load_zeroshot(weights_path, tensors, backbone, meta), meta
    if meta["kind"] == COOP:
        coop = CoOpCLIP(backbone, n_ctx=meta["n_ctx"], class_token_position=meta["class_token_position"],
                        ctx_classes=meta["classnames"] if meta["class_specific"] else None)
        _check_tensors(weights_path, tensors, coop.trainable_state())
        coop.prompt_learner.load_state_dict({k.removeprefix("prompt_learner."): v.to(torch.float32)
                                             for k, v in tensors.items()})
        return coop.eval(), meta
    model = PromptTunedCLIP(backbone, n_ctx=meta["n_ctx"], ctx_init=None)
    _check_tensors(weights_path, tensors, model.trainable_state())
    state = {k.removeprefix("prompt_learner."): v.to(torch.float32) for k, v in tensors.items()}
    model.prompt_learner.load_state_dict(state)
    model.ctx_init = meta.get("ctx_init")
    return model.eval(), meta


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: number of NaN or infinite values} of every floating-point tensor that holds any, by name.

    A provider can hide a model from every test of its outputs behind a non-finite buffer (a BatchNorm
    running mean of +Inf turns its features into constants): a scan must see the weights themselves.
    """
    found = {}
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                found[key] = count
    return found


def _check_tensors(weights_path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor present with its exact shape, and nothing else."""
    for key, reference in expected.items():
        shape = tuple(reference.shape)
        if key not in tensors:
            raise BundleError(f"{weights_path}: missing tensor {key!r} (expected shape {list(shape)})")
        if tuple(tensors[key].shape) != shape:
            raise BundleError(
                f"{weights_path}: tensor {key!r} has shape {list(tensors[key].shape)}, expected {list(shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise BundleError(f"{weights_path}: unexpected tensors {extra}")


def _load_zeroshot(weights_path: Path, tensors: dict[str, torch.Tensor], backbone: Backbone, meta: dict) -> ZeroShotCLIP:
    model = ZeroShotCLIP(backbone, template=meta["template"])
    expected = model.trainable_state()
    _check_tensors(weights_path, tensors, expected)
    # The hash covers names, shapes, dtypes and bytes as stored: any edit of the weights shows.
    recorded = meta["image_encoder"]["sha256"]
    actual = state_dict_sha256(tensors)
    if actual != recorded:
        raise BundleError(f"{weights_path}: the image-encoder tensors hash to sha256 {actual[:16]}..., but "
                          f"{META_FILE} records {recorded[:16]}...; the weights were changed after the bundle was written")
    state = {k.removeprefix("visual."): v.to(expected[k].dtype) for k, v in tensors.items()}
    model.clip.visual.load_state_dict(state)
    return model.eval()
