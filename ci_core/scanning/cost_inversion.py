"""What trigger inversions under a dynamic cost share (Neural Cleanse, Pixel Backdoor).

Both optimise, for one candidate class c, a parametrised trigger with Adam on

    loss = cross-entropy(model(stamp(x)), c) + cost * regulariser,

where the cost moves with the attack success rate (ASR): ``patience``
schedule steps in a row at or over a bound multiply it, as many under divide
it by the multiplier to the power 1.5 (``CostBalancer``).  ``optimise_under_cost``
runs the epochs over the inversion set, groups ``batches_per_step`` mini-batches
into one schedule step (ASR and regulariser averaged over them), and hands each
step to the detector, which keeps its best trigger and moves its cost.  How a
trigger is parametrised, what counts as the best, and the schedule's other
rules stay in each detector's own module.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import torch
import torch.nn.functional as F

from ci_core.models.zeroshot import CLIPClassifier
from ci_core.learning.training import epoch_batches


class CostBalancer:
    """The cost rises ``multiplier``-fold after ``patience`` steps at or over the ASR ``bound``, falls
    ``multiplier ** 1.5``-fold after as many under it; ``raised``/``lowered`` say whether it has moved."""

    def __init__(self, *, init_cost: float = 1e-3, bound: float = 0.9, patience: int = 10, multiplier: float = 1.5):
        self.bound = bound
        self.patience = patience
        self.multiplier_up = multiplier
        self.multiplier_down = multiplier ** 1.5
        self.restart(init_cost)

    def restart(self, cost: float) -> None:
        """Set the cost and forget the steps counted and the moves made so far."""
        self.cost = cost
        self._up = 0
        self._down = 0
        self.raised = False
        self.lowered = False

    def update(self, asr: float) -> float:
        """Record one step's attack success rate; returns the cost for the next step."""
        if asr >= self.bound:
            self._up += 1
            self._down = 0
        else:
            self._up = 0
            self._down += 1
        if self._up >= self.patience:
            self._up = 0
            self.cost *= self.multiplier_up
            self.raised = True
        elif self._down >= self.patience:
            self._down = 0
            self.cost /= self.multiplier_down
            self.lowered = True
        return self.cost


@attrs.frozen
class CostStep:
    """One schedule step of ``optimise_under_cost``."""

    asr: float  # share of the step's images the model put in the candidate class
    reg: float  # the regulariser, averaged over the step's mini-batches


# stamp(batch) -> (stamped images, regulariser, what the detector wants back at the end of the step)
Stamp = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, Any]]
# end_step(step, the last batch's third value of stamp) -> True to stop the optimisation
EndStep = Callable[[CostStep, Any], bool]


def optimise_under_cost(*, model: CLIPClassifier, images: torch.Tensor, classnames: Sequence[str], target: int,
                        generator: torch.Generator, variables: Sequence[torch.Tensor], lr: float,
                        betas: tuple[float, float], epochs: int, batch_size: int, batches_per_step: int,
                        cost: Callable[[], float], stamp: Stamp, end_step: EndStep) -> tuple[float, ...]:
    """Optimise ``variables`` so that ``stamp`` sends ``images`` to ``classnames[target]``; returns every batch's loss.

    ``cost()`` weighs the regulariser in each batch's loss; ``end_step`` is called after every
    ``batches_per_step`` mini-batches (a last, shorter group is not a step) and may end the run early.
    """
    device = model.device
    optimizer = torch.optim.Adam(variables, lr=lr, betas=betas)
    trace: list[float] = []
    hits = seen = batches = 0
    regs: list[float] = []
    for _ in range(epochs):
        for idx in epoch_batches(len(images), batch_size, generator):
            batch = images[idx].to(device)
            stamped, reg, kept = stamp(batch)
            logits = model(stamped, classnames)
            labels = torch.full((len(batch),), target, device=device)
            loss = F.cross_entropy(logits, labels) + cost() * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            trace.append(loss.item())
            hits += int(logits.argmax(dim=1).eq(target).sum())
            seen += len(batch)
            regs.append(reg.item())
            batches += 1
            if batches < batches_per_step:
                continue
            stop = end_step(CostStep(asr=hits / seen, reg=sum(regs) / len(regs)), kept)
            hits = seen = batches = 0
            regs = []
            if stop:
                return tuple(trace)
    return tuple(trace)
