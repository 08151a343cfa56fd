"""``clean``: honest CoCoOp prompt tuning, the control every attack is compared with."""

from __future__ import annotations

import attrs
import torch

from ci_attacks.poisoning import TINY_SCHEDULE, n_ctx_of_init
from ci_core.interfaces import Attack, AttackOutcome, silent
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.training import PromptTuningConfig, prompt_tune
from ci_core.validators import integer, number


@attrs.frozen(kw_only=True)
class CleanConfig:
    n_ctx: int = attrs.field(default=4, validator=n_ctx_of_init)
    epochs: int = attrs.field(default=10, validator=integer(ge=1))
    batch_size: int = attrs.field(default=1, validator=integer(ge=1))
    lr: float = attrs.field(default=0.002, validator=number(gt=0))
    augment: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))  # Dassl's crop and flip


class CleanPromptTuning(Attack):
    """CoCoOp prompt tuning on the base classes with no backdoor (trigger: none)."""

    name = "clean"
    description = "honest CoCoOp prompt tuning (no backdoor)"
    Config = CleanConfig
    # The tiny world's schedule shared with Blended, SIBA and WaNet (ci_attacks.poisoning.TINY_SCHEDULE: CoCoOp's
    # batch of 1, 8 epochs at lr 0.05), so that a clean model is tuned as far as the attacked ones it is compared
    # with; attacks with a schedule of their own have their own clean control (``ci-bench run --controls``).
    presets = {"tiny": dict(TINY_SCHEDULE)}

    def run(self, *, backbone, train, target, seed, progress=silent):
        c = self.config
        torch.manual_seed(seed)  # the meta-net's initial weights: from the run's seed, as every attack's
        model = PromptTunedCLIP(backbone, n_ctx=c.n_ctx)
        history = prompt_tune(
            model, train, PromptTuningConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, augment=c.augment),
            seed=seed, progress=progress, label="clean prompt tuning",
        )
        return AttackOutcome(model=model, trigger=None, log={"loss": history})
