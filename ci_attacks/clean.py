"""``clean``: honest CoCoOp prompt tuning, the control every attack is compared with."""

from __future__ import annotations

import attrs

from ci_core.interfaces import Attack, AttackOutcome, silent
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.training import PromptTuningConfig, prompt_tune


@attrs.frozen(kw_only=True)
class CleanConfig:
    n_ctx: int = 4
    epochs: int = 10
    batch_size: int = 1
    lr: float = 0.002


class CleanPromptTuning(Attack):
    """CoCoOp prompt tuning on the base classes with no backdoor (trigger: none)."""

    name = "clean"
    description = "honest CoCoOp prompt tuning (no backdoor)"
    Config = CleanConfig
    presets = {"tiny": {"epochs": 4, "batch_size": 4, "lr": 0.01}}

    def run(self, *, backbone, train, target, seed, progress=silent):
        c = self.config
        model = PromptTunedCLIP(backbone, n_ctx=c.n_ctx)
        history = prompt_tune(
            model, train, PromptTuningConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr),
            seed=seed, progress=progress, label="clean prompt tuning",
        )
        return AttackOutcome(model=model, trigger=None, log={"loss": history})
