"""``pixb``: Pixel Backdoor's trigger inversion for one candidate class, on prompt-tuned CLIP.

As in Gwinhen/PixelBackdoor (``inversion_torch.py``), adapted only in what it
runs on: a CoCoOp CLIP taking pixel-space images (so the maximum pixel value
is 1) and the unlabelled OOD inversion set D as the inputs to flip.

* two unconstrained variables ``pos``, ``neg`` of shape (3, H, W), initialised U(0, 1);
  pattern = clamp(pos, 0, 1) - clamp(neg, 0, 1); x' = clamp(x + pattern, 0, 1);
* loss = cross-entropy(model(x'), c) + cost * (l0(pos) + l0(neg)), with the
  differentiable pixel-count surrogate l0(v) = sum over pixels of
  max over channels of tanh(v / 10) / (2 - eps) + 0.5;
* Adam(lr 0.1, betas (0.5, 0.9)); cost 1e-3, times 1.5 after 10 steps with
  ASR >= 0.9, divided by 1.5 ** 1.5 after 10 steps below;
* after each step the pattern of the step's last forward pass is pruned (values
  under 1/255 set to 0); if the step's ASR reached the bound and both its
  surrogate and its pixel count are below the best so far, it becomes the best
  and ``pos``/``neg`` are reset to the pruned pattern (the optimiser state is
  kept, as in the original).

The statistic is the number of pixels the best pattern perturbs in any channel.
Where the original would return an all-zero pattern because no step reached the
bound, we return the last pruned pattern: an all-zero pattern of size 0 would
rank a class that resisted inversion as the most suspicious one.
"""

from __future__ import annotations

import math

import attrs
import torch

from ci_core.scanning.cost_inversion import CostBalancer, optimise_under_cost
from ci_core.interfaces import Detector, Inversion
from ci_core.triggers import AdditiveTrigger
from ci_core.validators import integer, number

EPSILON = 1e-7  # as in the original
BETAS = (0.5, 0.9)
CLIP_MAX = 1.0  # images are in pixel space [0, 1]
PRUNE_BELOW = CLIP_MAX / 255  # pattern values under one grey level are dropped



def l0_surrogate(v: torch.Tensor) -> torch.Tensor:
    """Differentiable count of perturbed pixels of a (3, H, W) variable: sum_pixels max_c tanh(v/10)/(2-eps) + 0.5."""
    return (torch.tanh(v / 10) / (2 - EPSILON) + 0.5).amax(dim=0).sum()


def split_pattern(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative parts of the pattern, each clamped to [0, CLIP_MAX]."""
    return (pos * CLIP_MAX).clamp(0, CLIP_MAX), (neg * CLIP_MAX).clamp(0, CLIP_MAX)


def prune(part: torch.Tensor, threshold: float = PRUNE_BELOW) -> torch.Tensor:
    """A copy of a non-negative pattern part with the values under ``threshold`` set to 0."""
    return torch.where(part < threshold, torch.zeros_like(part), part)


def count_pixels(pattern: torch.Tensor) -> int:
    """Pixel Backdoor's trigger size: the number of non-zero pixels of sum_c |pattern| for a (3, H, W) pattern."""
    if pattern.dim() != 3:
        raise ValueError(f"pattern must have shape (C, H, W), got {tuple(pattern.shape)}")
    return int(torch.count_nonzero(pattern.abs().sum(dim=0)))


def stamp(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (images + pattern).clamp(0, CLIP_MAX)


@attrs.frozen(kw_only=True)
class PixelBackdoorConfig:
    epochs: int = attrs.field(default=5, validator=integer(ge=1))
    batch_size: int = attrs.field(default=32, validator=integer(ge=1))
    lr: float = attrs.field(default=0.1, validator=number(gt=0))
    init_cost: float = attrs.field(default=1e-3, validator=number(gt=0))
    asr_bound: float = attrs.field(default=0.9, validator=number(gt=0, le=1))
    patience: int = attrs.field(default=10, validator=integer(ge=1))
    cost_multiplier: float = attrs.field(default=1.5, validator=number(gt=1))
    batches_per_step: int = attrs.field(default=1, validator=integer(ge=1))


class PixelBackdoor(Detector):
    name = "pixb"
    description = "Pixel Backdoor (Tao et al. 2022): +/- per-pixel pattern with an l0 surrogate, perturbed-pixel count"
    default_scorer = "mad"
    Config = PixelBackdoorConfig
    # |D| = 128 on the tiny world: batches of 4 give 32 steps per epoch, as the paper's 1000 images in batches of 32.
    presets = {"tiny": {"batch_size": 4}}

    def balancer(self) -> CostBalancer:
        c = self.config
        return CostBalancer(init_cost=c.init_cost, bound=c.asr_bound, patience=c.patience, multiplier=c.cost_multiplier)

    def invert(self, *, model, images, classnames, target, generator):
        c = self.config
        device = model.device
        shape = (3, *images.shape[-2:])
        pos = torch.rand(shape, generator=generator).to(device).requires_grad_(True)
        neg = torch.rand(shape, generator=generator).to(device).requires_grad_(True)
        balancer = self.balancer()
        best, best_reg, best_pixels = None, math.inf, math.inf
        last = None

        def stamp_batch(batch):  # x', the l0 surrogate, and the pattern parts the step prunes
            part_pos, part_neg = split_pattern(pos, neg)
            return stamp(batch, part_pos - part_neg), l0_surrogate(pos) + l0_surrogate(neg), (part_pos, part_neg)

        def end_step(step, parts):  # parts: the pattern parts of the step's last forward pass
            nonlocal best, best_reg, best_pixels, last
            kept_pos, kept_neg = prune(parts[0].detach()), prune(parts[1].detach())
            last = kept_pos - kept_neg
            pixels = count_pixels(last)
            if step.asr >= c.asr_bound and step.reg < best_reg and pixels < best_pixels:
                best, best_reg, best_pixels = last.clone(), step.reg, pixels
                with torch.no_grad():
                    pos.copy_(kept_pos / CLIP_MAX)
                    neg.copy_(kept_neg / CLIP_MAX)
            balancer.update(step.asr)
            return False  # Pixel Backdoor has no early stop

        trace = optimise_under_cost(
            model=model, images=images, classnames=classnames, target=target, generator=generator,
            variables=[pos, neg], lr=c.lr, betas=BETAS, epochs=c.epochs, batch_size=c.batch_size,
            batches_per_step=c.batches_per_step, cost=lambda: balancer.cost, stamp=stamp_batch, end_step=end_step)
        if best is None:
            if last is None:  # fewer batches than one schedule step: prune the final variables
                with torch.no_grad():
                    part_pos, part_neg = split_pattern(pos, neg)
                last = prune(part_pos) - prune(part_neg)
            best = last
        pattern = best.detach().cpu()
        return Inversion(trigger=AdditiveTrigger(pattern), loss=sum(trace) / len(trace),
                         statistic=float(count_pixels(pattern)), loss_trace=trace)
