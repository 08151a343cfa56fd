"""What a bundle's ``bundle.json`` may hold: every field with its type and range, checked before anything is opened.

A delivered bundle comes from the party being audited, so its metadata is checked whole, and its weights'
header against it, before any weights are read or any model is allocated (``ci_core.models.bundle``):

1. the file is at most ``MAX_META_BYTES`` (a bundle of ``MAX_CLASSES`` long names fits many times over);
2. ``SCHEMA_BY_KIND`` (JSON Schema, checked with jsonschema; integers are never floats or booleans and
   numbers are always finite, unlike plain JSON Schema) fixes the types, ranges and sizes of every field;
3. ``check_meta`` then checks what a schema cannot say: distinct classes, base classes among them, a
   backbone that is a known open_clip CLIP (``ci_core.models.backbone.architecture``, built unallocated),
   an ``n_ctx`` that leaves room in its context length, every class prompt (the context's "X .. X
   {name}." and the template's) fitting that context uncut and distinct from every other class's (so
   "red_circle" and "red circle", one prompt, are refused), the image size of that backbone, and the
   tensor names and shapes that kind of model has on it.

The template is only ever filled by a literal replacement of its one "{}" (``ZeroShotCLIP``), never by
``str.format``.  Where the backbone's weights come from is checked when they are loaded
(``bundle.recorded_backbone_source``): a bundle never names a file, URL or hub repository that is opened.
Errors are ``BundleError`` naming the file, the field (``classnames[3]``), what it must be and the value.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from ci_core.models.class_names import MAX_CLASSES, MAX_NAME_CHARS, check_class_names
from ci_core.errors import BundleError, ConfigError
from ci_core.models.backbone import Architecture, architecture
from ci_core.models.coop import POSITIONS
from ci_core.validators import is_finite_number, printable

FORMAT = "clip-inspector-bundle"
VERSION = 1
COCOOP, COOP, ZEROSHOT = "cocoop", "coop", "zeroshot"
KINDS = (COCOOP, COOP, ZEROSHOT)

MAX_TEMPLATE_CHARS = 300
# 2 x 4,096 names of 300 characters are 2.5 MB; an ImageNet bundle's metadata is 60 kB.  A larger file is
# refused before it is parsed (JSON takes about four times its size in memory).
MAX_META_BYTES = 4 * 1024**2
# The largest image encoders (ViT-bigG, RN50x64) have under 1,000 tensors.
MAX_TENSORS = 4096
# A cheap bound before the backbone's context length is known; check_meta applies the real one.
MAX_N_CTX = 512
ENCODER_PREFIX = "visual."

# Text on one line: no control characters (C0, C1) and no Unicode line or paragraph separators.
_ONE_LINE = r"\x00-\x1f\x7f-\x9f\u2028\u2029"
_NAME = {
    "type": "string", "maxLength": MAX_NAME_CHARS, "pattern": rf"^(?=.*\S)[^{_ONE_LINE}]+$",
    "description": f"must be a class name: printable text on one line, not blank, at most {MAX_NAME_CHARS} "
                   "characters",
}
_CLASS_LIST = {
    "type": "array", "maxItems": MAX_CLASSES, "minItems": 1, "items": _NAME,
    "description": f"must be a list of 1 to {MAX_CLASSES} class names",
}
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "must be a SHA-256 (64 lowercase hex digits)"}
_SHAPE = {
    "type": "array", "maxItems": 8,
    "items": {"type": "integer", "minimum": 0, "maximum": 2**40, "description": "must be an integer from 0 to 2^40"},
    "description": "must be a tensor shape: a list of at most 8 integers from 0 to 2^40",
}
_UNIT = {"type": "number", "minimum": 0, "maximum": 1, "description": "must be a finite number from 0 to 1"}
_N_CTX = {"type": "integer", "minimum": 1, "maximum": MAX_N_CTX,
          "description": f"must be a positive integer (the context vectors), at most {MAX_N_CTX}"}

_COMMON_PROPERTIES: dict[str, Any] = {
    "format": {"const": FORMAT},
    "version": {"const": VERSION},
    "kind": {"enum": list(KINDS)},
    "backbone": {
        "type": "object", "required": ["name", "pretrained", "weights_sha256"],
        "description": "must be an object with the backbone's 'name', 'pretrained' and 'weights_sha256'",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200,
                     "description": "must be an open_clip model name"},
            "pretrained": {"type": "string", "minLength": 1, "maxLength": 4096,
                           "description": "must be where the backbone's weights came from (a string)"},
            "quick_gelu": {"type": ["boolean", "null"], "description": "must be true, false or null"},
            "weights_sha256": _HEX64,
        },
    },
    "classnames": _CLASS_LIST,
    "base_classes": {**_CLASS_LIST, "type": ["array", "null"],
                     "description": f"must be null or a list of 1 to {MAX_CLASSES} class names"},
    "template": {
        "type": "string", "maxLength": MAX_TEMPLATE_CHARS, "pattern": rf"^[^{{}}{_ONE_LINE}]*\{{\}}[^{{}}{_ONE_LINE}]*$",
        "description": f"must be a string holding exactly one '{{}}' (where the class name goes), no other brace, "
                       f"on one line, at most {MAX_TEMPLATE_CHARS} characters",
    },
    "image": {
        "type": "object", "required": ["size", "mean", "std"],
        "description": "must be an object with the image 'size', 'mean' and 'std'",
        "properties": {
            "size": {"type": "integer", "minimum": 1, "maximum": 4096,
                     "description": "must be the image side in pixels, an integer from 1 to 4096"},
            "mean": {"type": "array", "minItems": 3, "maxItems": 3, "items": _UNIT,
                     "description": "must be three finite numbers from 0 to 1"},
            "std": {"type": "array", "minItems": 3, "maxItems": 3,
                    "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                              "description": "must be a finite number above 0, at most 1"},
                    "description": "must be three finite numbers above 0, at most 1"},
        },
    },
    "tensors": {
        "type": "object", "maxProperties": MAX_TENSORS,
        "propertyNames": {"maxLength": 300, "description": "must name each tensor in at most 300 characters"},
        "additionalProperties": _SHAPE,
        "description": f"must be an object of at most {MAX_TENSORS} tensor names (of at most 300 characters) "
                       "and their shapes",
    },
    "source": {"type": "object", "description": "must be an object (where the model came from)"},
}
_KIND_PROPERTIES: dict[str, dict[str, Any]] = {
    COCOOP: {
        "n_ctx": _N_CTX,
        "ctx_init": {"type": ["string", "null"], "maxLength": MAX_TEMPLATE_CHARS,
                     "description": f"must be null or text of at most {MAX_TEMPLATE_CHARS} characters"},
    },
    COOP: {
        "n_ctx": _N_CTX,
        "class_token_position": {"enum": list(POSITIONS)},
        "class_specific": {"type": "boolean", "description": "must be true or false"},
    },
    ZEROSHOT: {
        "image_encoder": {
            "type": "object", "required": ["sha256"],
            "description": "must record the fine-tuned encoder's 'sha256' (64 hex digits)",
            "properties": {"sha256": _HEX64, "tensor_prefix": {"const": ENCODER_PREFIX}},
        },
    },
}
_COMMON_REQUIRED = ["format", "version", "backbone", "classnames", "template", "image", "tensors"]
REQUIRED = {COCOOP: _COMMON_REQUIRED + ["n_ctx"],
            COOP: _COMMON_REQUIRED + ["n_ctx", "class_token_position", "class_specific"],
            ZEROSHOT: _COMMON_REQUIRED + ["image_encoder"]}
# One schema per kind; "required" first, so that the first error met is the one reported.  Keys a kind does
# not know are allowed (and ignored), so that bundles with newer optional fields still load.
SCHEMA_BY_KIND = {kind: {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                         "required": REQUIRED[kind], "properties": {**_COMMON_PROPERTIES, **_KIND_PROPERTIES[kind]}}
                  for kind in KINDS}


def _is_integer(checker, instance) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)  # JSON Schema would take 4.0 and true


def _is_number(checker, instance) -> bool:
    return is_finite_number(instance)  # JSON as Python reads it holds NaN and Infinity, which JSON Schema takes


_Validator = jsonschema.validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number}),
)
_VALIDATORS = {kind: _Validator(schema) for kind, schema in SCHEMA_BY_KIND.items()}
for _validator in _VALIDATORS.values():
    Draft202012Validator.check_schema(_validator.schema)


def _show(value: Any) -> str:
    """A short description of a JSON value, for an error message."""
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return f"an object with {len(value)} key{'' if len(value) == 1 else 's'}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(path) -> str:
    """A field's place in the metadata, e.g. ``backbone.name`` or ``classnames[3]`` (keys are the provider's)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{printable(part)}" if text else printable(part))
    return text


