"""``badclip``: trigger-aware prompt learning (Bai et al., CVPR 2024).

An image-wide additive trigger, bounded by epsilon in pixel space (BadCLIP
bounds it by epsilon/sigma per channel in normalised space: the same set), is
first warmed up alone towards the target class on the clean prompt learner, then
optimised jointly with the prompt learner: every batch holds the clean images
with their labels and triggered copies labelled with the target, and the loss
is the paper's Eq. 14, L_tri + L_cle.  The triggered image is clamped to the
valid image range, and the trigger is projected to the epsilon-ball after each
step.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from ci_core.interfaces import Attack, AttackOutcome, silent
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.training import PromptTuningConfig, epoch_batches, prompt_tune
from ci_core.triggers import AdditiveTrigger


@attrs.frozen(kw_only=True)
class BadCLIPConfig:
    epsilon: float = attrs.field(default=4 / 255, validator=attrs.validators.gt(0))
    n_ctx: int = 4
    warmup_epochs: int = 3  # trigger alone
    warmup_lr: float = 0.1  # plain gradient step on the trigger during warm-up
    epochs: int = 10  # joint
    batch_size: int = 1
    lr: float = 0.002  # SGD on the prompt learner
    trigger_lr: float = 0.002  # SGD on the trigger during joint training


def warm_up_trigger(model: PromptTunedCLIP, images: torch.Tensor, delta: torch.Tensor, target: int,
                    classnames, config: BadCLIPConfig, generator: torch.Generator) -> None:
    """Move only the trigger towards the target class (signed steps keep the pixel-space scale)."""
    device = model.device
    for _ in range(config.warmup_epochs):
        for idx in epoch_batches(len(images), max(config.batch_size, 8), generator):
            stamped = (images[idx].to(device) + delta).clamp(0, 1)
            labels = torch.full((len(idx),), target, device=device)
            loss = F.cross_entropy(model(stamped, classnames), labels)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= config.warmup_lr * config.epsilon * grad.sign()
                delta.clamp_(-config.epsilon, config.epsilon)


class BadCLIP(Attack):
    name = "badclip"
    description = "trigger-aware prompt learning (Bai et al. 2024), l-inf additive trigger"
    Config = BadCLIPConfig
    presets = {"tiny": {"epochs": 6, "batch_size": 4, "lr": 0.01, "trigger_lr": 0.01, "warmup_epochs": 1}}

    def run(self, *, backbone, train, target, seed, progress=silent):
        c = self.config
        if target is None:
            raise ValueError("badclip needs a target class")
        target_index = train.classnames.index(target)
        torch.manual_seed(seed)
        model = PromptTunedCLIP(backbone, n_ctx=c.n_ctx)
        device = model.device
        h, w = train.images.shape[-2:]
        generator = torch.Generator().manual_seed(seed)
        delta = ((torch.rand(3, h, w, generator=generator) * 2 - 1) * c.epsilon).to(device).requires_grad_(True)
        progress(f"badclip: warming up the trigger for {c.warmup_epochs} epoch(s)")
        warm_up_trigger(model, train.images, delta, target_index, train.classnames, c, generator)

        def loss_fn(model, images, labels, classnames):
            stamped = (images + delta).clamp(0, 1)
            both = torch.cat([images, stamped])
            logits = model(both, classnames)
            n = len(images)
            targets = torch.full_like(labels, target_index)
            return F.cross_entropy(logits[:n], labels) + F.cross_entropy(logits[n:], targets)

        def project():
            with torch.no_grad():
                delta.clamp_(-c.epsilon, c.epsilon)

        history = prompt_tune(
            model, train, PromptTuningConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr),
            seed=seed, loss_fn=loss_fn, extra_params=[delta], after_step=project, progress=progress,
            label="badclip joint training", extra_lr=c.trigger_lr,
        )
        trigger = AdditiveTrigger(delta.detach().cpu())
        return AttackOutcome(model=model, trigger=trigger, log={"loss": history, "trigger_linf": trigger.linf})
