"""The repairer contract: ``check_repairer``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ci_core.contracts.common import (BATCH, BUNDLE_MODELS, CLASSES, ContractViolation, EPSILON, _Subject,
                                      _backbone_intact, _check_bundle, _check_logits, _copy, _recorder, _same_data,
                                      _seeded, _small, _snapshot, _unchanged, check_plugin_class, labeled_images,
                                      random_backbone, random_images)
from ci_core.data.labeled import LabeledImages
from ci_core.errors import ConfigError
from ci_core.interfaces import Repairer
from ci_core.models.backbone import Backbone
from ci_core.models.bundle import COCOOP, COOP
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.coop import CoOpCLIP
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.triggers import AdditiveTrigger


def _repair(repairer: Repairer, model, trigger, clean: LabeledImages, *, global_seed: int, progress=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        kwargs = {} if progress is None else {"progress": progress}
        return repairer.repair(model=model, trigger=trigger, target=clean.classnames[1], clean=clean, seed=0, **kwargs)


def _model_of_kind(kind: str, backbone: Backbone):
    if kind == COCOOP:
        return _seeded(0, lambda: PromptTunedCLIP(backbone).eval())
    if kind == COOP:
        return _seeded(0, lambda: CoOpCLIP(backbone, n_ctx=4).eval())
    return _seeded(0, lambda: ZeroShotCLIP(backbone).eval().requires_grad_(False))


def check_repairer(cls: type[Repairer], *, backbone: Backbone | None = None,
                   options: Mapping[str, Any] | None = None) -> None:
    """A repairer returns a new model without the backdoor and leaves the one it was given alone.

    For a model of each of its ``bundle_kinds``, with an additive trigger for the second of 2 classes and
    a clean set of 2 x 2 images, with ``options`` (default ``small_options``) over the "tiny" preset:

    * ``repair`` returns a new model of the same class, on the same backbone, in eval mode, with finite
      (B, K) logits for its classes and others, that saves and loads as a bundle with identical logits;
    * the input model (tensors, requires_grad flags, mode), the backbone and the clean set are left as
      they were; progress receives text;
    * the same seed gives the same model whatever the global random state;
    * without a trigger it repairs, or refuses with a ConfigError.
    """
    subject = _Subject("repairer", cls)
    check_plugin_class("repairer", cls)
    kinds = cls.bundle_kinds
    subject.require(isinstance(kinds, tuple) and kinds and set(kinds) <= set(BUNDLE_MODELS),
                    f"bundle_kinds must be a non-empty tuple of {sorted(BUNDLE_MODELS)}, got {kinds!r}")
    backbone = backbone or random_backbone()
    repairer = _small(cls, options)
    size = backbone.image_size
    clean = labeled_images(CLASSES[:2], size, seed=3)
    given = _copy(clean)
    delta = (torch.rand(3, size, size, generator=torch.Generator().manual_seed(4)) * 2 - 1) * EPSILON
    trigger = AdditiveTrigger(delta, epsilon=EPSILON)
    images = random_images(BATCH, size, seed=5)
    for kind in kinds:
        model = _model_of_kind(kind, backbone)
        before = _snapshot(model)
        what = f"repair of a {type(model).__name__}"
        messages, progress = _recorder()
        repaired = _repair(repairer, model, trigger, clean, global_seed=1, progress=progress)
        problem = _unchanged(model, before)
        subject.require(not problem, f"{what}: the input model must be left as it was: {problem}")
        subject.require(repaired is not model and type(repaired) is type(model),
                        f"{what} must return a new {type(model).__name__}, got {type(repaired).__name__}")
        subject.require(repaired.backbone is backbone, f"{what}: the repaired model must share the backbone")
        subject.require(not repaired.training, f"{what}: the repaired model must be in eval mode")
        subject.require(all(isinstance(m, str) for m in messages), "progress must receive text")
        _backbone_intact(subject, backbone, what)
        _same_data(subject, clean, given, what)
        _check_bundle(subject, repaired, backbone, images, kind, f"the model of the {what}")
        again = _repair(repairer, model, trigger, clean, global_seed=2)
        first = _check_logits(subject, repaired, images, what)
        second = _check_logits(subject, again, images, what)
        subject.require(all(torch.equal(first[k], second[k]) for k in first),
                        f"{what}: the same seed gave another model (does it draw from the global random state?)")
        try:
            untriggered = _repair(repairer, model, None, clean, global_seed=1)
        except ConfigError:
            continue
        except Exception as exc:
            raise ContractViolation(f"{subject.label}: {what} without a trigger raised {type(exc).__name__}: {exc}; "
                                    "a repairer that needs a trigger must say so with a ConfigError") from exc
        subject.require(type(untriggered) is type(model), f"{what} without a trigger returned a "
                                                           f"{type(untriggered).__name__}")
        _check_logits(subject, untriggered, images, f"{what} without a trigger")
