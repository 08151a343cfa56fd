"""``ci``: CLIP-Inspector's trigger inversion (paper Algorithm 1, Eq. 3-5).

For a candidate class c: delta ~ U[-eps, eps] over the whole image, one epoch
of Adam (lr 0.1) over the inversion set D in batches of 32, minimising the
margin loss -(l_c - max_{c' != c} l_c') on the cosine similarities l, with the
projection onto the eps-ball after every step.  The average loss over the
epoch is L_avg(c); the core measures ASR(c) on the held-out set T.
The cross-entropy and raw-logit objectives of the paper's Table 4 are options.
"""

from __future__ import annotations

from typing import Callable, Sequence

import attrs
import torch
import torch.nn.functional as F

from ci_core.interfaces import Detector, Inversion
from ci_core.learning.training import epoch_batches
from ci_core.triggers import AdditiveTrigger
from ci_core.validators import integer, number, one_of

LOSSES = ("margin", "ce", "logit")


def margin_loss(similarities: torch.Tensor, target: int) -> torch.Tensor:
    """Eq. 4: -(1/|B|) sum_x [l_c(x) - max_{c' != c} l_c'(x)]."""
    others = similarities.clone()
    others[:, target] = float("-inf")
    return -(similarities[:, target] - others.max(dim=1).values).mean()


def inversion_loss(kind: str, similarities: torch.Tensor, logits: torch.Tensor, target: int) -> torch.Tensor:
    if kind == "margin":
        return margin_loss(similarities, target)
    if kind == "ce":  # Eq. 10
        return F.cross_entropy(logits, torch.full((len(logits),), target, device=logits.device))
    return -similarities[:, target].mean()  # "logit", Eq. 9


def project_linf(delta: torch.Tensor, epsilon: float) -> None:
    """In place: clip every element to [-epsilon, epsilon] (Algorithm 1, line 7)."""
    with torch.no_grad():
        delta.clamp_(-epsilon, epsilon)


@attrs.frozen(kw_only=True)
class InversionLoopFields:
    """Algorithm 1's loop (``optimise_universal``): what every universal-trigger inversion of this package shares."""

    lr: float = attrs.field(default=0.1, validator=number(gt=0))
    batch_size: int = attrs.field(default=32, validator=integer(ge=1))
    epochs: int = attrs.field(default=1, validator=integer(ge=1))
    loss: str = attrs.field(default="margin", validator=one_of(LOSSES))


@attrs.frozen(kw_only=True)
class InspectorConfig(InversionLoopFields):
    epsilon: float = attrs.field(default=4 / 255, validator=number(gt=0, le=1))  # pixels are in [0, 1]


class CLIPInspector(Detector):
    name = "ci"
    description = "CLIP-Inspector: l-inf trigger inversion with the margin loss, ASR+loss z-scores"
    default_scorer = "ci"
    Config = InspectorConfig
    # Tiny world: |D| = 128 in batches of 4 keeps the paper's 32 steps per epoch, and the budget is
    # the tiny world's epsilon (8/255, the same as its attacks').
    presets = {"tiny": {"batch_size": 4, "epsilon": 8 / 255}}

    def invert(self, *, model, images, classnames, target, generator):
        c = self.config
        delta = ((torch.rand(3, *images.shape[-2:], generator=generator) * 2 - 1) * c.epsilon).to(model.device)
        run = optimise_universal(
            model, images, classnames, target, generator, delta, lambda batch: (batch + delta).clamp(0, 1),
            lambda: project_linf(delta, c.epsilon), lr=c.lr, batch_size=c.batch_size, epochs=c.epochs, loss=c.loss)
        return run.inversion(AdditiveTrigger(delta.detach().cpu()))


@attrs.frozen(kw_only=True)
class UniversalRun:
    trace: tuple[float, ...]  # each step's loss, over the batch's images with finite logits
    set_aside: int  # stamped images whose logits were not finite, left out of their step

    def inversion(self, trigger) -> Inversion:
        """The run as an Inversion of ``trigger``: L_avg is the mean step loss (NaN when no step had an image)."""
        loss = sum(self.trace) / len(self.trace) if self.trace else float("nan")
        return Inversion(trigger=trigger, loss=loss, statistic=None, loss_trace=self.trace, set_aside=self.set_aside)


def optimise_universal(model, images: torch.Tensor, classnames: Sequence[str], target: int,
                       generator: torch.Generator, parameter: torch.Tensor,
                       stamp: Callable[[torch.Tensor], torch.Tensor], project: Callable[[], None] = lambda: None, *,
                       lr: float, batch_size: int, epochs: int, loss: str) -> UniversalRun:
    """Algorithm 1's loop: Adam (``lr``) on one ``parameter`` shared by every image, ``epochs`` passes over
    ``images`` in shuffled batches, the ``loss`` towards ``target`` on ``stamp(batch)``, ``project`` after each
    step.  ``ci`` optimises an l-inf delta with it, ``ci-blend`` a blended pattern.

    A stamped image whose logits are not finite is left out of its step, the step recomputed on the others (one
    NaN row would make the whole gradient NaN); a step with no image left is skipped.  A clean model never takes
    that path, so its inversion is unchanged; the scan reports any image set aside."""
    device = model.device
    parameter.requires_grad_(True)
    optimizer = torch.optim.Adam([parameter], lr=lr)
    scale = float(model.clip.logit_scale.exp())
    trace, set_aside = [], 0
    for _ in range(epochs):
        for idx in epoch_batches(len(images), batch_size, generator):
            batch = images[idx].to(device)
            logits = model(stamp(batch), classnames)
            finite = torch.isfinite(logits).all(dim=1)
            if not bool(finite.all()):
                set_aside += int((~finite).sum())
                if not bool(finite.any()):
                    continue
                logits = model(stamp(batch[finite]), classnames)
            value = inversion_loss(loss, logits / scale, logits, target)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            project()
            trace.append(value.item())
    return UniversalRun(trace=tuple(trace), set_aside=set_aside)
