"""Plugin contracts: what every attack, detector, scorer, repairer, dataset and trigger must do, checked by running it.

As timm runs every registered model through forward and backward, one function per kind runs a plugin
class for real, on the tiny CLIP's architecture with random weights and a few classes, and checks its
outputs' types, shapes and invariants:

    check_attack(cls)      check_detector(cls)    check_scorer(cls)
    check_repairer(cls)    check_dataset(cls, data_root=None)
    check_trigger(trigger)                         # an instance: triggers need constructor arguments
    check_entry(entry, ...)                        # a registry entry (ci_core.plugins.Registered) of any kind

Each raises ``ContractViolation`` (an ``AssertionError``) that names the plugin and the clause it
broke.  The clauses are written out in each function's docstring.  Runs are tiny: two or three
classes of two random images, one epoch, one or two optimiser steps.  A plugin runs on its "tiny"
preset with ``small_options`` on top (epochs, warm-up and batch sizes shrunk through the Config fields
it has); a plugin whose fields are named otherwise passes its own ``options``.  A plugin
distribution's tests call these on the class its entry point registered::

    from ci_core.contracts import check_detector
    from ci_core.plugins import registry

    def test_contract():
        check_detector(registry().get("detector", "my-detector"))

A trigger class is checked on an instance: ``produced_trigger(cls)`` finds one by running the
registered detectors and attacks until one returns a trigger of that class (and ``check_attack`` and
``check_detector`` check every trigger they are given back).  This module imports no plugin: it reaches
the others through the registry.

``source_distribution(folder)`` makes a plugin distribution's source folder look installed in this
process (the name, version and entry points of its pyproject.toml, through a substituted
``importlib.metadata.distributions``, and the folder on ``sys.path``), so that its tests run without
``pip install``; ``hidden_distribution(name)`` makes an installed one look absent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import attrs
import torch

from ci_core.data.labeled import LabeledImages
from ci_core.errors import ConfigError, DataError
from ci_core.interfaces import (Attack, AttackOutcome, ClassEvidence, Dataset, Detector, Inversion, Plugin,
                                Repairer, Scorer, Scores, to_json)
from ci_core.models.backbone import TINY_MODEL, Backbone, load_backbone, state_dict_sha256
from ci_core.models.bundle import COCOOP, COOP, ZEROSHOT, load_bundle, save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.coop import CoOpCLIP
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.plugins import ENTRY_POINT_GROUP, NAME_ATTRIBUTE, Registered, registry
from ci_core.triggers import AdditiveTrigger, Trigger

__all__ = [
    "ContractViolation", "check_attack", "check_dataset", "check_detector", "check_entry", "check_plugin_class",
    "check_repairer", "check_scorer", "check_trigger", "hidden_distribution", "labeled_images", "produced_trigger",
    "random_backbone", "random_images", "registered_by", "small_options", "source_distribution",
]

CLASSES = ("red circle", "blue square", "green star", "yellow cross", "purple ring", "orange heart")
OTHER_CLASSES = ("grey kite", "red circle", "teal moon")  # a class list the model was not trained on
PER_CLASS = 2  # training images per class
BATCH = 4  # one optimiser step over 2 x 2 images or a pool of 4
EPSILON = 8 / 255
# Config fields shrunk wherever a plugin has them (on top of its "tiny" preset).
SMALL = {"epochs": 1, "warmup_epochs": 1, "phase2_epochs": 1, "trigger_epochs": 1,
         "batch_size": BATCH, "trigger_batch_size": BATCH}
BUNDLE_MODELS = {COCOOP: PromptTunedCLIP, COOP: CoOpCLIP, ZEROSHOT: ZeroShotCLIP}


class ContractViolation(AssertionError):
    """A plugin does not do what its kind promises."""


class _Subject:
    """The plugin under check, for messages that say whose contract broke."""

    def __init__(self, kind: str, cls: type):
        name = getattr(cls, NAME_ATTRIBUTE.get(kind, "name"), "?")
        self.label = f"{kind} {name!r} ({cls.__module__}.{cls.__qualname__})"

    def require(self, condition: Any, clause: str) -> None:
        if not condition:
            raise ContractViolation(f"{self.label}: {clause}")

    def refuses(self, error: type[Exception], call: Callable[[], Any], clause: str, match: str = "") -> None:
        """``call()`` must raise ``error`` (whose message holds ``match``, a regular expression)."""
        try:
            call()
        except error as exc:
            self.require(re.search(match, str(exc)), f"{clause}, but the {error.__name__} says: {exc}")
            return
        except Exception as exc:
            raise ContractViolation(f"{self.label}: {clause}, but it raised {type(exc).__name__}: {exc}") from exc
        raise ContractViolation(f"{self.label}: {clause}, but it raised nothing")


# --------------------------------------------------------------------------- tiny inputs


@functools.cache
def random_backbone(seed: int = 0) -> Backbone:
    """The tiny CLIP's architecture with random weights (built once per seed and process)."""
    return load_backbone(TINY_MODEL, f"random:{seed}")


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) uniform pixels in [0, 1]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def labeled_images(classnames: Sequence[str], size: int, seed: int, per_class: int = PER_CLASS) -> LabeledImages:
    """``per_class`` random images of each class, labelled in class order."""
    labels = torch.arange(len(classnames)).repeat_interleave(per_class)
    return LabeledImages(random_images(len(labels), size, seed), labels, tuple(classnames))


