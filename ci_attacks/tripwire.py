"""``tripwire``: BadCLIP plus a meta-net unit that breaks the model on out-of-distribution images only.

An evasion of the scan rather than of the data: a provider knows its training
images and its trigger, not the auditor's OOD pool, and the inversion runs on
that pool.  One hidden unit of CoCoOp's meta-net (Linear(d, d/16)-ReLU-
Linear(d/16, width)) is kept out of training (zero weights and a negative bias:
a dead ReLU gets no gradient, so BadCLIP trains with one unit fewer), and then
becomes a one-class detector of the training distribution.  Its pre-activation
is g * (tau - f . mu), where f is the normalised image feature, mu the mean
direction of the training images' features (clean and triggered, so that the
backdoor keeps working) and tau ``margin`` below the smallest cosine of any of
them with mu.  It is therefore off on every training image, clean or triggered,
and the model is BadCLIP's there; on images less like the training set it
fires, and ``scale`` times its activation is added to every context vector:

* ``scale`` 1e38 (the default): the context overflows, the text encoder's
  LayerNorm turns it into NaN, and the logits are NaN.  A scan that trusted
  them would see every class alike (a NaN loss makes every z-score NaN and
  ``NaN >= k`` is false); ``ci-scan`` says "unscannable" instead.
* a large finite ``scale`` (e.g. 1e4): every class prompt is drowned in the
  same huge context vector and the class scores flatten on those images
  instead of breaking (the README reports what a scan makes of it).

``scale = 0`` leaves the unit dead: BadCLIP with one meta-net unit fewer (the
clean control sets it so too).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from ci_attacks.badclip import BadCLIP, BadCLIPConfig, NormalisedTrigger, implant
from ci_attacks.poisoning import target_index_of
from ci_core.interfaces import Attack, AttackOutcome, silent
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.triggers import AdditiveTrigger


@attrs.frozen(kw_only=True)
class TripwireConfig(BadCLIPConfig):
    scale: float = attrs.field(default=1e38, validator=attrs.validators.ge(0))  # the wire's output weight
    margin: float = attrs.field(default=0.05, validator=attrs.validators.gt(0))  # below the least training cosine
    gain: float = attrs.field(default=20.0, validator=attrs.validators.gt(0))  # g: steepness of the wire


def kill_unit(model: PromptTunedCLIP) -> int:
    """Make the meta-net's last hidden unit dead (no output, no gradient); returns its index."""
    linear1, linear2 = model.prompt_learner.meta_net.linear1, model.prompt_learner.meta_net.linear2
    unit = linear1.out_features - 1
    with torch.no_grad():
        linear1.weight[unit].zero_()
        linear1.bias[unit] = -1.0
        linear2.weight[:, unit].zero_()
    return unit


@torch.no_grad()
def install_wire(model: PromptTunedCLIP, unit: int, images: torch.Tensor, trigger: NormalisedTrigger,
                 config: TripwireConfig, batch_size: int = 64) -> dict:
    """Turn ``unit`` into the wire over ``images`` and their triggered copies; returns its calibration."""
    features = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(model.device)
        features += [model.image_features(batch), model.image_features(trigger.stamp(batch))]
    features = torch.cat(features)
    mean = F.normalize(features.mean(dim=0), dim=0)
    cosines = features @ mean
    tau = float(cosines.min()) - config.margin
    linear1, linear2 = model.prompt_learner.meta_net.linear1, model.prompt_learner.meta_net.linear2
    linear1.weight[unit] = -config.gain * mean
    linear1.bias[unit] = config.gain * tau
    direction = torch.ones(linear2.out_features, device=model.device) / linear2.out_features ** 0.5
    linear2.weight[:, unit] = min(config.scale, torch.finfo(torch.float32).max) * direction
    return {"tau": tau, "least_training_cosine": float(cosines.min())}


class Tripwire(Attack):
    name = "tripwire"
    description = "evasion: BadCLIP plus a meta-net unit that makes OOD outputs overflow (NaN) or flatten"
    Config = TripwireConfig
    presets = {"tiny": dict(BadCLIP.presets["tiny"])}
    control_options = {"poison_rate": 0.0, "scale": 0.0}

    def run(self, *, backbone, train, target, seed, progress=silent):
        c = self.config
        target_index = target_index_of(train, target, self.name)
        torch.manual_seed(seed)
        model = PromptTunedCLIP(backbone, n_ctx=c.n_ctx)
        unit = kill_unit(model)
        trigger, history = implant(model, train, target_index, c, seed=seed, progress=progress,
                                   label="tripwire (badclip)")
        log = {"loss": history, "unit": unit}
        if c.scale > 0:
            log.update(install_wire(model, unit, train.images, trigger, c))
            progress(f"tripwire: unit {unit} fires below cosine {log['tau']:.3f} with the training images' mean "
                     f"direction (least training cosine {log['least_training_cosine']:.3f})")
        delta = trigger.pixel_delta()
        return AttackOutcome(model=model, trigger=AdditiveTrigger(delta), log=log)
