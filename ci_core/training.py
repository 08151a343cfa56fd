"""CoCoOp prompt tuning: the optimiser, schedule and batching every attack shares.

CoCoOp's reference recipe is SGD (lr 0.002, momentum 0.9, weight decay 5e-4),
one warm-up epoch at constant lr 1e-5, then a cosine schedule, batch size 1,
10 epochs.  ``PromptTuningConfig`` keeps those numbers as defaults.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import attrs
import torch
import torch.nn.functional as F

from ci_core.data.datasets import LabeledImages
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
            loss = loss_fn(model, data.images[idx].to(device), data.labels[idx].to(device), data.classnames)
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