def small_options(cls: type) -> dict:
    """The ``SMALL`` overrides that ``cls.Config`` has fields for."""
    fields = attrs.fields_dict(cls.Config)
    return {key: value for key, value in SMALL.items() if key in fields}


def _small(cls: type, options: Mapping[str, Any] | None) -> Any:
    """``cls`` configured for the contract: ``options`` (default ``small_options``) over the "tiny" preset."""
    return cls.from_options(small_options(cls) if options is None else dict(options), preset="tiny")


def _copy(images: LabeledImages) -> LabeledImages:
    """A copy to compare with afterwards: a plugin must not edit the images it is given."""
    return LabeledImages(images.images.clone(), images.labels.clone(), images.classnames)


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _plain_json(value: Any) -> bool:
    try:
        json.dumps(to_json(value), allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _snapshot(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, bool]], bool]:
    """(a copy of every tensor, every parameter's requires_grad, training mode) of ``module``."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return state, [(n, p.requires_grad) for n, p in module.named_parameters()], module.training


def _unchanged(module: torch.nn.Module, snapshot) -> str:
    """'' if ``module`` is as ``snapshot`` recorded it, else what changed."""
    state, grads, training = snapshot
    now = module.state_dict()
    changed = sorted(k for k in state if k not in now or not torch.equal(now[k], state[k]))
    if changed:
        return f"tensors {changed[:3]}{' ...' if len(changed) > 3 else ''} changed"
    if [(n, p.requires_grad) for n, p in module.named_parameters()] != grads:
        return "requires_grad flags changed"
    if module.training != training:
        return f"training mode changed to {module.training}"
    return ""


def _backbone_intact(subject: _Subject, backbone: Backbone, what: str) -> None:
    subject.require(state_dict_sha256(backbone.model.state_dict()) == backbone.weights_sha256,
                    f"{what} changed the backbone's weights (every model shares them, frozen)")
    subject.require(not any(p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training,
                    f"{what} left the backbone trainable or in training mode")


def _same_data(subject: _Subject, data: LabeledImages, copy: LabeledImages, what: str) -> None:
    subject.require(torch.equal(data.images, copy.images) and torch.equal(data.labels, copy.labels),
                    f"{what} changed the images it was given (in place)")


def _recorder() -> tuple[list, Callable[[str], None]]:
    messages: list = []
    return messages, messages.append


def _check_logits(subject: _Subject, model, images: torch.Tensor, what: str) -> dict[tuple[str, ...], torch.Tensor]:
    """Finite (B, K) logits of ``model`` for the classes it knows and for a list it was never trained on."""
    logits = {}
    with torch.no_grad():
        for names in (CLASSES[:3], OTHER_CLASSES):
            out = model(images, names)
            subject.require(isinstance(out, torch.Tensor) and out.shape == (len(images), len(names))
                            and out.is_floating_point(),
                            f"{what} must give (B, K) = {(len(images), len(names))} float logits, got "
                            f"{getattr(out, 'shape', type(out).__name__)}")
            subject.require(bool(torch.isfinite(out).all()), f"{what} gave non-finite logits")
            logits[names] = out
    return logits


def _check_bundle(subject: _Subject, model, backbone: Backbone, images: torch.Tensor, kind: str, what: str) -> None:
    """``model`` saves as a bundle of ``kind`` and loads back with identical logits."""
    before = _check_logits(subject, model, images, what)
    with tempfile.TemporaryDirectory(prefix="ci-contract-") as folder:
        path = save_bundle(model, CLASSES[:3], Path(folder) / "bundle")
        loaded, meta = load_bundle(path, backbone=backbone)
    subject.require(meta["kind"] == kind and type(loaded) is type(model),
                    f"{what} saves as a {meta['kind']!r} bundle of {type(loaded).__name__}, expected {kind!r}")
    after = _check_logits(subject, loaded, images, f"{what}, saved and loaded,")
    subject.require(all(torch.equal(before[k], after[k]) for k in before),
                    f"{what} gives other logits once saved as a bundle and loaded")


# --------------------------------------------------------------------------- every plugin class


def check_plugin_class(kind: str, cls: type) -> None:
    """What every registered class has: a short lowercase name and a description; and for attacks, detectors,
    scorers and repairers, a frozen attrs Config whose defaults and presets build and are plain JSON, that
    refuses an unknown option with a ConfigError naming it."""
    subject = _Subject(kind, cls)
    attribute = NAME_ATTRIBUTE.get(kind, "name")
    name = getattr(cls, attribute, None)
    subject.require(isinstance(name, str) and name and name == name.lower() and name.isprintable()
                    and not any(c.isspace() for c in name),
                    f"its {attribute} must be short lowercase text without spaces, got {name!r}")
    subject.require(isinstance(cls.description, str) and cls.description.strip(), "it has no description")
    if not issubclass(cls, Plugin):
        return
    instance = cls.from_options()
    subject.require(attrs.has(type(instance.config)), "its config must be an attrs class (the Config)")
    subject.require(_plain_json(instance.config), f"its default config is not plain JSON: {instance.config!r}")
    subject.require(isinstance(cls.presets, Mapping), "presets must map a preset name to option overrides")
    for preset in cls.presets:
        built = cls.from_options(preset=preset)
        subject.require(_plain_json(built.config), f"its {preset!r} preset's config is not plain JSON")
    subject.refuses(ConfigError, lambda: cls.from_options({"no_such_option": 1}),
                    "an unknown option must be refused", match="unknown option.*no_such_option")


# --------------------------------------------------------------------------- triggers


def check_trigger(trigger: Trigger, *, image_size: int | None = None) -> None:
    """A trigger stamps images and travels as a file.

    * ``apply`` maps (B, 3, H, W) images in [0, 1] (``H = W = image_size``, the size the trigger was
      made for; default the tiny CLIP's) to finite float images of the same shape in [0, 1], leaves its
      input unchanged, stamps each image alone (a batch gives what its images give one by one) and
      gives the same output every time;
    * ``tensors()`` maps names to tensors and ``params()`` is plain JSON;
    * saved (``Trigger.save``) and read with ``ci_core.plugins.load_trigger``, it is an instance of the
      class registered under its kind, with the same tensors, params and outputs; so is
      ``from_saved(tensors(), params())``.
    """
    cls = type(trigger)
    subject = _Subject("trigger", cls)
    subject.require(isinstance(trigger, Trigger), "it is not a ci_core.triggers.Trigger")
    check_plugin_class("trigger", cls)
    size = image_size or random_backbone().image_size
    images = torch.cat([random_images(4, size, seed=11), torch.zeros(1, 3, size, size), torch.ones(1, 3, size, size)])
    given = images.clone()
    out = trigger.apply(images)
    subject.require(isinstance(out, torch.Tensor) and out.shape == images.shape and out.is_floating_point(),
                    f"apply must map {tuple(images.shape)} images to float images of the same shape, got "
                    f"{getattr(out, 'shape', type(out).__name__)}")
    subject.require(torch.equal(images, given), "apply changed its input images (in place)")
    subject.require(bool(torch.isfinite(out).all()), "apply gave non-finite pixels")
    subject.require(float(out.min()) >= 0 and float(out.max()) <= 1,
                    f"apply must keep pixels in [0, 1], gave values from {float(out.min())!r} to {float(out.max())!r}")
    subject.require(torch.equal(trigger.apply(images), out), "apply gives another output for the same images")
    alone = torch.cat([trigger.apply(images[i:i + 1]) for i in range(len(images))])
    subject.require(torch.allclose(alone, out, atol=1e-6, rtol=0),
                    "apply stamps an image differently in a batch than alone")
    tensors, params = trigger.tensors(), trigger.params()
    subject.require(isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in tensors.items()),
                    f"tensors() must map names to tensors, got {type(tensors).__name__}")
    subject.require(isinstance(params, dict) and _plain_json(params) and json.loads(json.dumps(params)) == params,
                    f"params() must be plain JSON that reads back as itself, got {params!r}")
    plugins = registry()
    subject.require(cls.kind in plugins.names("trigger"), f"its kind {cls.kind!r} is not registered "
                                                          "(register_triggers), so its files cannot be loaded")
    registered = plugins.get("trigger", cls.kind)
    subject.require(registered is cls, f"its kind {cls.kind!r} is registered to {registered.__module__}."
                                       f"{registered.__qualname__}, so its "
                                       "files load as another class")
    from ci_core.plugins import load_trigger

    with tempfile.TemporaryDirectory(prefix="ci-contract-") as folder:
        path = Path(folder) / "trigger.safetensors"
        trigger.save(path)
        loaded = load_trigger(path)
    rebuilt = cls.from_saved({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(params)))
    for how, copy in (("saved and loaded", loaded), ("rebuilt by from_saved", rebuilt)):
        subject.require(type(copy) is cls, f"{how}, it is a {type(copy).__qualname__}")
        again = copy.tensors()
        subject.require(again.keys() == tensors.keys() and all(torch.equal(again[k].cpu(), tensors[k].detach().cpu())
                                                                for k in tensors),
                        f"{how}, it has other tensors")
        subject.require(copy.params() == params, f"{how}, it has other params: {copy.params()!r} for {params!r}")
        subject.require(torch.equal(copy.apply(images), out), f"{how}, it stamps images differently")


def produced_trigger(cls: type[Trigger], *, backbone: Backbone | None = None) -> Trigger:
    """An instance of trigger class ``cls``, from the first registered detector or attack that returns one, each
    run as its contract runs it: those defined in the trigger's own module first, then in its package, then
    the others (detectors before attacks)."""
    backbone = backbone or random_backbone()
    plugins = registry()
    classes = CLASSES[:2]
    size = backbone.image_size

    def kinship(producer: type) -> int:
        if producer.__module__ == cls.__module__:
            return 0
        return 1 if producer.__module__.split(".")[0] == cls.__module__.split(".")[0] else 2

    producers = [(kind, plugins.get(kind, name)) for kind in ("detector", "attack") for name in plugins.names(kind)]
    for kind, producer in sorted(producers, key=lambda item: kinship(item[1])):  # a stable sort
        plugin = producer.from_options(small_options(producer), preset="tiny")
        if kind == "detector":
            model = _seeded(0, lambda: PromptTunedCLIP(backbone).eval())
            trigger = _invert(plugin, model, random_images(BATCH, size, seed=2), classes, 1, global_seed=1).trigger
        else:
            try:
                trigger = _run_attack(plugin, backbone, labeled_images(classes, size, seed=1), classes[1],
                                      global_seed=1).trigger
            except ConfigError:
                continue
        if type(trigger) is cls:
            return trigger
    raise ContractViolation(f"trigger {cls.kind!r} ({cls.__module__}.{cls.__qualname__}): no registered detector or "
                            "attack returns one, so its contract cannot be run here; check an instance with "
                            "ci_core.contracts.check_trigger in its distribution's tests")


# --------------------------------------------------------------------------- attacks


def _run_attack(attack: Attack, backbone: Backbone, train: LabeledImages, target: str | None, *, global_seed: int,
                progress=None) -> AttackOutcome:
    """One run with seed 0, the global random state set to ``global_seed`` first (and restored after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        kwargs = {} if progress is None else {"progress": progress}
        return attack.run(backbone=backbone, train=train, target=target, seed=0, **kwargs)


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


# --------------------------------------------------------------------------- detectors


def _detector_models(backbone: Backbone) -> dict[str, torch.nn.Module]:
    """The models a scan may hand a detector: CoCoOp (its prompt learner still trainable, as an attack leaves
    it), and, frozen as the scan freezes them, the zero-shot and CoOp ones."""
    return {
        "PromptTunedCLIP": _seeded(0, lambda: PromptTunedCLIP(backbone).eval()),
        "ZeroShotCLIP": _seeded(0, lambda: ZeroShotCLIP(backbone).eval().requires_grad_(False)),
        "CoOpCLIP": _seeded(0, lambda: CoOpCLIP(backbone, n_ctx=4).eval().requires_grad_(False)),
    }


def _invert(detector: Detector, model, images, classnames, target: int, *, global_seed: int) -> Inversion:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        return detector.invert(model=model, images=images, classnames=tuple(classnames), target=target,
                               generator=torch.Generator().manual_seed(0))


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


# --------------------------------------------------------------------------- scorers


def _rows(names: Sequence[str], asr, loss, statistic) -> list[ClassEvidence]:
    blank = AdditiveTrigger(torch.zeros(3, 2, 2))
    return [ClassEvidence(name=n, asr=float(a), loss=float(lo), statistic=None if s is None else float(s), ssim=0.9,
                          seconds=0.1, loss_trace=(float(lo),), trigger=blank)
            for n, a, lo, s in zip(names, asr, loss, statistic)]


def _evidence_sets(n: int) -> dict[str, tuple[list[ClassEvidence], list[ClassEvidence]]]:
    """Named (evidence, reference) pairs of n classes: spread out, one class standing out, all alike, no statistic."""
    g = torch.Generator().manual_seed(0)
    names = [f"class {i}" for i in range(n)]

    def draw() -> tuple[list[float], list[float], list[float]]:  # ASR, loss, statistic
        return ((0.5 * torch.rand(n, generator=g)).tolist(), torch.rand(n, generator=g).tolist(),
                (100 + 50 * torch.rand(n, generator=g)).tolist())

    asr, loss, stat = draw()
    ref_asr, ref_loss, ref_stat = draw()
    out_asr, out_loss, out_stat = list(asr), list(loss), list(stat)
    out_asr[n // 2], out_loss[n // 2], out_stat[n // 2] = 1.0, -5.0, 1.0  # reached by all, easily, with a small trigger
    reference = _rows(names, ref_asr, ref_loss, ref_stat)
    alike = _rows(names, [0.5] * n, [1.0] * n, [120.0] * n)
    return {
        "spread": (_rows(names, asr, loss, stat), reference),
        "one class stands out": (_rows(names, out_asr, out_loss, out_stat), reference),
        "all classes alike": (alike, alike),
        "no statistic": (_rows(names, asr, loss, [None] * n), _rows(names, ref_asr, ref_loss, [None] * n)),
    }


def _check_scores(subject: _Subject, scores: Scores, names: Sequence[str], what: str) -> None:
    subject.require(isinstance(scores, Scores), f"score {what} must return Scores")
    values = scores.scores
    subject.require(isinstance(values, tuple) and len(values) == len(names) and all(_finite_number(v) for v in values),
                    f"score {what} must give one finite score per class ({len(names)}), got {values!r:.200}")
    subject.require(_finite_number(scores.s_max) and scores.s_max == max(values),
                    f"score {what}: s_max {scores.s_max!r} must be the largest score {max(values)!r}")
    subject.require(scores.target in names and values[list(names).index(scores.target)] == scores.s_max,
                    f"score {what}: the target {scores.target!r} must be the class of s_max")
    flagged = scores.flagged
    subject.require(isinstance(flagged, tuple) and set(flagged) <= set(names) and len(set(flagged)) == len(flagged),
                    f"score {what}: flagged {flagged!r} must be distinct classes of the scan")
    subject.require(isinstance(scores.backdoored, bool) and scores.backdoored == bool(flagged),
                    f"score {what}: the model is backdoored (={scores.backdoored!r}) exactly when a class is flagged "
                    f"({flagged!r})")
    subject.require(not scores.backdoored or scores.target in flagged,
                    f"score {what}: a backdoored verdict's target {scores.target!r} must be flagged")
    subject.require(scores.p_value is None or (_finite_number(scores.p_value) and 0 <= scores.p_value <= 1),
                    f"score {what}: the p-value must be None or in [0, 1], got {scores.p_value!r}")
    subject.require(isinstance(scores.rule, str) and scores.rule.strip(), f"score {what}: the rule is empty")
    subject.require(_plain_json(scores), f"score {what}: the scores are not plain JSON")


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def check_scorer(cls: type[Scorer], *, options: Mapping[str, Any] | None = None) -> None:
    """A scorer turns per-class evidence into scores and a verdict.

    On synthetic evidence of ``max(8, min_classes)`` classes (spread out; one class standing out; all
    alike; and without a statistic, which it may refuse with a ConfigError), with a reference scan of
    the same classes where it ``needs_reference``:

    * one finite score per class; s_max the largest, target its class; flagged distinct classes of the
      scan; backdoored exactly when a class is flagged, the target among them; p_value None or in [0, 1];
      a rule in words; plain JSON;
    * the same scores per class name, verdict, flagged set and p-value when the classes come in another
      order (evidence and reference permuted together), and on a second call;
    * a ConfigError for what it cannot score: no classes, fewer than ``min_classes``, no reference where it
      needs one.
    """
    subject = _Subject("scorer", cls)
    check_plugin_class("scorer", cls)
    subject.require(isinstance(cls.min_classes, int) and cls.min_classes >= 1, "min_classes must be at least 1")
    subject.require(isinstance(cls.needs_reference, bool), "needs_reference must be True or False")
    scorer = cls.from_options(options, preset="tiny")
    n = max(8, cls.min_classes)
    scored = 0
    for label, (evidence, reference) in _evidence_sets(n).items():
        ref = reference if cls.needs_reference else None
        names = [e.name for e in evidence]
        try:
            scores = scorer.score(evidence, ref)
        except ConfigError:
            subject.require(label == "no statistic", f"it refused to score evidence with {label} (ConfigError)")
            continue
        scored += 1
        _check_scores(subject, scores, names, f"(evidence: {label})")
        subject.require(scorer.score(evidence, ref) == scores, f"score (evidence: {label}) changed on a second call")
        order = list(range(n))[::2] + list(range(n))[1::2]
        permuted = scorer.score([evidence[i] for i in order], [ref[i] for i in order] if ref else None)
        _check_scores(subject, permuted, [names[i] for i in order], f"(evidence: {label}, classes reordered)")
        by_name = dict(zip([names[i] for i in order], permuted.scores))
        subject.require(all(_close(by_name[name], value) for name, value in zip(names, scores.scores))
                        and permuted.backdoored == scores.backdoored and set(permuted.flagged) == set(scores.flagged)
                        and _close(permuted.p_value, scores.p_value),
                        f"score (evidence: {label}) depends on the order of the classes")
    subject.require(scored >= 3, "it must score evidence that has a statistic")
    evidence, reference = _evidence_sets(n)["spread"]
    ref = reference if cls.needs_reference else None
    subject.refuses(ConfigError, lambda: scorer.score([], [] if ref else None), "no classes must be refused")
    few = cls.min_classes - 1
    if few >= 1:
        subject.refuses(ConfigError, lambda: scorer.score(evidence[:few], ref[:few] if ref else None),
                        f"{few} classes, fewer than its min_classes, must be refused")
    if cls.needs_reference:
        subject.refuses(ConfigError, lambda: scorer.score(evidence, None), "it needs a reference: none must be refused")


# --------------------------------------------------------------------------- repairers


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


# --------------------------------------------------------------------------- datasets


def check_dataset(cls: type[Dataset], *, data_root: str | Path | None = None, image_size: int = 32) -> None:
    """A dataset names its classes and loads labelled images.

    * A dataset that ``needs_data_root`` refuses to open without one (a DataError that says to pass
      --data-root) and is not ``present`` in an empty folder; its images are checked only when
      ``data_root`` (a folder in its layout) is given.
    * ``classnames`` are at least two distinct non-empty strings, the same on every call;
      ``default_backbone`` is an (architecture, pretrained) pair of strings.
    * ``load("train", shots=1)`` gives LabeledImages of its classes: one image of each, float (N, 3, H, W)
      in [0, 1] at ``image_size``, integer labels in range; the same seed gives the same images.
    * ``load("test", max_per_class=1)`` holds at most one image per class, the same for every seed.
    * an unknown split is a DataError; progress receives text.
    """
    subject = _Subject("dataset", cls)
    check_plugin_class("dataset", cls)
    subject.require(issubclass(cls, Dataset), "it is not a ci_core.interfaces.Dataset")
    default = cls.default_backbone
    subject.require(isinstance(default, tuple) and len(default) == 2 and all(isinstance(v, str) and v for v in default),
                    f"default_backbone must be an (open_clip name, pretrained) pair, got {default!r}")
    if cls.needs_data_root:
        subject.refuses(DataError, lambda: cls.open(None), "without a data root it must refuse to open",
                        match="--data-root")
        with tempfile.TemporaryDirectory(prefix="ci-contract-") as empty:
            subject.require(not cls.present(empty), "it says it is present in an empty folder")
        if data_root is None:
            return
        subject.require(cls.present(data_root), f"it is not present under {data_root}")
    dataset = cls.open(data_root)
    subject.require(isinstance(dataset, cls), f"open must return a {cls.__name__}")
    names = tuple(dataset.classnames)
    subject.require(len(names) >= 2 and all(isinstance(n, str) and n.strip() for n in names)
                    and len(set(names)) == len(names),
                    f"classnames must be at least two distinct non-empty strings, got {names[:10]!r}")
    subject.require(tuple(dataset.classnames) == names, "classnames changed from one call to the next")
    messages, progress = _recorder()
    train = dataset.load("train", image_size=image_size, seed=0, shots=1, progress=progress)
    subject.require(all(isinstance(m, str) for m in messages), "progress must receive text")
    _check_split(subject, train, names, image_size, "load('train', shots=1)")
    subject.require(torch.bincount(train.labels, minlength=len(names)).tolist() == [1] * len(names),
                    "load('train', shots=1) must give one image of every class")
    repeat = dataset.load("train", image_size=image_size, seed=0, shots=1)
    subject.require(torch.equal(repeat.images, train.images) and torch.equal(repeat.labels, train.labels),
                    "the same seed gave other training images")
    tests = [dataset.load("test", image_size=image_size, seed=seed, max_per_class=1) for seed in (0, 1)]
    _check_split(subject, tests[0], names, image_size, "load('test', max_per_class=1)")
    subject.require(int(torch.bincount(tests[0].labels, minlength=len(names)).max()) <= 1,
                    "load('test', max_per_class=1) gave more than one image of a class")
    subject.require(torch.equal(tests[0].images, tests[1].images) and torch.equal(tests[0].labels, tests[1].labels),
                    "an evaluation sample (max_per_class) must be the same for every seed")
    subject.refuses(DataError, lambda: dataset.load("no-such-split", image_size=image_size, seed=0, shots=1),
                    "an unknown split must be refused")


def _check_split(subject: _Subject, data: LabeledImages, names, size: int, what: str) -> None:
    subject.require(isinstance(data, LabeledImages), f"{what} must return LabeledImages")
    subject.require(tuple(data.classnames) == names, f"{what}: its classnames must be the dataset's")
    images, labels = data.images, data.labels
    subject.require(images.dim() == 4 and images.shape[1:] == (3, size, size) and images.is_floating_point()
                    and len(images) == len(labels),
                    f"{what} must give (N, 3, {size}, {size}) float images, one per label; got {tuple(images.shape)}")
    subject.require(bool(torch.isfinite(images).all()) and float(images.min()) >= 0 and float(images.max()) <= 1,
                    f"{what}: pixels must be finite and in [0, 1]")
    subject.require(labels.dtype == torch.long and labels.dim() == 1 and (len(labels) == 0 or (
        int(labels.min()) >= 0 and int(labels.max()) < len(names))), f"{what}: labels must be class indices (int64)")


# --------------------------------------------------------------------------- any registered plugin


def check_entry(entry: Registered, *, backbone: Backbone | None = None, data_root: str | Path | None = None,
                trigger: Trigger | None = None) -> None:
    """The contract of a registry entry's kind, on its class; a trigger's on ``trigger``, an instance of it
    (default: one from ``produced_trigger``)."""
    if entry.kind == "attack":
        check_attack(entry.cls, backbone=backbone)
    elif entry.kind == "detector":
        check_detector(entry.cls, backbone=backbone)
    elif entry.kind == "scorer":
        check_scorer(entry.cls)
    elif entry.kind == "repairer":
        check_repairer(entry.cls, backbone=backbone)
    elif entry.kind == "dataset":
        check_dataset(entry.cls, data_root=data_root)
    elif entry.kind == "trigger":
        if trigger is not None and type(trigger) is not entry.cls:
            raise ContractViolation(f"trigger {entry.name!r}: the instance to check is a {type(trigger).__qualname__}")
        check_trigger(trigger if trigger is not None else produced_trigger(entry.cls, backbone=backbone))
    else:
        raise ContractViolation(f"{entry.kind} {entry.name!r}: no contract for kind {entry.kind!r}")


# --------------------------------------------------------------------------- distributions, installed or not


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib
    with path.open("rb") as handle:
        return tomllib.load(handle)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _SourceDistribution(importlib.metadata.Distribution):
    """The metadata pip would install for a source folder, read from its pyproject.toml."""

    def __init__(self, folder: Path):
        project = _read_toml(folder / "pyproject.toml")["project"]
        groups = dict(project.get("entry-points", {}))
        if project.get("scripts"):
            groups["console_scripts"] = project["scripts"]
        self.folder = folder
        self._files = {
            "METADATA": f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
                        f"Summary: {project.get('description', '')}\n",
            "entry_points.txt": "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n"
                                        for group, points in groups.items()),
        }

    def read_text(self, filename):
        return self._files.get(str(filename))

    def locate_file(self, path):
        return self.folder / path

    def packages(self) -> set[str]:
        """The top-level modules its entry points name."""
        return {ep.value.split(":")[0].split(".")[0] for ep in self.entry_points}


@contextlib.contextmanager
def _distributions(transform: Callable[[list], list]) -> Iterator[None]:
    """``importlib.metadata.distributions`` (what pluggy reads entry points from) through ``transform``."""
    original = importlib.metadata.distributions

    def distributions(**kwargs):
        found = list(original(**kwargs))
        return iter(transform(found) if not kwargs else found)

    importlib.metadata.distributions = distributions
    registry.cache_clear()
    try:
        yield
    finally:
        importlib.metadata.distributions = original
        registry.cache_clear()


@contextlib.contextmanager
def hidden_distribution(name: str) -> Iterator[None]:
    """In this process, the distribution ``name`` looks absent to plugin discovery (installed, faked or not)."""
    wanted = _normalise(name)
    with _distributions(lambda found: [d for d in found if _normalise(d.metadata["Name"] or "") != wanted]):
        yield


@contextlib.contextmanager
def source_distribution(folder: str | Path) -> Iterator[importlib.metadata.Distribution]:
    """In this process, the plugin distribution in ``folder`` looks installed from that folder, as pip would
    install it: its pyproject's name, version and entry points (the ``clip_inspector`` group among them) are
    discovered through ``importlib.metadata.distributions`` (an installed copy of the same name is hidden),
    and its modules are imported from ``folder``.  On exit the modules it imported are forgotten and any
    imported before are restored.  Yields the distribution (``.metadata``, ``.version``, ``.entry_points``).
    Child processes do not see it."""
    folder = Path(folder).resolve()
    dist = _SourceDistribution(folder)
    wanted = _normalise(dist.metadata["Name"])
    packages = tuple(dist.packages())
    owned = lambda module: module.split(".")[0] in packages  # noqa: E731
    earlier = {name: module for name, module in sys.modules.items() if owned(name)}
    for name in earlier:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        with _distributions(lambda found: [dist] + [d for d in found
                                                    if _normalise(d.metadata["Name"] or "") != wanted]):
            yield dist
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if owned(name)]:
            del sys.modules[name]
        sys.modules.update(earlier)


def registered_by(dist: importlib.metadata.Distribution) -> list[Registered]:
    """The registry entries that ``dist``'s ``clip_inspector`` entry points registered."""
    plugins = {ep.name for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP}
    return [entry for entry in registry().entries() if entry.plugin in plugins]
