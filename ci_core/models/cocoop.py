"""CoCoOp over a frozen open_clip CLIP (Zhou et al. 2022), the model every attack and detector works on.

Prompts are ``[SOT] ctx_1..ctx_n + pi(x) [class name tokens] . [EOT]`` where
``pi = meta_net(normalised image feature)``; logits are the paper's Eq. 2.

Three exact shortcuts make it fast:
* the text encoder runs on prompts truncated just after the longest end-of-text
  position of the class set: under the causal mask later positions cannot
  influence the pooled feature, so the logits are unchanged;
* all (image, class) prompts go through the text encoder as one batch instead
  of a Python loop over images, in chunks of at most ``max_text_batch`` prompts;
* the prompt prefix (start-of-text and the image's context vectors) is the same
  for every class of an image, and under the causal mask its hidden states do
  not depend on what follows: each block computes it once per image and the
  class-name suffixes attend to it (for standard open_clip text blocks; other
  blocks take the plain path).

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


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(..., L, width) -> (..., heads, L, width / heads)."""
    return t.unflatten(-1, (n_heads, t.shape[-1] // n_heads)).transpose(-2, -3)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-2, -3).flatten(-2)


def supports_shared_prefix(clip: nn.Module) -> bool:
    blocks = getattr(getattr(clip, "transformer", None), "resblocks", None)
    return blocks is not None and all(
        isinstance(getattr(b, "attn", None), nn.MultiheadAttention) and b.attn._qkv_same_embed_dim
        and b.attn.batch_first and not hasattr(b, "ln_1_kv") and hasattr(b, "ln_2") and hasattr(b, "mlp")
        for b in blocks
    )


def shared_prefix_block(block: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual attention block on prefix (B, P, w), shared by the suffixes (B, K, S, w) of K classes."""
    attn = block.attn
    n_heads = attn.num_heads
    batch, n_classes, s_len, _ = suffix.shape
    p_len = prefix.shape[1]
    qp, kp, vp = (_heads(t, n_heads) for t in F.linear(block.ln_1(prefix), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    qs, ks, vs = (_heads(t, n_heads) for t in F.linear(block.ln_1(suffix), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    out_p = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    expand = lambda t: t.unsqueeze(1).expand(batch, n_classes, *t.shape[1:])  # noqa: E731
    keys, values = torch.cat([expand(kp), ks], dim=-2), torch.cat([expand(vp), vs], dim=-2)
    allowed = torch.ones(s_len, p_len + s_len, dtype=torch.bool, device=suffix.device).tril(diagonal=p_len)
    out_s = F.scaled_dot_product_attention(qs, keys, values, attn_mask=allowed)
    prefix = prefix + block.ls_1(attn.out_proj(_merge_heads(out_p)))
    suffix = suffix + block.ls_1(attn.out_proj(_merge_heads(out_s)))
    prefix = prefix + block.ls_2(block.mlp(block.ln_2(prefix)))
    suffix = suffix + block.ls_2(block.mlp(block.ln_2(suffix)))
    return prefix, suffix


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
        self.shared_prefix = supports_shared_prefix(self.clip)
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
        if self.shared_prefix:
            return self._encode_shared_prefix(ctx, prompts)
        return self._encode_full(ctx, prompts)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.clip.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _encode_shared_prefix(self, ctx: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
        clip = self.clip
        batch, n_classes = ctx.shape[0], prompts.suffix.shape[0]
        # Start-of-text is the same token for every class: one prefix per image.
        prefix_all = torch.cat([prompts.prefix[:1].expand(batch, -1, -1), ctx], dim=1)
        p_len, s_len = prefix_all.shape[1], prompts.suffix.shape[1]
        pos = clip.positional_embedding
        eot = prompts.eot - p_len
        per_chunk = max(1, self.max_text_batch // n_classes)
        out = []
        for start in range(0, batch, per_chunk):
            prefix = prefix_all[start:start + per_chunk] + pos[:p_len]
            b = prefix.shape[0]
            suffix = prompts.suffix.unsqueeze(0).expand(b, -1, -1, -1) + pos[p_len:p_len + s_len]
            for block in clip.transformer.resblocks:
                prefix, suffix = shared_prefix_block(block, prefix, suffix)
            pooled = clip.ln_final(suffix[:, torch.arange(n_classes, device=suffix.device), eot])
            out.append(self._project(pooled))
        return F.normalize(torch.cat(out), dim=-1)

    def _encode_full(self, ctx: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
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
            out.append(self._project(x))
        return F.normalize(torch.cat(out), dim=-1).view(batch, n_classes, -1)

    def forward(self, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """(B, K) logits of pixel-space images over ``classnames`` (paper Eq. 2, before the softmax)."""
        features = self.image_features(images)
        text = self.encode_prompts(self.prompt_learner(features), self.class_prompts(classnames))
        return self.clip.logit_scale.exp() * torch.einsum("bd,bkd->bk", features, text)
