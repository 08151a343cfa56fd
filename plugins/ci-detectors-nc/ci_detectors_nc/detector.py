"""``nc``: Neural Cleanse's trigger reverse-engineering for one candidate class, on prompt-tuned CLIP.

As in bolunwang/backdoor (``visualizer.py``), adapted only in what it runs on:
the model is a CoCoOp CLIP taking pixel-space images, and the images are the
unlabelled OOD inversion set D.

* mask = tanh(m)/(2 - eps) + 0.5 of shape (1, H, W) and pattern = tanh(p)/(2 - eps) + 0.5
  of shape (3, H, W), both initialised U(0, 1) (mapped back through arctanh);
* x' = (1 - mask) * x + mask * pattern;
* loss = cross-entropy(model(x'), c) + cost * ||mask||_1, Adam(lr 0.1, betas (0.5, 0.9));
* the dynamic cost of ``schedule.CostSchedule`` with the example run's settings
  (threshold 0.99, patience 5, multiplier 2, early-stop patience 25 steps
  without any improvement), for 5 epochs over D;
* the result is the smallest mask (with its pattern) whose step reached the
  threshold, or the last one if none did.

One schedule step is ``batches_per_step`` mini-batches (ASR and mask norm
averaged over them); the original averaged a pass over its whole sample per
step, which over 5 epochs would be 5 steps, fewer than the patience.  We keep
the mask and pattern as they were in the step's last forward pass (the mask
whose ASR was measured); the original read them after that step's update.
The statistic is the l1 norm of the kept mask.
"""

from __future__ import annotations

import attrs
import torch

from ci_core.scanning.cost_inversion import optimise_under_cost
from ci_core.interfaces import Detector, Inversion
from ci_core.validators import boolean, integer, number
from ci_detectors_nc.schedule import CostSchedule
from ci_detectors_nc.trigger import MaskPatternTrigger

EPSILON = 1e-7  # Keras' K.epsilon(), as in the original
BETAS = (0.5, 0.9)



def from_tanh(v: torch.Tensor) -> torch.Tensor:
    """The original's map from the unconstrained variable to [0, 1] (clamped: float32 rounding may leave it by 3e-8)."""
    return (torch.tanh(v) / (2 - EPSILON) + 0.5).clamp(0, 1)


def to_tanh(u: torch.Tensor) -> torch.Tensor:
    """Inverse of ``from_tanh`` for values in [0, 1]."""
    return torch.atanh((u.clamp(0, 1) - 0.5) * (2 - EPSILON))


def blend(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * images + mask * pattern


@attrs.frozen(kw_only=True)
class NeuralCleanseConfig:
    epochs: int = attrs.field(default=5, validator=integer(ge=1))
    batch_size: int = attrs.field(default=32, validator=integer(ge=1))
    lr: float = attrs.field(default=0.1, validator=number(gt=0))
    init_cost: float = attrs.field(default=1e-3, validator=number(gt=0))
    asr_threshold: float = attrs.field(default=0.99, validator=number(gt=0, le=1))
    patience: int = attrs.field(default=5, validator=integer(ge=1))
    cost_multiplier: float = attrs.field(default=2.0, validator=number(gt=1))
    early_stop: bool = attrs.field(default=True, validator=boolean)
    early_stop_patience: int = attrs.field(default=25, validator=integer(ge=1))
    early_stop_threshold: float = attrs.field(default=1.0, validator=number(gt=0, le=1))
    batches_per_step: int = attrs.field(default=1, validator=integer(ge=1))


class NeuralCleanse(Detector):
    name = "nc"
    description = "Neural Cleanse (Wang et al. 2019): mask + pattern per class, l1 mask norm, dynamic cost"
    default_scorer = "mad"
    Config = NeuralCleanseConfig
    # |D| = 128 on the tiny world: batches of 4 give 32 steps per epoch, as the paper's 1000 images in batches of 32.
    presets = {"tiny": {"batch_size": 4}}

    def schedule(self) -> CostSchedule:
        c = self.config
        return CostSchedule(init_cost=c.init_cost, threshold=c.asr_threshold, patience=c.patience,
                            multiplier=c.cost_multiplier, early_stop=c.early_stop,
                            early_stop_patience=c.early_stop_patience, early_stop_threshold=c.early_stop_threshold)

    def invert(self, *, model, images, classnames, target, generator):
        c = self.config
        device = model.device
        height, width = images.shape[-2:]
        mask_var = to_tanh(torch.rand(1, height, width, generator=generator)).to(device).requires_grad_(True)
        pattern_var = to_tanh(torch.rand(3, height, width, generator=generator)).to(device).requires_grad_(True)
        schedule = self.schedule()
        best = None

        def stamp(batch):  # x', the l1 regulariser, and the mask and pattern the step may keep
            mask, pattern = from_tanh(mask_var), from_tanh(pattern_var)
            return blend(batch, mask, pattern), mask.sum(), (mask, pattern)

        def end_step(step, kept):  # kept: the mask and pattern of the step's last forward pass
            nonlocal best
            outcome = schedule.update(step.asr, step.reg)
            if outcome.new_best:
                best = tuple(t.detach().clone() for t in kept)
            return outcome.stop

        trace = optimise_under_cost(
            model=model, images=images, classnames=classnames, target=target, generator=generator,
            variables=[mask_var, pattern_var], lr=c.lr, betas=BETAS, epochs=c.epochs, batch_size=c.batch_size,
            batches_per_step=c.batches_per_step, cost=lambda: schedule.cost, stamp=stamp, end_step=end_step)
        if best is None:
            with torch.no_grad():
                best = (from_tanh(mask_var), from_tanh(pattern_var))
        trigger = MaskPatternTrigger(best[0].cpu(), best[1].cpu())
        return Inversion(trigger=trigger, loss=sum(trace) / len(trace), statistic=trigger.l1, loss_trace=trace)
