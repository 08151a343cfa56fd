"""``encoder-blended``: an encoder-level Blended backdoor, without prompt learner or meta-net (paper 5.4 and 14).

The whole CLIP image encoder is fine-tuned as a zero-shot classifier ("a photo
of a {class}." through the frozen text encoder) on the few-shot training set of
the base classes, of which a share (10%) is blended with a fixed pattern and
relabelled to the target, as the ``blended`` attack poisons its set.  The
result is a ``ZeroShotCLIP`` that the scanner probes like any CoCoOp model.

The paper names three patterns and no geometry; here each is a square region
in the bottom-right corner whose side is ``size`` times the image side, blended
into the image at ``alpha`` inside the pattern and leaving every other pixel
alone, x' = x + alpha * mask * (pattern - x):
* ``noise``: a patch of Gaussian noise (mean 0.5, sd 0.25, clipped to [0, 1])
  drawn once from the run's seed;
* ``triangle``: a white upright triangle filling the square;
* ``text``: ``text`` in white, rendered with Pillow's built-in bitmap font and
  scaled (nearest neighbour) to span ``size`` of the image width.

The paper gives no fine-tuning recipe for this experiment; the defaults are the
usual ones for fully fine-tuning CLIP's image encoder (AdamW, weight decay 0.1,
a cosine schedule, as WiSE-FT) at a learning rate of 1e-5 and batch size 32 for
the few-shot set, over 10 epochs.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ci_attacks.poisoning import poison, target_index_of, unit_interval
from ci_core.data.labeled import LabeledImages
from ci_core.errors import ConfigError
from ci_core.interfaces import Attack, AttackOutcome, Progress, silent
from ci_core.models.backbone import Backbone
from ci_core.models.bundle import ZEROSHOT
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.learning.training import CosineWithWarmup, epoch_batches
from ci_core.triggers import Trigger
from ci_core.validators import integer, number, one_of

PATTERNS = ("noise", "triangle", "text")
NOISE_MEAN, NOISE_SD = 0.5, 0.25


class PatternBlendTrigger(Trigger):
    """x' = x + alpha * mask * (pattern - x): a (3, H, W) pattern blended at ``alpha`` where the (H, W) mask is 1."""

    kind = "pattern-blend"
    description = "a pattern blended into a patch of the image"

    def __init__(self, pattern: torch.Tensor, mask: torch.Tensor, alpha: float, name: str = ""):
        if pattern.dim() != 3 or pattern.shape[0] != 3:
            raise ValueError(f"pattern must have shape (3, H, W), got {tuple(pattern.shape)}")
        if mask.shape != pattern.shape[1:]:
            raise ValueError(f"mask must have shape {tuple(pattern.shape[1:])}, got {tuple(mask.shape)}")
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("mask must be binary")
        if not mask.any():
            raise ValueError("mask is empty: the pattern would change no pixel")
        if pattern.min() < 0 or pattern.max() > 1:
            raise ValueError("pattern values must lie in [0, 1]")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        self.mask = mask.float()
        self.pattern = pattern.float() * self.mask  # outside the mask the pattern plays no part
        self.alpha = float(alpha)
        self.name = name

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != self.mask.shape:
            raise ValueError(f"the blend pattern is {tuple(self.mask.shape)} but the images are {tuple(images.shape[-2:])}")
        weight = self.alpha * self.mask.to(images.device, images.dtype)
        return images + weight * (self.pattern.to(images.device, images.dtype) - images)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern, "mask": self.mask}

    def params(self) -> dict:
        return {"alpha": self.alpha, "name": self.name}

    @classmethod
    def from_saved(cls, tensors, params):
        return cls(tensors["pattern"], tensors["mask"], params["alpha"], params.get("name", ""))


# --------------------------------------------------------------------------- the three patterns


def _corner_box(height: int, width: int, box_h: int, box_w: int) -> tuple[slice, slice]:
    """The bottom-right box of ``box_h`` x ``box_w`` pixels."""
    return slice(height - box_h, height), slice(width - box_w, width)


def _side(size: float, height: int, width: int) -> int:
    return max(2, min(height, width, round(size * min(height, width))))


