"""The machinery Neural Cleanse and Pixel Backdoor share: the up/down cost balancer and the optimisation loop."""

import pytest
import torch
import torch.nn.functional as F

from ci_core.scanning.cost_inversion import CostBalancer, CostStep, optimise_under_cost


def test_balancer_moves_after_patience_steps_and_restarts():
    balancer = CostBalancer(init_cost=1.0, bound=0.5, patience=2, multiplier=4.0)
    assert [balancer.update(a) for a in (0.5, 0.1, 0.9, 0.9)] == [1.0, 1.0, 1.0, 4.0]  # a miss restarts the count
    assert balancer.raised and not balancer.lowered
    assert [balancer.update(a) for a in (0.1, 0.1)] == [4.0, 4.0 / 8.0]  # down by 4 ** 1.5
    assert balancer.lowered
    balancer.update(0.1)
    balancer.restart(3.0)
    assert balancer.cost == 3.0 and not balancer.raised and not balancer.lowered
    assert balancer.update(0.1) == 3.0  # the miss counted before the restart is forgotten


class ShiftModel(torch.nn.Module):
    """Two classes; class 1's logit is 10 * (mean pixel - 0.5): brightening the images sends them to class 1."""

    device = torch.device("cpu")

    def forward(self, images, classnames):
        score = 10 * (images.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def run(*, epochs=2, batches_per_step=1, stop_after=None, cost=0.01):
    images = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    shift = torch.zeros(1, requires_grad=True)
    steps, firsts = [], []

    def stamp(batch):
        return (batch + shift).clamp(0, 1), shift.abs().sum() + 1.0, float(shift.detach())

    def end_step(step, kept):
        steps.append(step)
        firsts.append(kept)
        return stop_after is not None and len(steps) >= stop_after

    trace = optimise_under_cost(model=ShiftModel(), images=images, classnames=("dark", "bright"), target=1,
                                generator=torch.Generator().manual_seed(1), variables=[shift], lr=0.1, betas=(0.5, 0.9),
                                epochs=epochs, batch_size=4, batches_per_step=batches_per_step, cost=lambda: cost,
                                stamp=stamp, end_step=end_step)
    return trace, steps, firsts, images, shift


def test_one_step_per_group_of_batches_across_epochs():
    trace, steps, _, _, shift = run(epochs=2, batches_per_step=1)
    assert len(trace) == 6 and len(steps) == 6  # 10 images in batches of 4: 3 batches an epoch
    trace, steps, _, _, _ = run(epochs=2, batches_per_step=4)
    assert len(trace) == 6 and len(steps) == 1  # the last 2 batches do not make a step
    assert all(isinstance(s, CostStep) and 0 <= s.asr <= 1 for s in steps)


def test_the_loss_is_cross_entropy_plus_cost_times_regulariser():
    trace, steps, kept, images, _ = run(epochs=1, batches_per_step=1, cost=0.5)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    first = images[order[:4]]  # the first batch, stamped with shift 0
    logits = ShiftModel()(first, ())
    expected = F.cross_entropy(logits, torch.ones(4, dtype=torch.long)) + 0.5 * 1.0
    assert trace[0] == pytest.approx(float(expected))
    assert kept[0] == 0.0 and steps[0].reg == pytest.approx(1.0)
    assert steps[0].asr == 0.0  # dark images stay in class 0 before the shift moves
    assert trace[-1] < trace[0]


def test_end_step_can_stop_the_run():
    trace, steps, _, _, _ = run(epochs=5, batches_per_step=2, stop_after=2)
    assert len(steps) == 2 and len(trace) == 4
