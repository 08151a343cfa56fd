"""CoCoOp over a frozen open_clip CLIP (Zhou et al. 2022), the model every attack and detector works on.

Prompts are ``[SOT] ctx_1..ctx_n + pi(x) [class name tokens] . [EOT]`` where
``pi = meta_net(normalised image feature)``; logits are the paper's Eq. 2.

Two exact shortcuts make it fast:
* the text encoder runs on prompts truncated just after the longest end-of-text
  position of the class set: under the causal mask later positions cannot
  influence the pooled feature, so the logits are unchanged;
* all (image, class) prompts go through the text encoder as one batch instead
  of a Python loop over images, in chunks of at most ``max_text_batch`` prompts.

Models take images in pixel space ([0, 1]) and normalise inside, so every
trigger and budget in this toolkit is in pixel units (4/255 means 4/255).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ci_core.models.backbone import Backbone

DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_CTX_INIT = "a photo of a"


@attrs.frozen(eq=False)
class ClassPrompts:
    """Token embeddings around the context slots for one ordered list of class names."""

    classnames: tuple[str, ...]
    prefix: torch.Tensor  # (K, 1, width): start-of-text
    suffix: torch.Tensor  # (K, S, width): class name, full stop, end-of-text (truncated)
    eot: torch.Tensor  # (K,) position of end-of-text in the full prompt


class PromptLearner(nn.Module):
    """Context vectors plus the meta-net Linear(d, d/16)-ReLU-Linear(d/16, width)."""

    def __init__(self, n_ctx: int, ctx_dim: int, vis_dim: int, ctx_init: torch.Tensor | None = None):
        super().__init__()
        if ctx_init is None:
            ctx_init = torch.randn(n_ctx, ctx_dim) * 0.02
        self.ctx = nn.Parameter(ctx_init.clone().float())
        hidden = max(1, vis_dim // 16)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, ctx_dim)),
        ]))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, n_ctx, width) image-conditioned context."""
        return self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)


class PromptTunedCLIP(nn.Module):
    """A frozen CLIP with a trainable CoCoOp prompt learner."""

    def __init__(self, backbone: Backbone, n_ctx: int = 4, ctx_init: str | None = DEFAULT_CTX_INIT,
                 max_text_batch: int = 4096):
        super().__init__()
        self.backbone = backbone
        self.clip = backbone.model
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.max_text_batch = max_text_batch
        init = None
        if ctx_init:
            words = ctx_init.replace("_", " ").split()
            if len(words) != n_ctx:
                raise ValueError(f"ctx_init {ctx_init!r} has {len(words)} words but n_ctx is {n_ctx}")
            tokens = backbone.tokenizer([ctx_init])
            with torch.no_grad():
                init = self.clip.token_embedding(tokens.to(self.device))[0, 1:1 + n_ctx].cpu()
        self.prompt_learner = PromptLearner(n_ctx, backbone.text_width, backbone.embed_dim, init).to(self.device)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self._prompt_cache: dict[tuple[str, ...], ClassPrompts] = {}

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the encoders stay frozen, and in eval mode, whatever the prompt learner does
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"prompt_learner.{k}": v for k, v in self.prompt_learner.state_dict().items()}

    def class_prompts(self, classnames: Sequence[str]) -> ClassPrompts:
        key = tuple(classnames)
        if key not in self._prompt_cache:
            placeholder = " ".join(["X"] * self.n_ctx)
            texts = [f"{placeholder} {name.replace('_', ' ')}." for name in key]
            tokens = self.backbone.tokenizer(texts).to(self.device)
            eot = (tokens == self.backbone.eot_token_id).int().argmax(dim=-1)
            length = int(eot.max()) + 1
            with torch.no_grad():
                embedded = self.clip.token_embedding(tokens[:, :length])
            self._prompt_cache[key] = ClassPrompts(
                classnames=key, prefix=embedded[:, :1], suffix=embedded[:, 1 + self.n_ctx:], eot=eot
            )
        return self._prompt_cache[key]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features of pixel-space images."""
        features = self.clip.encode_image((images - self.mean) / self.std)
        return F.normalize(features, dim=-1)

    def encode_prompts(self, ctx: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
        """(B, K, D) normalised text features for every (image context, class) pair."""
        batch, n_classes = ctx.shape[0], prompts.prefix.shape[0]
        width = ctx.shape[-1]
        full = torch.cat([
            prompts.prefix.unsqueeze(0).expand(batch, -1, -1, -1),
            ctx.unsqueeze(1).expand(-1, n_classes, -1, -1),
            prompts.suffix.unsqueeze(0).expand(batch, -1, -1, -1),
        ], dim=2).reshape(batch * n_classes, -1, width)
        eot = prompts.eot.repeat(batch)
        length = full.shape[1]
        clip = self.clip
        pos = clip.positional_embedding[:length]
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        out = []
        for start in range(0, full.shape[0], self.max_text_batch):
            x = full[start:start + self.max_text_batch] + pos
            x = clip.ln_final(clip.transformer(x, attn_mask=mask))
            x = x[torch.arange(x.shape[0], device=x.device), eot[start:start + self.max_text_batch]]
            proj = clip.text_projection
            out.append(proj(x) if isinstance(proj, nn.Linear) else x @ proj)
        return F.normalize(torch.cat(out), dim=-1).view(batch, n_classes, -1)

    def forward(self, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """(B, K) logits of pixel-space images over ``classnames`` (paper Eq. 2, before the softmax)."""
        features = self.image_features(images)
        text = self.encode_prompts(self.prompt_learner(features), self.class_prompts(classnames))
        return self.clip.logit_scale.exp() * torch.einsum("bd,bkd->bk", features, text)
