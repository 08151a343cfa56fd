"""``ci-blend``: CLIP-Inspector's inversion over blended triggers, x' = (1 - alpha) x + alpha P.

Why a second family: ``ci`` searches an l-inf ball (8/255 on the tiny world), and a trigger that moves pixels
far more than that lies outside what it can reach.  Blended's pattern (alpha 0.2 in the paper, 0.5 on the tiny
world) moves a pixel by up to alpha, and the encoder-level backdoor blends a noise patch at 0.5: on the
development models ``ci`` missed the encoder-level backdoor on two datasets (docs/verdicts.md, issue 21).
This detector keeps everything else of Algorithm 1 (the margin loss, one epoch of Adam over D, the held-out
ASR) and optimises instead a pattern P in [0, 1] (a sigmoid of free logits, started from uniform noise of the
class's own stream) that is blended into every image at a fixed ``alpha``.  A fixed alpha is a fixed budget:
each class gets the same freedom, so the per-class cost compares with the backbone's like ``ci``'s does.
"""

from __future__ import annotations

import attrs
import torch

from ci_core.interfaces import Detector
from ci_core.triggers import BlendTrigger
from ci_core.validators import number
from ci_detectors.inspector import InversionLoopFields, optimise_universal


@attrs.frozen(kw_only=True)
class BlendInspectorConfig(InversionLoopFields):
    alpha: float = attrs.field(default=0.2, validator=number(gt=0, le=1))  # the paper's Blended blend


class BlendInspector(Detector):
    name = "ci-blend"
    description = "CLIP-Inspector's inversion over blended patterns, (1 - alpha) x + alpha P at a fixed alpha"
    default_scorer = "ci"
    Config = BlendInspectorConfig
    # Tiny world: ci's batches (32 steps of 4 over |D| = 128) and its attacks' blend, alpha 0.5 (Blended's
    # and the encoder-level backdoor's tiny presets).
    presets = {"tiny": {"batch_size": 4, "alpha": 0.5}}

    def invert(self, *, model, images, classnames, target, generator):
        c = self.config
        start = torch.rand(3, *images.shape[-2:], generator=generator).clamp(0.02, 0.98)
        logits = torch.logit(start).to(model.device)
        run = optimise_universal(
            model, images, classnames, target, generator, logits,
            lambda batch: (1 - c.alpha) * batch + c.alpha * torch.sigmoid(logits),
            lr=c.lr, batch_size=c.batch_size, epochs=c.epochs, loss=c.loss)
        return run.inversion(BlendTrigger(torch.sigmoid(logits.detach()).cpu(), c.alpha))
