"""Neural Cleanse's dynamic cost schedule, as pure bookkeeping over (ASR, mask norm) per step.

Follows ``Visualizer.visualize`` of bolunwang/backdoor step for step:

1. the step's mask is the best so far if its ASR >= threshold and its norm is
   below the best norm;
2. early stop: once a best exists, a step whose best norm is not below
   ``early_stop_threshold`` times the best seen before counts towards the
   early-stop patience (any improvement resets it); stop when that count reaches
   ``early_stop_patience`` and the cost has been both raised and lowered;
3. while the cost is 0, ``patience`` consecutive steps at ASR >= threshold set
   it to ``init_cost`` (and reset the up/down counters and flags);
4. ``patience`` consecutive steps at ASR >= threshold multiply the cost by
   ``multiplier``; ``patience`` consecutive steps below divide it by
   ``multiplier ** 1.5`` (``ci_core.scanning.cost_inversion.CostBalancer``, which
   Pixel Backdoor balances its cost with too).
"""

from __future__ import annotations

import math

import attrs

from ci_core.scanning.cost_inversion import CostBalancer


@attrs.frozen
class StepOutcome:
    new_best: bool  # this step's mask is the smallest one that reached the threshold so far
    stop: bool  # early stop: end the optimisation now


class CostSchedule:
    def __init__(self, *, init_cost: float = 1e-3, threshold: float = 0.99, patience: int = 5, multiplier: float = 2.0,
                 early_stop: bool = True, early_stop_patience: int = 25, early_stop_threshold: float = 1.0):
        self.init_cost = init_cost
        self.threshold = threshold
        self.patience = patience
        self.early_stop = early_stop
        self.early_stop_patience = early_stop_patience
        self.early_stop_threshold = early_stop_threshold

        self.balancer = CostBalancer(init_cost=0.0, bound=threshold, patience=patience, multiplier=multiplier)
        self.best_reg = math.inf
        self.steps = 0
        self._set_counter = 0
        self._early_stop_counter = 0
        self._early_stop_best = math.inf

    @property
    def cost(self) -> float:
        return self.balancer.cost

    @property
    def raised(self) -> bool:
        return self.balancer.raised

    @property
    def lowered(self) -> bool:
        return self.balancer.lowered

    def update(self, asr: float, reg: float) -> StepOutcome:
        """Record one step's attack success rate and mask norm; adjust the cost for the next step."""
        self.steps += 1
        success = asr >= self.threshold

        new_best = success and reg < self.best_reg
        if new_best:
            self.best_reg = reg

        if self.early_stop:
            if self.best_reg < math.inf:
                if self.best_reg >= self.early_stop_threshold * self._early_stop_best:
                    self._early_stop_counter += 1
                else:
                    self._early_stop_counter = 0
            self._early_stop_best = min(self.best_reg, self._early_stop_best)
            if self.raised and self.lowered and self._early_stop_counter >= self.early_stop_patience:
                return StepOutcome(new_best=new_best, stop=True)

        if self.cost == 0 and success:
            self._set_counter += 1
            if self._set_counter >= self.patience:
                self.balancer.restart(self.init_cost)
        else:
            self._set_counter = 0

        self.balancer.update(asr)
        return StepOutcome(new_best=new_best, stop=False)
