import math

import numpy as np
import pytest
import torch

from ci_detectors.inspector import inversion_loss, margin_loss, project_linf
from ci_detectors.scoring import CIScorer, ci_scores, zscores
from ci_core.interfaces import ClassEvidence
from ci_core.triggers import AdditiveTrigger


def test_margin_loss_hand_computed():
    sims = torch.tensor([[0.30, 0.10, 0.25], [0.05, 0.40, 0.20]])
    # target 0: (0.30 - 0.25) and (0.05 - 0.40) -> mean -0.15 -> loss 0.15
    assert margin_loss(sims, 0).item() == pytest.approx(0.15)
    # target 2: (0.25 - 0.30) and (0.20 - 0.40) -> mean -0.125 -> loss 0.125
    assert margin_loss(sims, 2).item() == pytest.approx(0.125)


def test_margin_loss_only_pushes_target_and_strongest_rival():
    sims = torch.tensor([[0.30, 0.10, 0.25]], requires_grad=True)
    margin_loss(sims, 0).backward()
    assert sims.grad.tolist() == [[-1.0, 0.0, 1.0]]


def test_other_losses():
    sims = torch.tensor([[0.3, 0.1], [0.2, 0.4]])
    assert inversion_loss("logit", sims, sims * 100, 1).item() == pytest.approx(-0.25)
    ce = inversion_loss("ce", sims, sims * 10, 1).item()
    expected = -0.5 * (math.log(math.exp(1) / (math.exp(3) + math.exp(1))) + math.log(math.exp(4) / (math.exp(2) + math.exp(4))))
    assert ce == pytest.approx(expected, rel=1e-5)


def test_projection_clips_each_element_to_the_ball():
    eps = 4 / 255
    delta = torch.tensor([[-1.0, -eps, 0.0, eps / 2, 0.5]])
    project_linf(delta, eps)
    assert torch.allclose(delta, torch.tensor([[-eps, -eps, 0.0, eps / 2, eps]]))


def test_additive_trigger_clamps_to_image_range():
    delta = torch.full((3, 2, 2), 0.1)
    images = torch.tensor([0.0, 0.5, 0.95, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    out = AdditiveTrigger(delta).apply(images)
    assert torch.allclose(out[0, 0].flatten(), torch.tensor([0.1, 0.6, 1.0, 1.0]))


def test_zscores_population_std_and_constant_column():
    assert np.allclose(zscores([1.0, 2.0, 3.0]), [-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert np.allclose(zscores([5.0, 5.0]), [0.0, 0.0])


def test_ci_score_hand_computed():
    # Four classes; class 0 has high ASR and low loss.
    asr = [0.9, 0.1, 0.1, 0.1]
    loss = [-1.0, 1.0, 1.0, 1.0]
    # z_asr = [sqrt3, -1/sqrt3 x3], z_loss = [-sqrt3, 1/sqrt3 x3]; S = [2 sqrt3, -2/sqrt3 x3]
    # mean S = 0, std S = 2, so z = [sqrt3, -1/sqrt3, -1/sqrt3, -1/sqrt3]
    z = ci_scores(asr, loss)
    assert np.allclose(z, [math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)])


def _evidence(name, asr, loss):
    return ClassEvidence(name=name, asr=asr, loss=loss, statistic=None, ssim=1.0, seconds=0.0,
                         trigger=AdditiveTrigger(torch.zeros(3, 1, 1)))


def test_ci_scorer_verdict_and_threshold():
    evidence = [_evidence("a", 0.1, 1.0)] * 9 + [_evidence("t", 0.95, -2.0)]
    scores = CIScorer().score(evidence)
    assert scores.target == "t"
    assert scores.s_max == pytest.approx(3.0)  # one outlier among ten: z = (n-1)/sqrt(n-1) = 3
    assert scores.backdoored and scores.flagged == ("t",)
    assert not CIScorer(CIScorer.Config(k=3.5)).score(evidence).backdoored


def test_the_blend_inversion_raises_its_class_within_a_fixed_blend(tiny_backbone):
    """ci-blend: a pattern in [0, 1] blended at the configured alpha, which moves its class's margin on the
    inversion images far more than the noise it starts from, and the same from the same class stream."""
    from ci_core.data.ood import load_pool
    from ci_core.models.zeroshot import ZeroShotCLIP
    from ci_core.scanning.inversion import class_generator
    from ci_core.triggers import BlendTrigger
    from ci_detectors.blend import BlendInspector

    model = ZeroShotCLIP(tiny_backbone)
    pool = load_pool("builtin", inversion=32, holdout=8, image_size=tiny_backbone.image_size, seed=1)
    names = ("red circle", "green square", "blue triangle", "yellow ring")
    detector = BlendInspector.from_options({"alpha": 0.3}, preset="tiny")
    inversion = detector.invert(model=model, images=pool.inversion, classnames=names, target=2,
                                generator=class_generator(0, names[2]))
    trigger = inversion.trigger
    assert isinstance(trigger, BlendTrigger) and trigger.alpha == 0.3
    assert 0 <= trigger.pattern.min() and trigger.pattern.max() <= 1
    assert len(inversion.loss_trace) == 8  # one epoch of 32 images in batches of 4
    stamped = trigger.apply(pool.inversion)
    assert torch.allclose(stamped, 0.7 * pool.inversion + 0.3 * trigger.pattern)
    start = BlendTrigger(torch.rand(trigger.pattern.shape, generator=class_generator(0, names[2])), 0.3)
    with torch.no_grad():
        found = -margin_loss(model(stamped, names), 2)
        noise = -margin_loss(model(start.apply(pool.inversion), names), 2)
    assert found > noise + 0.01
    again = detector.invert(model=model, images=pool.inversion, classnames=names, target=2,
                            generator=class_generator(0, names[2]))
    assert torch.equal(again.trigger.pattern, trigger.pattern) and again.loss == inversion.loss
