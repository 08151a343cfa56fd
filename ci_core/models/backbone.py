"""Frozen open_clip backbones: the bundled tiny CLIP and any open_clip architecture.

A backbone is identified by its open_clip model name plus where its weights came
from (``builtin`` for the tiny CLIP that ships in this package, an open_clip
pretrained tag, a local weights file, or ``random:SEED``), and by a SHA-256 of
its weights, so that a bundle can refuse to run against other weights.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path

import attrs
import open_clip
import torch
from safetensors.torch import load_file

from ci_core.errors import ConfigError

TINY_MODEL = "ci-tiny-clip"
BUILTIN = "builtin"
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny_clip"
TINY_CONFIG = ASSETS / f"{TINY_MODEL}.json"
TINY_WEIGHTS = ASSETS / "weights.safetensors"
TINY_IMAGE_SIZE = int(json.loads(TINY_CONFIG.read_text())["vision_cfg"]["image_size"])

open_clip.add_model_config(TINY_CONFIG)


@attrs.frozen(kw_only=True)
class Backbone:
    """A frozen CLIP with what is needed to prompt it: tokenizer and image statistics."""

    name: str
    pretrained: str
    model: open_clip.CLIP = attrs.field(eq=False, repr=False)
    tokenizer: object = attrs.field(eq=False, repr=False)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eot_token_id)

    def identity(self) -> dict:
        return {"name": self.name, "pretrained": self.pretrained, "weights_sha256": self.weights_sha256}


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of tensor names, shapes, dtypes and bytes: the same weights hash alike whatever file held them."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_tiny_weights(path: Path = TINY_WEIGHTS) -> dict[str, torch.Tensor]:
    """The tiny CLIP's weights; its token embedding is stored as the rows the world uses (others are zero)."""
    stored = load_file(str(path))
    ids, rows = stored.pop("token_embedding.ids"), stored.pop("token_embedding.rows")
    vocab = int(stored.pop("token_embedding.vocab_size").item())
    table = torch.zeros(vocab, rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    stored["token_embedding.weight"] = table
    return stored


def write_tiny_weights(model: open_clip.CLIP, used_token_ids: torch.Tensor, path: Path) -> None:
    """Store the tiny CLIP compactly: only the token-embedding rows its training text used."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    ids = torch.unique(used_token_ids).to(torch.int64)
    state["token_embedding.ids"] = ids
    state["token_embedding.rows"] = table[ids].contiguous()
    state["token_embedding.vocab_size"] = torch.tensor(table.shape[0])
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def _load_local_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # A torch file could hold arbitrary pickled objects: tensors only, never code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def check_model_name(name: str) -> None:
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ConfigError(f"unknown open_clip model {name!r}.{hint}")


def load_backbone(name: str = TINY_MODEL, pretrained: str = BUILTIN, device: str | torch.device = "cpu") -> Backbone:
    """Build a frozen, eval-mode backbone.

    ``pretrained`` is ``builtin`` (the shipped tiny CLIP), ``random:SEED``
    (random weights, for tests and speed benchmarks), a path to a
    ``.safetensors``/``.pt`` file, or an open_clip pretrained tag.
    """
    check_model_name(name)
    if pretrained == BUILTIN:
        if name != TINY_MODEL:
            raise ConfigError(f"pretrained 'builtin' exists only for {TINY_MODEL!r}, not {name!r}")
        model = open_clip.create_model(name, pretrained=None)
        model.load_state_dict(read_tiny_weights())
    elif pretrained.startswith("random:"):
        try:
            seed = int(pretrained.split(":", 1)[1])
        except ValueError as exc:
            raise ConfigError(f"pretrained {pretrained!r}: expected random:SEED with an integer seed") from exc
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    elif Path(pretrained).suffix in (".safetensors", ".pt", ".pth", ".bin"):
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"weights file {path} does not exist")
        model = open_clip.create_model(name, pretrained=None)
        missing, unexpected = model.load_state_dict(_load_local_weights(path), strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"weights file {path} does not fit {name}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
    else:
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors when offline
            raise ConfigError(
                f"could not load pretrained {pretrained!r} for {name!r} ({exc}). Without network, pass a local "
                "weights file instead: --pretrained /path/to/weights.safetensors"
            ) from exc
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
        weights_sha256=state_dict_sha256(model.state_dict()),
    )
