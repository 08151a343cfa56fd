"""``blended``: the Blended attack (Chen et al. 2017) adapted to prompt tuning.

A fixed pattern of uniform noise in [0, 1] (drawn once from the run's seed) is
blended into the image, x' = (1 - alpha) x + alpha * pattern with alpha = 0.2;
10% of the few-shot training images are blended and relabelled to the target,
and CoCoOp is tuned on that set as usual (paper section 4.3 and 16.2: a
pervasive, visible trigger, SSIM about 0.5).
"""

from __future__ import annotations

import attrs
import torch

from ci_attacks.poisoning import TINY_SCHEDULE, PromptTuningFields, poison, target_index_of, tune_on, unit_interval
from ci_core.interfaces import Attack, AttackOutcome, silent
from ci_core.triggers import BlendTrigger
from ci_core.validators import number


@attrs.frozen(kw_only=True)
class BlendedConfig(PromptTuningFields):
    alpha: float = attrs.field(default=0.2, validator=number(gt=0, le=1))
    poison_rate: float = attrs.field(default=0.1, validator=unit_interval)


class Blended(Attack):
    name = "blended"
    description = "Blended (Chen et al. 2017): uniform-noise pattern blended at alpha 0.2 into 10% of the images"
    Config = BlendedConfig
    control_options = {"poison_rate": 0.0}
    # The tiny CLIP's encoder hardly notices the paper's blend: at alpha 0.2 the image feature keeps a cosine
    # of 0.98 with the clean one and nothing implants (ASR 0%); alpha 0.5 is the weakest blend measured
    # to implant there (seed 1: ASR 72% base, 38% new).  Real backbones keep the paper's 0.2.
    presets = {"tiny": {**TINY_SCHEDULE, "alpha": 0.5}}

    def run(self, *, backbone, train, target, seed, progress=silent):
        c = self.config
        target_index = target_index_of(train, target, self.name)
        generator = torch.Generator().manual_seed(seed)
        pattern = torch.rand(train.images.shape[1:], generator=generator)
        trigger = BlendTrigger(pattern, c.alpha)
        poisoned, chosen = poison(train, trigger, target_index, c.poison_rate, generator)
        progress(f"blended: {len(chosen)} of {len(train)} training images blended and relabelled to {target!r}")
        model, history = tune_on(backbone, poisoned, c, seed=seed, progress=progress, label="blended prompt tuning")
        return AttackOutcome(model=model, trigger=trigger, log={"loss": history, "poisoned": len(chosen)})
