"""Frozen open_clip backbones: the bundled tiny CLIP and any open_clip architecture.

A backbone is identified by its open_clip model name plus where its weights came
from (``builtin`` for the tiny CLIP that ships in this package, an open_clip
pretrained tag, a local weights file, or ``random:SEED``), whether its MLPs use
QuickGELU (OpenAI's weights do; it is not visible in the weights), and by a
SHA-256 of its weights, so that a bundle can refuse to run against other weights.

Where the weights come from, and how they are read safely, is ``ci_core.models.weights``; this module builds
the model and wraps it.

``architecture(name)`` describes an open_clip model from its config, without
allocating it (the model is built on the ``meta`` device, which holds shapes
only): what a bundle's metadata and tensor shapes are checked against before any
weights are read or allocated.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
from pathlib import Path

import attrs
import open_clip
import torch

from ci_core.errors import ConfigError
from ci_core.models import weights
from ci_core.models.weights import ASSETS, BUILTIN, QUICKGELU_SUFFIX

TINY_MODEL = "ci-tiny-clip"
TINY_CONFIG = ASSETS / f"{TINY_MODEL}.json"
TINY_IMAGE_SIZE = int(json.loads(TINY_CONFIG.read_text())["vision_cfg"]["image_size"])

DEFAULT_REAL = ("ViT-B-16", "openai")  # the paper's backbone: the default wherever real data is used

open_clip.add_model_config(TINY_CONFIG)


@attrs.frozen(kw_only=True)
class TextEncoding:
    """How the CoCoOp text encoder runs; changes speed and memory, never the logits (beyond bf16 rounding).

    ``max_text_batch`` bounds the (image, class) prompts encoded at once; None
    derives it from ``memory_budget`` (bytes for one chunk's activations; None:
    a quarter of the free memory of the device, at most 2 GiB on a CPU).
    ``bf16`` runs the encoders under bfloat16 autocast (CUDA only).
    """

    max_text_batch: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    memory_budget: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    bf16: bool = False

    def autocast(self):
        """The context the encoders run in: bfloat16 autocast with ``bf16`` (CUDA), else nothing."""
        if self.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


@attrs.frozen(kw_only=True)
class Backbone:
    """A frozen CLIP with what is needed to prompt it: tokenizer, image statistics, and how to run its text encoder."""

    name: str
    pretrained: str
    model: open_clip.CLIP = attrs.field(eq=False, repr=False)
    tokenizer: object = attrs.field(eq=False, repr=False)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str
    quick_gelu: bool = False
    text_encoding: TextEncoding = attrs.field(factory=TextEncoding, eq=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def token_embedding_scale(self) -> float:
        """The largest norm of a word's token embedding: the scale of every input the text encoder was trained on."""
        norms = self.model.token_embedding.weight.detach().float().norm(dim=-1)
        return float(norms[norms > 0].max())  # rows of unused tokens may be stored as zeros (the tiny CLIP)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eot_token_id)

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def architecture(self) -> tuple[str, bool]:
        """(model name without the -quickgelu suffix, QuickGELU): what must match besides the weights."""
        return self.name.removesuffix(QUICKGELU_SUFFIX), self.quick_gelu

    def identity(self) -> dict:
        return {"name": self.name, "pretrained": self.pretrained, "quick_gelu": self.quick_gelu,
                "weights_sha256": self.weights_sha256}

    def with_text_encoding(self, encoding: TextEncoding) -> "Backbone":
        """The same frozen model, run with ``encoding`` (bf16 needs the model on a CUDA device)."""
        check_text_encoding(encoding, self.device)
        return attrs.evolve(self, text_encoding=encoding)


def check_text_encoding(encoding: TextEncoding, device: str | torch.device) -> None:
    device = torch.device(device)
    if encoding.bf16 and device.type != "cuda":
        raise ConfigError(f"bf16 autocast needs a CUDA device, but the model is on {device}"
                          + ("" if torch.cuda.is_available() else " (this machine has no CUDA device)"))


def check_model_name(name: str) -> None:
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else " See open_clip.list_models() for the names."
        raise ConfigError(f"unknown open_clip model {name!r}.{hint}")


class _NoRandomInitNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init():
    """Drop open_clip's note that a model built without a checkpoint is random: here weights follow, or are meant."""
    note = _NoRandomInitNote()
    root = logging.getLogger()
    root.addFilter(note)
    try:
        yield
    finally:
        root.removeFilter(note)


def _create_bare(name: str, quick_gelu: bool) -> torch.nn.Module:
    with _quiet_random_init():
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)


def _uses_quick_gelu(model: torch.nn.Module) -> bool:
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


# --------------------------------------------------------------------------- pretrained tags


def load_backbone(name: str = TINY_MODEL, pretrained: str = BUILTIN, device: str | torch.device = "cpu", *,
                  quick_gelu: bool | None = None, text_encoding: TextEncoding | None = None,
                  cache_dir: str | None = None, allow_download: bool = True) -> Backbone:
    """Build a frozen, eval-mode backbone.

    ``pretrained`` is ``builtin`` (the shipped tiny CLIP), ``random:SEED``
    (random weights, for tests and speed benchmarks), an open_clip pretrained
    tag (from open_clip's cache, or downloaded into it), or a path to a
    ``.safetensors`` file (or a torch state dict, read with ``weights_only=True``,
    or one of OpenAI's published TorchScript archives, verified by SHA-256).
    ``quick_gelu`` forces the activation for random weights and files (a tag
    and an OpenAI archive decide it themselves); ``cache_dir`` is open_clip's download cache;
    ``allow_download`` False takes a tag only from that cache (never the network).
    """
    check_model_name(name)
    try:
        return _load_backbone(name, pretrained, device, quick_gelu=quick_gelu, text_encoding=text_encoding,
                              cache_dir=cache_dir, allow_download=allow_download)
    except MemoryError:
        raise ConfigError(f"backbone {name} ({pretrained}): not enough memory to build it on {device}") from None
    except RuntimeError as exc:  # torch's allocators raise RuntimeError when memory runs out
        if "alloc" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise ConfigError(f"backbone {name} ({pretrained}): not enough memory to build it on {device} "
                          f"({weights.first_line(exc)})") from None


