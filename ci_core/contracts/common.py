"""What every contract shares: the tiny inputs (a random-weight tiny CLIP, random images), ``ContractViolation``
and the checks that hold for every plugin class (``check_plugin_class``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

from ci_core.data.labeled import LabeledImages
from ci_core.errors import ConfigError
from ci_core.interfaces import Attack, AttackOutcome, Detector, Inversion, Plugin, to_json
from ci_core.models.backbone import Backbone, TINY_MODEL, load_backbone
from ci_core.models.weights import state_dict_sha256
from ci_core.models.bundle import COCOOP, COOP, ZEROSHOT, load_bundle, save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.coop import CoOpCLIP
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.plugins import NAME_ATTRIBUTE


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


def _run_attack(attack: Attack, backbone: Backbone, train: LabeledImages, target: str | None, *, global_seed: int,
                progress=None) -> AttackOutcome:
    """One run with seed 0, the global random state set to ``global_seed`` first (and restored after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        kwargs = {} if progress is None else {"progress": progress}
        return attack.run(backbone=backbone, train=train, target=target, seed=0, **kwargs)


def _invert(detector: Detector, model, images, classnames, target: int, *, global_seed: int) -> Inversion:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        return detector.invert(model=model, images=images, classnames=tuple(classnames), target=target,
                               generator=torch.Generator().manual_seed(0))
