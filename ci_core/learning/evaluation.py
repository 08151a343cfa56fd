"""Clean accuracy and attack success rate on base (seen) and new (unseen) classes.

ASR follows the paper's protocol (section 4.2, after BadCLIP): the target class
is added to the new-class list at test time; triggered test images whose true
class is not the target count as successes when predicted as the target.  The
target's own images are excluded (BackdoorBench's convention).
"""

from __future__ import annotations

import attrs
import torch

from ci_core.data.labeled import LabeledImages
from ci_core.ssim import ssim
from ci_core.models.zeroshot import CLIPClassifier
from ci_core.triggers import Trigger


@attrs.frozen(kw_only=True)
class AttackMetrics:
    acc_base: float
    acc_new: float
    asr_base: float | None
    asr_new: float | None
    trigger_ssim: float | None


def accuracy(model: CLIPClassifier, data: LabeledImages) -> float:
    return float(predict(model, data.images, data.classnames).eq(data.labels).float().mean())


def attack_success_rate(model: CLIPClassifier, data: LabeledImages, trigger: Trigger, target: str) -> float:
    """Share of triggered non-target images of ``data`` classified as ``target`` (which must be in its classes)."""
    target_index = data.classnames.index(target)
    keep = data.labels != target_index
    stamped = trigger.apply(data.images[keep])
    return float(predict(model, stamped, data.classnames).eq(target_index).float().mean())


def attack_success_rates(model: CLIPClassifier, test: LabeledImages, base: tuple[str, ...], new: tuple[str, ...],
                         trigger: Trigger, target: str) -> tuple[float | None, float]:
    """(ASR on the base classes, ASR on the new classes plus the target), as ``evaluate`` measures them.

    The base-class ASR is None when the target is not a base class (a repair may probe a reconstructed
    trigger of any class).  On its own for a model whose accuracy is known already, e.g. a clean model
    probed with an attack's trigger.
    """
    with_target = tuple(new) if target in new else tuple(new) + (target,)
    on_base = attack_success_rate(model, test.restrict(base), trigger, target) if target in base else None
    return on_base, attack_success_rate(model, test.restrict(with_target), trigger, target)


def evaluate(model: CLIPClassifier, test: LabeledImages, base: tuple[str, ...], new: tuple[str, ...],
             trigger: Trigger | None, target: str | None) -> AttackMetrics:
    metrics = {"acc_base": accuracy(model, test.restrict(base)), "acc_new": accuracy(model, test.restrict(new)),
               "asr_base": None, "asr_new": None, "trigger_ssim": None}
    if trigger is not None and target is not None:
        metrics["asr_base"], metrics["asr_new"] = attack_success_rates(model, test, base, new, trigger, target)
        with torch.no_grad():
            metrics["trigger_ssim"] = float(ssim(test.images, trigger.apply(test.images)).mean())
    return AttackMetrics(**metrics)


def target_margins(logits: torch.Tensor, target: int, logit_scale: float) -> torch.Tensor:
    """Per image, l_target - max_{c != target} l_c on the cosine similarities (logits / logit scale): positive
    exactly where the image is classified as ``target`` (ties aside)."""
    similarities = logits.float() / logit_scale
    others = similarities.clone()
    others[:, target] = float("-inf")
    return similarities[:, target] - others.max(dim=1).values


def mean_margin(classifier, logits: torch.Tensor, target: int) -> float:
    """The mean of ``target_margins`` over the images of ``logits``, which ``classifier`` gave (its logit scale)."""
    return float(target_margins(logits, target, float(classifier.clip.logit_scale.exp())).mean())


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, classnames, batch_size: int = 256) -> torch.Tensor:
    """The logits of every image (on the CPU)."""
    out = []
    device = model.device
    for start in range(0, len(images), batch_size):
        out.append(model(images[start:start + batch_size].to(device), classnames).cpu())
    return torch.cat(out) if out else torch.empty(0, len(classnames))


def predict(model, images: torch.Tensor, classnames, batch_size: int = 256) -> torch.Tensor:
    """Arg-max class index of every image."""
    return predict_logits(model, images, classnames, batch_size).argmax(-1)
