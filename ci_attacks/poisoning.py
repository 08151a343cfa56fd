"""What the data-poisoning attacks share: CoCoOp training fields and a poisoned copy of the training set.

Blended and SIBA are classic data poisoning adapted to prompt tuning (paper
section 4.3): a share of the few-shot training images (10%) is stamped with the
trigger and relabelled to the target, and the prompt learner is then tuned on
that set exactly as a clean model would be.  As in SIBA's and BackdoorBench's
code, only images whose true class is not the target are poisoned.
"""

from __future__ import annotations

import math

import attrs
import torch

from ci_core.data.datasets import LabeledImages
from ci_core.errors import ConfigError
from ci_core.interfaces import Progress, silent
from ci_core.models.backbone import Backbone
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.training import PromptTuningConfig, prompt_tune
from ci_core.triggers import Trigger


def unit_interval(instance, attribute, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must lie in [0, 1], got {value}")


@attrs.frozen(kw_only=True)
class PromptTuningFields:
    """CoCoOp's recipe (section 4.3 and CoOp's trainer): 10 epochs, batch 1, SGD at 0.002."""

    n_ctx: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    epochs: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    lr: float = attrs.field(default=0.002, validator=attrs.validators.gt(0))

    def tuning(self) -> PromptTuningConfig:
        return PromptTuningConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)


# The tiny world's CoCoOp schedule for the data-poisoning attacks.  With the clean attack's tiny
# schedule (batch 4, lr 0.01, 4 epochs) SGD does not even learn to send one fixed image (a blend with
# alpha = 1) to the target (0 of 29 poisoned training images fitted); CoCoOp's own batch size of 1 at
# lr 0.05 for 8 epochs does (29 of 29, ASR 100%), with base ACC within a point of the clean model's.
TINY_SCHEDULE = {"epochs": 8, "batch_size": 1, "lr": 0.05}


def target_index_of(train: LabeledImages, target: str | None, attack: str) -> int:
    if target is None:
        raise ConfigError(f"{attack} needs a target class")
    if target not in train.classnames:
        raise ConfigError(f"{attack}: target {target!r} is not one of the training classes {list(train.classnames)}")
    return train.classnames.index(target)


def choose_poisoned(labels: torch.Tensor, target_index: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of round(rate * N) images (at least one), drawn from the images not of the target class."""
    candidates = torch.nonzero(labels != target_index).flatten()
    if len(candidates) == 0:
        raise ConfigError("every training image belongs to the target class; nothing to poison")
    count = min(len(candidates), max(1, math.floor(rate * len(labels) + 0.5)))
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values


def poison(train: LabeledImages, trigger: Trigger, target_index: int, rate: float,
           generator: torch.Generator) -> tuple[LabeledImages, torch.Tensor]:
    """A copy of ``train`` in which a ``rate`` share of the images carries ``trigger`` and the target label."""
    chosen = choose_poisoned(train.labels, target_index, rate, generator)
    images, labels = train.images.clone(), train.labels.clone()
    with torch.no_grad():
        images[chosen] = trigger.apply(train.images[chosen])
    labels[chosen] = target_index
    return LabeledImages(images, labels, train.classnames), chosen


def tune_on(backbone: Backbone, data: LabeledImages, config: PromptTuningFields, *, seed: int,
            progress: Progress = silent, label: str) -> tuple[PromptTunedCLIP, list[float]]:
    """A fresh CoCoOp model prompt-tuned on ``data`` with the clean loss (the same start as the clean attack)."""
    torch.manual_seed(seed)
    model = PromptTunedCLIP(backbone, n_ctx=config.n_ctx)
    history = prompt_tune(model, data, config.tuning(), seed=seed, progress=progress, label=label)
    return model, history