def _message(error: jsonschema.ValidationError) -> str:
    field = _field(error.absolute_path)
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        if not field:
            return f"missing keys {missing}"
        return f"'{field}' {error.schema.get('description', 'is missing keys')} (missing {missing})"
    if error.validator == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        return f"'{field}' must be one of {allowed}, got {_show(error.instance)}"
    if error.validator == "const":
        return f"'{field}' must be {error.validator_value!r}, got {_show(error.instance)}"
    return f"'{field}' {error.schema.get('description', 'is invalid')}, got {_show(error.instance)}"


def check_schema(meta: dict, meta_path: Path) -> str:
    """The kind of bundle ``meta`` describes, after checking it against that kind's schema."""
    kind = meta.get("kind", COCOOP)  # bundles written before zero-shot ones existed have no kind
    if not isinstance(kind, str) or kind not in KINDS:
        raise BundleError(f"{meta_path}: kind {kind!r:.60} is not supported (expected one of {sorted(KINDS)})")
    # Lazily, in the schema's order: a list of 100,000 classes fails at its length, not after its items.
    error = next(_VALIDATORS[kind].iter_errors(meta), None)
    if error is not None:
        raise BundleError(f"{meta_path}: {_message(error)}")
    return kind


def expected_tensors(meta: dict, arch: Architecture) -> dict[str, tuple[tuple[int, ...], bool]]:
    """(shape, floating point) of every tensor a bundle of ``meta``'s kind holds on backbone ``arch``."""
    width, vis = arch.text_width, arch.embed_dim
    if meta["kind"] == ZEROSHOT:
        return {f"{ENCODER_PREFIX}{k}": v for k, v in arch.visual.items()}
    n_ctx = meta["n_ctx"]
    if meta["kind"] == COOP:
        ctx = (len(meta["classnames"]), n_ctx, width) if meta["class_specific"] else (n_ctx, width)
        return {"prompt_learner.ctx": (ctx, True)}
    hidden = max(1, vis // 16)  # CoCoOp's meta-net: Linear(d, d/16)-ReLU-Linear(d/16, width)
    return {"prompt_learner.ctx": ((n_ctx, width), True),
            "prompt_learner.meta_net.linear1.weight": ((hidden, vis), True),
            "prompt_learner.meta_net.linear1.bias": ((hidden,), True),
            "prompt_learner.meta_net.linear2.weight": ((width, hidden), True),
            "prompt_learner.meta_net.linear2.bias": ((width,), True)}


def _check_prompts(meta: dict, arch: Architecture, meta_path: Path) -> None:
    """Every class prompt fits the context uncut, and no two classes share one."""
    tokenizer, context = arch.tokenizer, arch.context_length
    forms = [("template", lambda name: meta["template"].replace("{}", name, 1))]
    if meta["kind"] != ZEROSHOT:
        placeholder = " ".join(["X"] * meta["n_ctx"])
        forms.insert(0, (f"n_ctx {meta['n_ctx']}", lambda name: f"{placeholder} {name}."))
    for what, prompt_of in forms:
        seen: dict[tuple[int, ...], str] = {}
        for index, name in enumerate(meta["classnames"]):
            prompt = prompt_of(name.replace("_", " "))  # the models read underscores as spaces
            tokens = tuple(tokenizer.encode(prompt))
            if len(tokens) + 2 > context:  # with start- and end-of-text
                raise BundleError(
                    f"{meta_path}: 'classnames[{index}]' ({name!r}) makes the prompt {prompt!r} ({what}) "
                    f"{len(tokens) + 2} tokens long, more than the context length {context} of backbone "
                    f"{arch.name}: it would be cut" + (" (lower n_ctx)" if what.startswith("n_ctx") else ""))
            if tokens in seen:
                raise BundleError(f"{meta_path}: classes {seen[tokens]!r} and {name!r} give the same prompt "
                                  f"{prompt!r} ({what}); the model cannot tell them apart")
            seen[tokens] = name


def check_meta(meta: dict, meta_path: Path) -> dict:
    """``meta`` checked against its schema and its backbone's architecture (see the module docstring).

    Sets ``meta["kind"]`` where an old bundle has none.  Allocates nothing and reads no other file.
    """
    meta["kind"] = check_schema(meta, meta_path)
    names = meta["classnames"]
    # The rules of every class list (ci_core.models.class_names): printable, no twins that CLIP reads as one class.
    check_class_names(names, f"{meta_path}: 'classnames'", BundleError)
    base = meta.get("base_classes")
    if base is not None:
        repeated = sorted(name for name, count in Counter(base).items() if count > 1)
        known = set(names)
        unknown = [name for name in base if name not in known]
        if repeated or unknown:
            raise BundleError(f"{meta_path}: 'base_classes' must be distinct classes of 'classnames'; "
                              + (f"{repeated[:5]} repeat" if repeated else f"{unknown[:5]} are not classes"))
    ident = meta["backbone"]
    try:
        arch = architecture(ident["name"])
    except ConfigError as exc:
        raise BundleError(f"{meta_path}: 'backbone.name': {exc}") from None
    if meta["kind"] != ZEROSHOT and meta["n_ctx"] > arch.context_length - 4:
        raise BundleError(f"{meta_path}: 'n_ctx' is {meta['n_ctx']}, but backbone {arch.name} has a context of "
                          f"{arch.context_length} tokens, which holds at most {arch.context_length - 4} context "
                          "vectors besides start-of-text, a class name, a full stop and end-of-text")
    if meta["image"]["size"] != arch.image_size:
        raise BundleError(f"{meta_path}: 'image.size' is {meta['image']['size']}, but backbone {arch.name} takes "
                          f"images of {arch.image_size} pixels")
    _check_prompts(meta, arch, meta_path)
    expected = expected_tensors(meta, arch)
    recorded = meta["tensors"]
    for key, (shape, _) in expected.items():
        if key not in recorded:
            raise BundleError(f"{meta_path}: 'tensors' lacks {key!r} (expected shape {list(shape)})")
        if tuple(recorded[key]) != shape:
            raise BundleError(f"{meta_path}: 'tensors.{key}' is {recorded[key]}, but a {meta['kind']} bundle "
                              f"on backbone {arch.name} holds it as {list(shape)}")
    extra = sorted(set(recorded) - set(expected))
    if extra:
        raise BundleError(f"{meta_path}: 'tensors' names tensors a {meta['kind']} bundle does not hold: {extra[:5]}")
    return meta
