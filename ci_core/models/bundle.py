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

A delivered bundle is untrusted input: nothing in it is ever unpickled or
executed, and every tensor is checked against the shape the metadata and the
backbone imply before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ci_core.errors import BundleError, ConfigError
from ci_core.files import read_json_object
from ci_core.models.backbone import QUICKGELU_SUFFIX, Backbone, TextEncoding, load_backbone, state_dict_sha256
from ci_core.models.cocoop import DEFAULT_TEMPLATE, PromptTunedCLIP
from ci_core.models.coop import POSITIONS, CoOpCLIP
from ci_core.models.zeroshot import ZeroShotCLIP

FORMAT = "clip-inspector-bundle"
VERSION = 1
META_FILE = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"
COCOOP, COOP, ZEROSHOT = "cocoop", "coop", "zeroshot"
_COMMON = ("format", "version", "backbone", "classnames", "template", "image", "tensors")
_REQUIRED = {COCOOP: _COMMON + ("n_ctx",), COOP: _COMMON + ("n_ctx", "class_token_position", "class_specific"),
             ZEROSHOT: _COMMON + ("image_encoder",)}
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise BundleError(f"{path}: a bundle is a directory holding {META_FILE} and {WEIGHTS_FILE}")
    meta = read_json_object(meta_path, BundleError, "a bundle's metadata")
    kind = meta.setdefault("kind", COCOOP)  # bundles written before zero-shot ones existed have no kind
    if kind not in _REQUIRED:
        raise BundleError(f"{meta_path}: kind {kind!r} is not supported (expected one of {sorted(_REQUIRED)})")
    missing = [k for k in _REQUIRED[kind] if k not in meta]
    if missing:
        raise BundleError(f"{meta_path}: missing keys {missing}")
    if meta["format"] != FORMAT or meta["version"] != VERSION:
        raise BundleError(f"{meta_path}: format {meta['format']!r} version {meta['version']!r}, expected {FORMAT!r} version {VERSION}")
    if kind == ZEROSHOT:
        template = meta["template"]  # a zero-shot model classifies with it
        if not isinstance(template, str) or template.count("{}") != 1:
            raise BundleError(f"{meta_path}: 'template' must be a string holding exactly one '{{}}', got {template!r}")
        encoder = meta["image_encoder"]
        if not isinstance(encoder, dict) or not isinstance(encoder.get("sha256"), str) or len(encoder["sha256"]) != 64:
            raise BundleError(f"{meta_path}: 'image_encoder' must record the fine-tuned encoder's 'sha256' (64 hex digits)")
    else:
        n_ctx = meta["n_ctx"]
        if type(n_ctx) is not int or n_ctx < 1:
            raise BundleError(f"{meta_path}: 'n_ctx' must be a positive integer, got {n_ctx!r}")
    if kind == COOP:
        if meta["class_token_position"] not in POSITIONS:
            raise BundleError(f"{meta_path}: 'class_token_position' must be one of {', '.join(POSITIONS)}, "
                              f"got {meta['class_token_position']!r}")
        if not isinstance(meta["class_specific"], bool):
            raise BundleError(f"{meta_path}: 'class_specific' must be true or false, got {meta['class_specific']!r}")
    names = meta["classnames"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise BundleError(f"{meta_path}: 'classnames' must be a non-empty list of strings")
    if len(set(names)) != len(names):
        raise BundleError(f"{meta_path}: 'classnames' has duplicates")
    return meta


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


def bundle_backbone(path: str | Path, meta: dict, device: str | torch.device = "cpu", *, name: str | None = None,
                    pretrained: str | None = None, text_encoding: TextEncoding | None = None,
                    cache_dir: str | None = None) -> Backbone:
    """The backbone a bundle names, or ``name``/``pretrained`` instead (e.g. a local copy of its weights).

    For weights given as a file or random seed, the activation is the one the bundle records.
    """
    ident = meta["backbone"]
    for key in ("name", "pretrained", "weights_sha256"):
        if not isinstance(ident, dict) or not isinstance(ident.get(key), str):
            raise BundleError(f"{Path(path) / META_FILE}: 'backbone' needs a string {key!r}")
    try:
        return load_backbone(name or ident["name"], pretrained or ident["pretrained"], device,
                             quick_gelu=ident.get("quick_gelu"), text_encoding=text_encoding, cache_dir=cache_dir)
    except ConfigError as exc:
        if pretrained is not None:
            raise
        raise ConfigError(f"{path}: cannot load the bundle's backbone {ident['name']} ({ident['pretrained']}): {exc}. "
                          "If you have its weights as a file, pass it with --pretrained FILE") from exc


def load_bundle(path: str | Path, backbone: Backbone | None = None, device: str | torch.device = "cpu", *,
                name: str | None = None, pretrained: str | None = None, text_encoding: TextEncoding | None = None,
                cache_dir: str | None = None) -> tuple[BundledModel, dict]:
    """Load a bundle: (model, metadata).

    ``backbone`` is reused if given, else built from the metadata, with ``name``
    and ``pretrained`` replacing the recorded ones if given.  Either way its
    architecture and weight hash must be the ones the bundle was trained on.
    The model is a ``PromptTunedCLIP`` for a CoCoOp bundle, a ``CoOpCLIP`` for a CoOp one and a
    ``ZeroShotCLIP`` for a zero-shot one.
    """
    path = Path(path)
    meta = read_meta(path)
    if backbone is None:
        backbone = bundle_backbone(path, meta, device, name=name, pretrained=pretrained, text_encoding=text_encoding,
                                   cache_dir=cache_dir)
    elif text_encoding is not None:
        backbone = backbone.with_text_encoding(text_encoding)
    check_backbone(path, meta["backbone"], backbone)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    if meta["kind"] == ZEROSHOT:
        return _load_zeroshot(weights_path, tensors, backbone, meta), meta
    if meta["kind"] == COOP:
        coop = CoOpCLIP(backbone, n_ctx=meta["n_ctx"], class_token_position=meta["class_token_position"],
                        ctx_classes=meta["classnames"] if meta["class_specific"] else None)
        _check_tensors(weights_path, tensors, coop.trainable_state())
        coop.prompt_learner.load_state_dict({k.removeprefix("prompt_learner."): v.to(torch.float32)
                                             for k, v in tensors.items()})
        return coop.eval(), meta
    model = PromptTunedCLIP(backbone, n_ctx=int(meta["n_ctx"]), ctx_init=None)
    _check_tensors(weights_path, tensors, model.trainable_state())
    state = {k.removeprefix("prompt_learner."): v.to(torch.float32) for k, v in tensors.items()}
    model.prompt_learner.load_state_dict(state)
    model.ctx_init = meta.get("ctx_init")
    return model.eval(), meta


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
