"""CLIP as a zero-shot classifier whose image encoder may have been fine-tuned (no prompt learner).

Logits are CLIP's zero-shot ones: the cosine of the image feature with the text
feature of "a photo of a {class}." times the logit scale.  The text encoder is
the backbone's, frozen and shared; the image encoder is the model's own copy,
so fine-tuning it (the encoder-level backdoor of the paper's section 14) leaves
the backbone, and every other model built on it, untouched.

The model offers what the scanner, the evaluation and the detectors use of a
``PromptTunedCLIP``: ``model(images, classnames)`` on pixel-space images,
``image_features``, ``clip`` (whose ``visual`` is the fine-tuned encoder and
whose ``logit_scale`` is the backbone's), ``backbone`` and ``device``.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ci_core.models.backbone import Backbone
from ci_core.models.cocoop import DEFAULT_TEMPLATE, PromptTunedCLIP


def clip_with_own_visual(backbone: Backbone) -> nn.Module:
    """A copy of the backbone's CLIP that owns a copy of the image encoder and shares every other tensor.

    Seeding ``deepcopy``'s memo with the non-visual tensors makes the copy refer to
    the very same (frozen) text-encoder tensors instead of duplicating them.
    """
    clip = backbone.model
    visual = set(id(t) for t in clip.visual.state_dict(keep_vars=True).values())
    shared = {id(t): t for t in clip.state_dict(keep_vars=True).values() if id(t) not in visual}
    return copy.deepcopy(clip, memo=shared)


class ZeroShotCLIP(nn.Module):
    """Zero-shot CLIP over a frozen text encoder and the model's own (possibly fine-tuned) image encoder."""

    def __init__(self, backbone: Backbone, template: str = DEFAULT_TEMPLATE, *, own_visual: bool = True):
        super().__init__()
        if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
            raise ValueError(f"template {template!r} must hold exactly one '{{}}' for the class name and no other braces")
        self.backbone = backbone
        self.template = template
        # own_visual=False classifies with the backbone itself (nothing copied): for a model that never trains,
        # such as the untuned backbone a reference scan runs on.
        self.clip = clip_with_own_visual(backbone) if own_visual else backbone.model
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    def train(self, mode: bool = True):
        super().train(mode)
        # Only the image encoder ever trains; the shared text encoder stays in eval mode.
        self.clip.eval()
        self.clip.visual.train(mode)
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The image encoder's tensors, keyed ``visual.<name>`` (what a zero-shot bundle stores)."""
        return {f"visual.{k}": v for k, v in self.clip.visual.state_dict().items()}

    def text_features(self, classnames: Sequence[str]) -> torch.Tensor:
        """(K, D) normalised text features of the class prompts, computed once per class list (the text encoder is frozen)."""
        key = (tuple(classnames), self.device)
        if key not in self._text_cache:
            # A literal substitution: str.format would interpret anything else in a (delivered) template.
            texts = [self.template.replace("{}", name.replace("_", " "), 1) for name in key[0]]
            with torch.no_grad():
                features = self.clip.encode_text(self.backbone.tokenizer(texts).to(self.device))
            self._text_cache[key] = F.normalize(features, dim=-1)
        return self._text_cache[key]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features of pixel-space images, from the model's own image encoder."""
        features = self.clip.encode_image((images - self.mean) / self.std)
        return F.normalize(features, dim=-1)

    def forward(self, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """(B, K) logits of pixel-space images over ``classnames``."""
        features = self.image_features(images)
        return self.clip.logit_scale.exp() * features @ self.text_features(classnames).t()


# What the scanner, the evaluation and the detectors accept: either kind of delivered model.
CLIPClassifier = PromptTunedCLIP | ZeroShotCLIP
