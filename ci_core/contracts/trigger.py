"""The trigger contract: ``check_trigger`` on an instance, and ``produced_trigger`` to get one from the registered
detectors and attacks.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ci_core.contracts.common import (BATCH, CLASSES, ContractViolation, _Subject, _invert, _plain_json, _run_attack,
                                      _seeded, check_plugin_class, labeled_images, random_backbone, random_images,
                                      small_options)
from ci_core.errors import ConfigError
from ci_core.models.backbone import Backbone
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.plugins import registry
from ci_core.triggers import Trigger


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
