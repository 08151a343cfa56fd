"""The model bundle: how a prompt-tuned model travels from a provider to an auditor.

A bundle is a directory holding
* ``weights.safetensors``: the trained tensors (the prompt learner); and
* ``bundle.json``: everything else, as plain JSON (backbone name, pretrained
  source and weight hash, class names, template, n_ctx, image preprocessing,
  the name and shape of every tensor).

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
from ci_core.models.backbone import QUICKGELU_SUFFIX, Backbone, TextEncoding, load_backbone
from ci_core.models.cocoop import DEFAULT_TEMPLATE, PromptTunedCLIP

FORMAT = "clip-inspector-bundle"
VERSION = 1
META_FILE = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"
_REQUIRED = ("format", "version", "kind", "backbone", "classnames", "template", "n_ctx", "image", "tensors")


def save_bundle(model: PromptTunedCLIP, classnames: Sequence[str], path: str | Path, *,
                base_classes: Sequence[str] | None = None, template: str = DEFAULT_TEMPLATE) -> Path:
    """Write ``model`` as a bundle directory at ``path`` (atomically: a temporary directory, then a rename)."""
    path = Path(path)
    if path.exists():
        raise BundleError(f"{path} already exists; refusing to overwrite a bundle")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}
    backbone = model.backbone
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "cocoop",
        "backbone": backbone.identity(),
        "classnames": list(classnames),
        "base_classes": list(base_classes) if base_classes is not None else None,
        "template": template,
        "n_ctx": model.n_ctx,
        "ctx_init": model.ctx_init,
        "image": {"size": backbone.image_size, "mean": list(backbone.mean), "std": list(backbone.std)},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
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
    if not meta_path.is_file():
        raise BundleError(f"{path}: missing {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise BundleError(f"{meta_path}: missing keys {missing}")
    if meta["format"] != FORMAT or meta["version"] != VERSION:
        raise BundleError(f"{meta_path}: format {meta['format']!r} version {meta['version']!r}, expected {FORMAT!r} version {VERSION}")
    if meta["kind"] != "cocoop":
        raise BundleError(f"{meta_path}: kind {meta['kind']!r} is not supported (expected 'cocoop')")
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
                cache_dir: str | None = None) -> tuple[PromptTunedCLIP, dict]:
    """Load a bundle: (model, metadata).

    ``backbone`` is reused if given, else built from the metadata, with ``name``
    and ``pretrained`` replacing the recorded ones if given.  Either way its
    architecture and weight hash must be the ones the bundle was trained on.
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
    model = PromptTunedCLIP(backbone, n_ctx=int(meta["n_ctx"]), ctx_init=None)
    expected = {k: tuple(v.shape) for k, v in model.trainable_state().items()}
    for key, shape in expected.items():
        if key not in tensors:
            raise BundleError(f"{weights_path}: missing tensor {key!r} (expected shape {list(shape)})")
        if tuple(tensors[key].shape) != shape:
            raise BundleError(
                f"{weights_path}: tensor {key!r} has shape {list(tensors[key].shape)}, expected {list(shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise BundleError(f"{weights_path}: unexpected tensors {extra}")
    state = {k.removeprefix("prompt_learner."): v.to(torch.float32) for k, v in tensors.items()}
    model.prompt_learner.load_state_dict(state)
    model.ctx_init = meta.get("ctx_init")
    return model.eval(), meta
