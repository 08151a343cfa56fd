"""The detector contract: ``check_detector``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ci_core.contracts.common import (BATCH, CLASSES, ContractViolation, _Subject, _backbone_intact, _finite_number,
                                      _invert, _seeded, _small, _snapshot, _unchanged, check_plugin_class,
                                      random_backbone, random_images)
from ci_core.contracts.scorer import _check_scores
from ci_core.contracts.trigger import check_trigger
from ci_core.errors import ConfigError
from ci_core.interfaces import ClassEvidence, Detector, Inversion
from ci_core.models.backbone import Backbone
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.coop import CoOpCLIP
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.plugins import registry
from ci_core.triggers import Trigger


def _detector_models(backbone: Backbone) -> dict[str, torch.nn.Module]:
    """The models a scan may hand a detector: CoCoOp (its prompt learner still trainable, as an attack leaves
    it), and, frozen as the scan freezes them, the zero-shot and CoOp ones."""
    return {
        "PromptTunedCLIP": _seeded(0, lambda: PromptTunedCLIP(backbone).eval()),
        "ZeroShotCLIP": _seeded(0, lambda: ZeroShotCLIP(backbone).eval().requires_grad_(False)),
        "CoOpCLIP": _seeded(0, lambda: CoOpCLIP(backbone, n_ctx=4).eval().requires_grad_(False)),
    }


def _check_inversion(subject: _Subject, inversion: Inversion, image_size: int, what: str) -> None:
    subject.require(isinstance(inversion, Inversion), f"{what} must return an Inversion")
    subject.require(isinstance(inversion.trigger, Trigger), f"{what}: the inversion's trigger is not a Trigger")
    subject.require(_finite_number(inversion.loss), f"{what}: the loss must be a finite number, got "
                                                    f"{inversion.loss!r}")
    subject.require(inversion.statistic is None or _finite_number(inversion.statistic),
                    f"{what}: the statistic must be a finite number or None, got {inversion.statistic!r}")
    trace = inversion.loss_trace
    subject.require(isinstance(trace, (tuple, list)) and all(_finite_number(v) for v in trace),
                    f"{what}: loss_trace must be a sequence of finite numbers, got {trace!r:.200}")
    check_trigger(inversion.trigger, image_size=image_size)


def _evidence(model, inversions: Sequence[Inversion], images: torch.Tensor, classnames) -> list[ClassEvidence]:
    """What the scan measures of each class's inversion (ASR and SSIM here on the inversion images themselves)."""
    from ci_core.ssim import ssim

    rows = []
    with torch.no_grad():
        for index, (name, inversion) in enumerate(zip(classnames, inversions)):
            stamped = inversion.trigger.apply(images)
            asr = float(model(stamped, classnames).argmax(1).eq(index).float().mean())
            rows.append(ClassEvidence(name=name, asr=asr, loss=float(inversion.loss),
                                      statistic=None if inversion.statistic is None else float(inversion.statistic),
                                      ssim=float(ssim(images, stamped).mean()), seconds=0.0,
                                      loss_trace=tuple(float(v) for v in inversion.loss_trace),
                                      trigger=inversion.trigger))
    return rows


def check_detector(cls: type[Detector], *, backbone: Backbone | None = None,
                   options: Mapping[str, Any] | None = None) -> None:
    """A detector reconstructs, for one candidate class, a trigger that sends the inversion images to it.

    On a pool of 4 random images and 3 classes, with ``options`` (default ``small_options``) over the
    "tiny" preset, on a CoCoOp, a zero-shot and a CoOp model:

    * ``invert`` returns an Inversion: a Trigger for images of the pool's size that passes
      ``check_trigger``, a finite loss, a finite statistic or None, a loss_trace of finite numbers;
    * the same generator seed gives the same inversion whatever the global random state;
    * the model's tensors, requires_grad flags and mode, the backbone and the pool are left as they were;
    * its ``default_scorer`` is registered and scores the evidence of one inversion per class (against
      the same detector's inversions on the zero-shot backbone, if it needs a reference).
    """
    subject = _Subject("detector", cls)
    check_plugin_class("detector", cls)
    plugins = registry()
    scorer_name = getattr(cls, "default_scorer", None)
    subject.require(isinstance(scorer_name, str) and scorer_name in plugins.names("scorer"),
                    f"its default_scorer {scorer_name!r} is not a registered scorer")
    scorer_cls = plugins.get("scorer", scorer_name)
    backbone = backbone or random_backbone()
    detector = _small(cls, options)
    size = backbone.image_size
    images = random_images(BATCH, size, seed=2)
    given = images.clone()
    classnames = CLASSES[:max(3, scorer_cls.min_classes)]
    models = _detector_models(backbone)
    for kind, model in models.items():
        what = f"invert on a {kind}"
        before = _snapshot(model)
        first = _invert(detector, model, images, classnames, 1, global_seed=1)
        problem = _unchanged(model, before)
        subject.require(not problem, f"{what}: the model must be left as it was: {problem}")
        subject.require(torch.equal(images, given), f"{what} changed the pool's images (in place)")
        _check_inversion(subject, first, size, what)
        second = _invert(detector, model, images, classnames, 1, global_seed=2)
        same = (first.loss == second.loss and first.statistic == second.statistic
                and tuple(first.loss_trace) == tuple(second.loss_trace)
                and torch.equal(first.trigger.apply(images), second.trigger.apply(images)))
        subject.require(same, f"{what}: the same generator seed gave another inversion (does it draw from the "
                              "global random state?)")
    _backbone_intact(subject, backbone, "invert")
    cocoop = models["PromptTunedCLIP"]
    inversions = [_invert(detector, cocoop, images, classnames, i, global_seed=1) for i in range(len(classnames))]
    evidence = _evidence(cocoop, inversions, images, classnames)
    reference = None
    if scorer_cls.needs_reference:
        zero_shot = ZeroShotCLIP(backbone, own_visual=False).eval()
        reference = _evidence(zero_shot, [_invert(detector, zero_shot, images, classnames, i, global_seed=1)
                                          for i in range(len(classnames))], images, classnames)
    try:
        scores = scorer_cls.from_options().score(evidence, reference)
    except ConfigError as exc:
        raise ContractViolation(f"{subject.label}: its default scorer {scorer_name!r} cannot score its evidence: "
                                f"{exc}") from exc
    _check_scores(_Subject("scorer", scorer_cls), scores, [e.name for e in evidence], f"on {cls.name}'s evidence")
