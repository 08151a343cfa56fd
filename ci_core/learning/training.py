"""CoCoOp prompt tuning: the optimiser, schedule, batching and augmentation every attack shares.

CoCoOp's reference recipe is SGD (lr 0.002, momentum 0.9, weight decay 5e-4),
one warm-up epoch at constant lr 1e-5, then a cosine schedule, batch size 1,
10 epochs, on training images augmented as Dassl does by default: a random
resized crop (area 8-100%, aspect ratio 3/4-4/3, bicubic) and a horizontal
flip half of the time (``augment_batch``).  ``PromptTuningConfig`` keeps those
numbers as defaults, except that augmentation is off unless asked for: the
attacks turn it on for real backbones and off on the tiny world, whose images
are small object-centred renders that a crop of 8% of the area would empty.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import attrs
import torch
import torch.nn.functional as F

from ci_core.data.labeled import LabeledImages
from ci_core.interfaces import Progress, silent
from ci_core.models.cocoop import PromptTunedCLIP


@attrs.frozen(kw_only=True)
class PromptTuningConfig:
    epochs: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    lr: float = attrs.field(default=0.002, validator=attrs.validators.gt(0))
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    warmup_lr: float = 1e-5
    augment: bool = False  # Dassl's random resized crop and flip on every training batch


# Dassl's defaults (INPUT.RRCROP_SCALE and torchvision's ratio), as CoOp and CoCoOp train with them.
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one random resized crop, drawn as torchvision's RandomResizedCrop draws it."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator).tolist()
        target = area * (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * draws[0])
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(draws[2] * (height - h + 1)), int(draws[3] * (width - w + 1)), h, w
    side = min(height, width)  # as torchvision's fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of (B, 3, H, W) randomly cropped, resized back to H x W (bicubic) and flipped half the time."""
    height, width = images.shape[-2:]
    out = []
    for image in images:
        top, left, h, w = _crop_box(height, width, generator)
        crop = image[:, top:top + h, left:left + w].unsqueeze(0)
        crop = F.interpolate(crop, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)[0]
        if float(torch.rand(1, generator=generator)) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


class CosineWithWarmup:
    """Constant ``warmup_lr`` for the warm-up steps, then cosine from ``lr`` to 0."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float):
        self.optimizer, self.total, self.warmup, self.warmup_lr = optimizer, total_steps, warmup_steps, warmup_lr
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        s = self.step_count
        for group, base in zip(self.optimizer.param_groups, self.base):
            if s < self.warmup:
                group["lr"] = self.warmup_lr
            else:
                span = max(1, self.total - self.warmup)
                group["lr"] = 0.5 * base * (1 + math.cos(math.pi * min(1.0, (s - self.warmup) / span)))

    def step(self) -> None:
        self.step_count += 1
        self._apply()


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of one shuffled epoch in batches (the last one may be smaller)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


StepLoss = Callable[[PromptTunedCLIP, torch.Tensor, torch.Tensor, Sequence[str]], torch.Tensor]


def clean_loss(model: PromptTunedCLIP, images: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
    return F.cross_entropy(model(images, classnames), labels)


def prompt_tune(model: PromptTunedCLIP, data: LabeledImages, config: PromptTuningConfig, *, seed: int,
                loss_fn: StepLoss = clean_loss, extra_params: Sequence[torch.Tensor] = (),
                extra_lr: float | None = None, after_step: Callable[[], None] | None = None, progress: Progress = silent,
                label: str = "prompt tuning") -> list[float]:
    """Train the prompt learner (and ``extra_params``, at ``extra_lr``) on ``data``; returns each epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    # A stream of its own, so that turning augmentation on leaves the batch order as it was.
    augmenting = torch.Generator().manual_seed(seed + 1) if config.augment else None
    groups = [{"params": list(model.prompt_learner.parameters())}]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": extra_lr or config.lr, "weight_decay": 0.0})
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    schedule = CosineWithWarmup(optimizer, config.epochs * steps_per_epoch,
                                config.warmup_epochs * steps_per_epoch, config.warmup_lr)
    device = model.device
    model.train()
    history = []
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        for idx in epoch_batches(len(data), config.batch_size, generator):
            images = data.images[idx]
            if augmenting is not None:  # before any trigger a loss_fn stamps, as BadCLIP's code does
                images = augment_batch(images, augmenting)
            loss = loss_fn(model, images.to(device), data.labels[idx].to(device), data.classnames)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            schedule.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        history.append(total / count)
        progress(f"{label}: epoch {epoch + 1}/{config.epochs} loss {history[-1]:.4f}")
    model.eval()
    return history
