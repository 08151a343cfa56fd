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

from ci_core.data.labeled import LabeledImages
from ci_core.errors import ConfigError
from ci_core.interfaces import Progress, silent
from ci_core.models.backbone import Backbone
from ci_core.models.cocoop import DEFAULT_CTX_INIT, PromptTunedCLIP
from ci_core.learning.training import PromptTuningConfig, prompt_tune
from ci_core.triggers import Trigger
from ci_core.validators import integer, number


# A share of images: a finite number in [0, 1].
unit_interval = number(ge=0.0, le=1.0)
_positive_integer = integer(ge=1)


def n_ctx_of_init(instance, attribute, value) -> None:
    """The attacks start the context from CoCoOp's "a photo of a", one vector per word: that fixes n_ctx."""
    _positive_integer(instance, attribute, value)
    words = len(DEFAULT_CTX_INIT.split())
    if value != words:
        raise ConfigError(f"{attribute.name} must be {words}: the context starts from {DEFAULT_CTX_INIT!r}, one "
                          f"vector per word; got {value!r}")


@attrs.frozen(kw_only=True)
class PromptTuningFields:
    """CoCoOp's recipe (section 4.3 and CoOp's trainer): 10 epochs, batch 1, SGD at 0.002."""

    n_ctx: int = attrs.field(default=4, validator=n_ctx_of_init)
    epochs: int = attrs.field(default=10, validator=integer(ge=1))
    batch_size: int = attrs.field(default=1, validator=integer(ge=1))
    lr: float = attrs.field(default=0.002, validator=number(gt=0))
    augment: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))  # Dassl's crop and flip

    def tuning(self) -> PromptTuningConfig:
        return PromptTuningConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, augment=self.augment)


# The tiny world's CoCoOp schedule for the data-poisoning attacks.  With the clean attack's tiny
# schedule (batch 4, lr 0.01, 4 epochs) SGD does not even learn to send one fixed image (a blend with
# alpha = 1) to the target (0 of 29 poisoned training images fitted); CoCoOp's own batch size of 1 at
# lr 0.05 for 8 epochs does (29 of 29, ASR 100%), with base ACC within a point of the clean model's.
# No augmentation there: the tiny world's 96 px renders are object-centred, and a crop of 8% of the area misses
# the object (ci_core.learning.training).
TINY_SCHEDULE = {"epochs": 8, "batch_size": 1, "lr": 0.05, "augment": False}


def target_index_of(train: LabeledImages, target: str | None, attack: str) -> int:
    if target is None:
        raise ConfigError(f"{attack} needs a target class")
    if target not in train.classnames:
        raise ConfigError(f"{attack}: target {target!r} is not one of the training classes {list(train.classnames)}")
    return train.classnames.index(target)


def choose_poisoned(labels: torch.Tensor, target_index: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of round(rate * N) images (at least one for any rate above 0, none at 0), drawn from the images
    not of the target class."""
    candidates = torch.nonzero(labels != target_index).flatten()
    if rate == 0:
        return candidates[:0]  # the clean control of a poisoning attack: same schedule, nothing poisoned
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