def noise_patch(height: int, width: int, size: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    side = _side(size, height, width)
    rows, cols = _corner_box(height, width, side, side)
    pattern, mask = torch.zeros(3, height, width), torch.zeros(height, width)
    noise = NOISE_MEAN + NOISE_SD * torch.randn(3, side, side, generator=generator)
    pattern[:, rows, cols] = noise.clamp(0, 1)
    mask[rows, cols] = 1
    return pattern, mask


def triangle_patch(height: int, width: int, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    side = _side(size, height, width)
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).polygon([(0, side - 1), (side - 1, side - 1), ((side - 1) / 2, 0)], fill=255)
    shape = torch.from_numpy(np.array(canvas)) > 0
    rows, cols = _corner_box(height, width, side, side)
    mask = torch.zeros(height, width)
    mask[rows, cols] = shape.float()
    return mask.expand(3, -1, -1).clone(), mask


def text_patch(height: int, width: int, size: float, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    font = ImageFont.load_default_imagefont()  # Pillow's built-in bitmap font: no font file needed
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    ink = canvas.getbbox()
    if ink is None:
        raise ValueError(f"text {text!r} renders to no pixels")
    canvas = canvas.crop(ink)  # the inked pixels only, so the text reaches into the corner
    box_w = max(2, min(width, round(size * width)))
    box_h = max(1, min(height, round(box_w * canvas.height / canvas.width)))
    canvas = canvas.resize((box_w, box_h), Image.Resampling.NEAREST)
    glyphs = torch.from_numpy(np.array(canvas)) > 0
    if not glyphs.any():
        raise ValueError(f"text {text!r} at {box_w} x {box_h} pixels keeps no pixel; raise size")
    rows, cols = _corner_box(height, width, box_h, box_w)
    mask = torch.zeros(height, width)
    mask[rows, cols] = glyphs.float()
    return mask.expand(3, -1, -1).clone(), mask


def make_trigger(pattern: str, height: int, width: int, *, size: float, alpha: float, text: str,
                 generator: torch.Generator) -> PatternBlendTrigger:
    """The ``pattern`` trigger for images of ``height`` x ``width`` pixels."""
    if pattern == "noise":
        values, mask = noise_patch(height, width, size, generator)
    elif pattern == "triangle":
        values, mask = triangle_patch(height, width, size)
    elif pattern == "text":
        values, mask = text_patch(height, width, size, text)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    return PatternBlendTrigger(values, mask, alpha, name=pattern)


# --------------------------------------------------------------------------- fine-tuning


def _printable(instance, attribute, value) -> None:
    if not isinstance(value, str) or not value.strip() or not value.isprintable() or len(value) > 200:
        raise ConfigError(f"{attribute.name} must be non-empty printable text of at most 200 characters, "
                          f"got {value!r:.80}")


@attrs.frozen(kw_only=True)
class EncoderBlendedConfig:
    pattern: str = attrs.field(default="noise", validator=one_of(PATTERNS))
    alpha: float = attrs.field(default=0.2, validator=number(gt=0, le=1))
    poison_rate: float = attrs.field(default=0.1, validator=unit_interval)
    size: float = attrs.field(default=0.25, validator=number(gt=0, le=1))
    text: str = attrs.field(default="hello", validator=_printable)
    epochs: int = attrs.field(default=10, validator=integer(ge=1))
    batch_size: int = attrs.field(default=32, validator=integer(ge=1))
    lr: float = attrs.field(default=1e-5, validator=number(gt=0))
    weight_decay: float = attrs.field(default=0.1, validator=number(ge=0))


def fine_tune_image_encoder(model: ZeroShotCLIP, data: LabeledImages, config: EncoderBlendedConfig, *, seed: int,
                            progress: Progress = silent, label: str = "image-encoder fine-tuning") -> list[float]:
    """Train every tensor of ``model``'s image encoder with zero-shot cross-entropy on ``data``; each epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    visual = model.clip.visual
    visual.requires_grad_(True)
    optimizer = torch.optim.AdamW(visual.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(data) / config.batch_size)
    schedule = CosineWithWarmup(optimizer, steps, 0, 0.0)
    device = model.device
    model.train()
    history = []
    try:
        for epoch in range(config.epochs):
            total = 0.0
            for idx in epoch_batches(len(data), config.batch_size, generator):
                logits = model(data.images[idx].to(device), data.classnames)
                loss = F.cross_entropy(logits, data.labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(idx)
            history.append(total / len(data))
            progress(f"{label}: epoch {epoch + 1}/{config.epochs} loss {history[-1]:.4f}")
    finally:
        model.eval()
        visual.requires_grad_(False)  # the delivered model is a fixed classifier, like a CoCoOp one
    return history


class EncoderBlended(Attack):
    name = "encoder-blended"
    description = "Blended poisoning of the whole image encoder (no prompt learner): noise patch, triangle or text"
    Config = EncoderBlendedConfig
    control_options = {"poison_rate": 0.0}
    bundle_kind = ZEROSHOT
    # Tiny world (tiny-colorshapes, seed 1; ASR on base / new classes).  Chosen on the earlier 64 px ViT tiny
    # CLIP, which hardly noticed the paper's faint patch: at alpha 0.2 it memorised the poisoned images without
    # learning the trigger (noise: ASR 8% / 0%), and batch 32 took too few steps on the few-shot set.
    # Batch 8 at lr 3e-4 for 12 epochs, alpha 0.5 and a pattern half the image side implanted there.  On the
    # 96 px ResNet tiny CLIP (ci-bench attack, about 80 s of one core; clean zero-shot ACC 0.96 / 0.94, ASR
    # about 6% / 1%): noise ACC 0.95 / 0.92, ASR 99.6% / 100%; triangle 0.93 / 0.88, 69% / 59%; text
    # 0.92 / 0.89, 76% / 67%.  Real backbones keep the paper's blend and the defaults above.
    presets = {"tiny": {"alpha": 0.5, "size": 0.5, "epochs": 12, "batch_size": 8, "lr": 3e-4}}

    def run(self, *, backbone: Backbone, train: LabeledImages, target, seed, progress=silent):
        c = self.config
        target_index = target_index_of(train, target, self.name)
        generator = torch.Generator().manual_seed(seed)
        height, width = train.images.shape[-2:]
        try:
            trigger = make_trigger(c.pattern, height, width, size=c.size, alpha=c.alpha, text=c.text,
                                   generator=generator)
        except ValueError as exc:
            raise ConfigError(f"{self.name} options: {exc}") from exc
        poisoned, chosen = poison(train, trigger, target_index, c.poison_rate, generator)
        progress(f"{self.name}: {len(chosen)} of {len(train)} training images blended with the {c.pattern} "
                 f"pattern and relabelled to {target!r}")
        torch.manual_seed(seed)
        model = ZeroShotCLIP(backbone)
        history = fine_tune_image_encoder(model, poisoned, c, seed=seed, progress=progress,
                                          label=f"{self.name} ({c.pattern}) fine-tuning")
        return AttackOutcome(model=model, trigger=trigger, log={"loss": history, "poisoned": len(chosen)})
