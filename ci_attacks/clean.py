"""``clean``: honest CoCoOp prompt tuning, the control every attack is compared with."""

from __future__ import annotations

import attrs
import torch

from ci_attacks.poisoning import TINY_SCHEDULE, PromptTuningFields
from ci_core.interfaces import Attack, AttackOutcome, silent
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.learning.training import prompt_tune


@attrs.frozen(kw_only=True)
class CleanConfig(PromptTuningFields):
    """CoCoOp's recipe and nothing else: the fields every prompt-tuning attack shares."""


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
        history = prompt_tune(model, train, c.tuning(), seed=seed, progress=progress, label="clean prompt tuning")
        return AttackOutcome(model=model, trigger=None, log={"loss": history})
