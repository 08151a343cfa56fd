"""``badclip-adaptive``: BadCLIP made trigger-specific to frustrate trigger inversion (paper sections 5.2 and 11).

Phase 1 is standard BadCLIP (``ci_attacks.badclip.implant``): trigger warm-up,
then joint training of trigger and prompt learner, Eq. 14.  Phase 2 freezes the
trigger as delta_fixed and tunes the prompt learner alone on three kinds of
image per training image (Eq. 17-18):

* the clean image with its label (L_cle),
* the image with the exact trigger, labelled with the target (L_tri),
* the image with a perturbed trigger, delta_fixed + eta with
  eta ~ N(0, (alpha * epsilon / sigma)^2) in normalised units, clipped to the
  +-epsilon/sigma box, labelled with its true class (L_spec);

loss = L_cle + L_tri + lambda_spec * L_spec, with alpha = 0.5 and lambda_spec = 1.
A fresh eta is drawn for every image at every step.  The paper does not give
phase 2's length; the default repeats BadCLIP's 10 joint epochs.  Phase 2
continues an already tuned model, so it skips CoCoOp's warm-up epoch.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from ci_attacks.badclip import BadCLIP, BadCLIPConfig, implant, poisoned_count
from ci_attacks.poisoning import target_index_of
from ci_core.interfaces import Attack, AttackOutcome, silent
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.learning.training import PromptTuningConfig, prompt_tune
from ci_core.triggers import AdditiveTrigger
from ci_core.validators import integer, number


@attrs.frozen(kw_only=True)
class BadCLIPAdaptiveConfig(BadCLIPConfig):
    alpha: float = attrs.field(default=0.5, validator=number(ge=0))  # perturbation strength
    lambda_spec: float = attrs.field(default=1.0, validator=number(ge=0))
    phase2_epochs: int = attrs.field(default=10, validator=integer(ge=1))
    phase2_lr: float | None = attrs.field(  # None: the same learning rate as phase 1
        default=None, validator=number(gt=0, optional=True))


class FrozenTrigger:
    """delta_fixed in normalised units and the perturbed copies phase 2 draws around it."""

    def __init__(self, param: torch.Tensor, std: torch.Tensor, epsilon: float, alpha: float, generator: torch.Generator):
        self.delta = param.detach().clone()  # (3, H, W), normalised units
        self.std = std.view(3, 1, 1).to(self.delta.device)
        self.bound = epsilon / self.std
        self.sigma = alpha * epsilon / self.std
        self.generator = generator

    def stamp(self, images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (images + delta * self.std).clamp(0, 1)

    def perturbed(self, batch: int) -> torch.Tensor:
        """(B, 3, H, W) deltas delta_fixed + eta, clipped to the epsilon box (Eq. 16)."""
        eta = torch.randn((batch, *self.delta.shape), generator=self.generator).to(self.delta.device) * self.sigma
        return torch.maximum(torch.minimum(self.delta + eta, self.bound), -self.bound)


def specificity_loss(model, trigger: FrozenTrigger, images, labels, classnames, target: int, lambda_spec: float,
                     rate: float = 1.0):
    """Eq. 18: L_cle + L_tri + lambda_spec * L_spec, computed in one forward pass (L_tri over the first ``rate``
    share of the batch; none for the clean control)."""
    batch = len(images)
    poisoned = poisoned_count(batch, rate)
    both = torch.cat([images, trigger.stamp(images[:poisoned], trigger.delta),
                      trigger.stamp(images, trigger.perturbed(batch))])
    clean, exact, perturbed = model(both, classnames).split([batch, poisoned, batch])
    loss = F.cross_entropy(clean, labels)
    if poisoned:
        loss = loss + F.cross_entropy(exact, torch.full_like(labels[:poisoned], target))
    return loss + lambda_spec * F.cross_entropy(perturbed, labels)


class BadCLIPAdaptive(Attack):
    name = "badclip-adaptive"
    description = "BadCLIP with specificity fine-tuning against trigger inversion (paper section 11)"
    Config = BadCLIPAdaptiveConfig
    control_options = {"poison_rate": 0.0}
    # Phase 1 is BadCLIP on the tiny world too; phase 2 adds three epochs.
    presets = {"tiny": {**BadCLIP.presets["tiny"], "phase2_epochs": 3}}

    def run(self, *, backbone, train, target, seed, progress=silent):
        c = self.config
        target_index = target_index_of(train, target, self.name)
        torch.manual_seed(seed)
        model = PromptTunedCLIP(backbone, n_ctx=c.n_ctx)
        trigger, history = implant(model, train, target_index, c, seed=seed, progress=progress,
                                   label="badclip-adaptive phase 1")
        frozen = FrozenTrigger(trigger.param, model.std, c.epsilon, c.alpha, torch.Generator().manual_seed(seed + 1))
        phase2 = prompt_tune(
            model, train, PromptTuningConfig(epochs=c.phase2_epochs, batch_size=c.batch_size,
                                             lr=c.phase2_lr or c.lr, warmup_epochs=0, augment=c.augment),
            seed=seed + 1, progress=progress, label="badclip-adaptive phase 2",
            loss_fn=lambda m, x, y, names: specificity_loss(m, frozen, x, y, names, target_index, c.lambda_spec,
                                                            c.poison_rate),
        )
        delta = trigger.pixel_delta()
        return AttackOutcome(model=model, trigger=AdditiveTrigger(delta), log={
            "loss": history, "phase2_loss": phase2, "trigger_linf": float(delta.abs().max()),
        })