def _load_backbone(name: str, pretrained: str, device: str | torch.device, *, quick_gelu: bool | None,
                   text_encoding: TextEncoding | None, cache_dir: str | None, allow_download: bool) -> Backbone:
    force_quick_gelu = bool(quick_gelu)
    if pretrained == BUILTIN:
        if name != TINY_MODEL:
            raise ConfigError(f"pretrained 'builtin' exists only for {TINY_MODEL!r}, not {name!r}; "
                              f"for {name} give an open_clip tag, a weights file or random:SEED")
        model = _create_bare(name, False)
        model.load_state_dict(weights.read_tiny_weights())
    elif pretrained.startswith("random:"):
        torch.manual_seed(weights.random_seed(pretrained))
        model = _create_bare(name, force_quick_gelu)
    elif open_clip.is_pretrained_cfg(name, pretrained):
        model = weights.create_from_tag(name, pretrained, cache_dir, allow_download)
    elif weights.looks_like_file(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"weights file {path} does not exist")
        if weights.is_torchscript(path):
            state, archive = weights.load_openai_archive(path)
            if name.removesuffix(QUICKGELU_SUFFIX) != archive.architecture:
                raise ConfigError(f"weights file {path} is OpenAI's {archive.openai_name} archive, which is open_clip's "
                                  f"{archive.architecture}, not {name}; pass --backbone {archive.architecture}")
            force_quick_gelu = archive.quick_gelu
        else:
            state = weights.load_local_weights(path)
        model = _create_bare(name, force_quick_gelu)
        weights.load_fitting(model, state, f"weights file {path}", name)
        pretrained = str(path.resolve())
    else:
        raise weights.unknown_pretrained(name, pretrained)
    model = model.to(device).eval().requires_grad_(False)
    visual = model.visual
    image_size = visual.image_size
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    mean = tuple(float(m) for m in getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(float(s) for s in getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return Backbone(
        name=name,
        pretrained=pretrained,
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        image_size=image_size,
        mean=mean,
        std=std,
        weights_sha256=weights.state_dict_sha256(model.state_dict()),
        quick_gelu=_uses_quick_gelu(model),
    ).with_text_encoding(text_encoding or TextEncoding())


# --------------------------------------------------------------------------- architectures, unallocated


@attrs.frozen(kw_only=True)
class Architecture:
    """An open_clip model as its config and its unallocated (``meta`` device) build describe it."""

    name: str
    context_length: int
    text_width: int
    embed_dim: int
    image_size: int
    parameters: int  # tensors' elements in all, parameters and buffers
    # Every tensor of the image encoder (state-dict names without "visual."): (shape, floating point).
    visual: dict[str, tuple[tuple[int, ...], bool]] = attrs.field(repr=False)
    tokenizer: object = attrs.field(eq=False, repr=False)


# Configs of models whose text side is not open_clip's own transformer and tokenizer: prompt tuning reaches
# into that transformer, and their tokenizers are fetched from the Hugging Face hub.
_FOREIGN_TEXT = ("custom_text", "multimodal_cfg")
_FOREIGN_TOKENS = ("hf_model_name", "hf_tokenizer_name")


@functools.lru_cache(maxsize=8)
def architecture(name: str) -> Architecture:
    """What open_clip model ``name`` is, read from its config and built on the ``meta`` device (no memory, no network).

    Only CLIP models with open_clip's own text transformer and tokenizer are described: the ones prompt
    tuning works on.  An unknown name, or another kind of model, is a ``ConfigError``.
    """
    check_model_name(name)
    cfg = open_clip.get_model_config(name) or {}
    text_cfg = cfg.get("text_cfg") or {}
    foreign = [k for k in _FOREIGN_TEXT if cfg.get(k)] + [k for k in _FOREIGN_TOKENS if text_cfg.get(k)]
    if foreign:
        raise ConfigError(f"open_clip model {name!r} is not a CLIP with open_clip's own text transformer and "
                          f"tokenizer ({', '.join(foreign)} in its config), which prompt tuning needs")
    try:
        # Built under the meta device, parameters are created (and initialised) without memory, then kept there.
        with _quiet_random_init(), torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, device="meta")
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # open_clip and timm raise many kinds for a model they cannot build
        raise ConfigError(f"open_clip model {name!r} cannot be described ({weights.first_line(exc)})") from exc
    if not isinstance(model, open_clip.CLIP) or not hasattr(tokenizer, "encode"):
        raise ConfigError(f"open_clip model {name!r} is a {type(model).__name__}, not a CLIP with open_clip's own "
                          "text transformer and tokenizer, which prompt tuning needs")
    image_size = model.visual.image_size
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    return Architecture(
        name=name, context_length=int(model.positional_embedding.shape[0]),
        text_width=int(model.token_embedding.weight.shape[1]), embed_dim=int(model.text_projection.shape[1]),
        image_size=image_size, tokenizer=tokenizer, parameters=sum(v.numel() for v in model.state_dict().values()),
        visual={k: (tuple(v.shape), v.is_floating_point()) for k, v in model.visual.state_dict().items()},
    )
