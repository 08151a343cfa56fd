"""The attack contract: ``check_attack``.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
import torch

from ci_core.contracts.common import (BATCH, BUNDLE_MODELS, CLASSES, ContractViolation, _Subject, _backbone_intact,
                                      _check_bundle, _check_logits, _copy, _plain_json, _recorder, _run_attack,
                                      _same_data, _small, check_plugin_class, labeled_images, random_backbone,
                                      random_images, small_options)
from ci_core.contracts.trigger import check_trigger
from ci_core.errors import ConfigError
from ci_core.interfaces import Attack, AttackOutcome
from ci_core.models.backbone import Backbone
from ci_core.models.bundle import COCOOP, ZEROSHOT


def check_attack(cls: type[Attack], *, backbone: Backbone | None = None, options: Mapping[str, Any] | None = None
                 ) -> None:
    """An attack trains a model of its ``bundle_kind`` on a few-shot set and returns its ground-truth trigger.

    On 2 classes x 2 images, with ``options`` (default ``small_options``) over the "tiny" preset:

    * ``run(target=None)`` either trains (a clean attack: its trigger is None) or raises ConfigError (an
      attack that implants a backdoor needs a target; so does a target that is not a training class); a
      backdoor attack's ``run(target=...)`` returns a trigger, which passes ``check_trigger``;
    * the outcome is an AttackOutcome whose model, in eval mode on the given backbone, is a
      ``PromptTunedCLIP`` (bundle_kind cocoop) or ``ZeroShotCLIP`` (zeroshot), gives finite (B, K) logits for
      its classes and for classes it never saw, and saves and loads as a bundle of that kind with identical
      logits; its log is plain JSON; progress receives text;
    * the same seed gives the same model and trigger whatever the global random state; the backbone's
      weights and the training images are left as they were;
    * ``control_options`` (if any) are Config fields, and build a config with and without the preset.
    """
    subject = _Subject("attack", cls)
    check_plugin_class("attack", cls)
    subject.require(cls.bundle_kind in (COCOOP, ZEROSHOT), f"bundle_kind must be {COCOOP!r} or {ZEROSHOT!r}, got "
                                                           f"{cls.bundle_kind!r}")
    control = dict(cls.control_options)
    subject.require(set(control) <= set(attrs.fields_dict(cls.Config)),
                    f"control_options {sorted(control)} name fields its Config lacks")
    if control:
        cls.from_options(control)
        cls.from_options({**small_options(cls), **control}, preset="tiny")
    backbone = backbone or random_backbone()
    attack = _small(cls, options)
    size = backbone.image_size
    train = labeled_images(CLASSES[:2], size, seed=1)
    given = _copy(train)
    messages, progress = _recorder()
    try:
        outcome = _run_attack(attack, backbone, train, None, global_seed=1, progress=progress)
        target = None
    except ConfigError:
        target = train.classnames[1]
        subject.refuses(ConfigError, lambda: _run_attack(attack, backbone, train, "no such class", global_seed=1),
                        "a target that is not a training class must be refused with a ConfigError")
        outcome = _run_attack(attack, backbone, train, target, global_seed=1, progress=progress)
    except Exception as exc:
        raise ContractViolation(f"{subject.label}: run(target=None) raised {type(exc).__name__}: {exc}; an attack "
                                "that needs a target must say so with a ConfigError") from exc
    what = f"run(target={target!r})"
    subject.require(isinstance(outcome, AttackOutcome), f"{what} must return an AttackOutcome")
    if target is None:
        subject.require(outcome.trigger is None, "an attack that trains without a target implants nothing: its "
                                                 "trigger must be None")
    else:
        subject.require(outcome.trigger is not None, f"{what} implants a backdoor, so it must return its trigger")
    subject.require(all(isinstance(m, str) for m in messages), "progress must receive text")
    model = outcome.model
    expected = BUNDLE_MODELS[cls.bundle_kind]
    subject.require(type(model) is expected, f"bundle_kind {cls.bundle_kind!r} promises a {expected.__name__}, the "
                                             f"run returned a {type(model).__name__}")
    subject.require(model.backbone is backbone, "the model must be built on the backbone it was given")
    subject.require(not model.training, "the trained model must be in eval mode, as it is delivered")
    subject.require(isinstance(outcome.log, dict) and _plain_json(outcome.log),
                    f"the log must be a dict of plain JSON (finite numbers), got {outcome.log!r:.200}")
    _backbone_intact(subject, backbone, what)
    _same_data(subject, train, given, what)
    images = random_images(BATCH, size, seed=5)
    _check_bundle(subject, model, backbone, images, cls.bundle_kind, "the trained model")
    if outcome.trigger is not None:
        check_trigger(outcome.trigger, image_size=size)
    again = _run_attack(attack, backbone, train, target, global_seed=2)
    first = _check_logits(subject, model, images, "the model")
    second = _check_logits(subject, again.model, images, "the model of a second run")
    subject.require(all(torch.equal(first[k], second[k]) for k in first),
                    "the same seed gave another model (does the run draw from the global random state?)")
    if outcome.trigger is not None:
        subject.require(torch.equal(outcome.trigger.apply(images), again.trigger.apply(images)),
                        "the same seed gave another trigger")
