"""CoCoOp over a frozen open_clip CLIP (Zhou et al. 2022), the model every attack and detector works on.

Prompts are ``[SOT] ctx_1..ctx_n + pi(x) [class name tokens] . [EOT]`` where
``pi = meta_net(normalised image feature)``; logits are the paper's Eq. 2.

Three exact shortcuts make it fast:
* the text encoder runs on prompts truncated just after the longest end-of-text
  position of the class set: under the causal mask later positions cannot
  influence the pooled feature, so the logits are unchanged;
* all (image, class) prompts go through the text encoder as one batch instead
  of a Python loop over images, in chunks sized to a memory budget (see
  ``TextEncoding``); when a backward pass needs more than one chunk, each chunk
  is checkpointed (recomputed in the backward pass), so that the activations
  alive at once stay within the budget during training too;
* the prompt prefix (start-of-text and the image's context vectors) is the same
  for every class of an image, and under the causal mask its hidden states do
  not depend on what follows: each block computes it once per image and the
  class-name suffixes attend to it (for standard open_clip text blocks; other
  blocks take the plain path).

``reference_logits`` is the straightforward computation (full 77-token
context, one image at a time) that the fast path must equal; tests and
``benchmarks/cocoop_speed.py`` compare against it.

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
from torch.utils.checkpoint import checkpoint

from ci_core.models.backbone import Backbone, TextEncoding, check_text_encoding

DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_CTX_INIT = "a photo of a"

# Activations one text block keeps per token for the backward pass, in multiples of the width: both
# LayerNorms' inputs and outputs (4), q, k and v (3), the attention output and its projection (2), the
# MLP's hidden layer before and after its activation (2 x 4).  Without gradients only one block's
# intermediates are alive at a time (about 12 widths per token).
SAVED_WIDTHS_PER_TOKEN = 17
LIVE_WIDTHS_PER_TOKEN = 12
# The automatic memory budget: fixed on a CPU (so that chunking, hence rounding, is the same from run
# to run), a share of the free memory on a GPU.
CPU_MEMORY_BUDGET = 2 * 1024**3
CUDA_BUDGET_SHARE = 4


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
    """A frozen CLIP with a trainable CoCoOp prompt learner.

    ``text_encoding`` (default: the backbone's) sets the text chunk size or the
    memory budget it is derived from, and bf16 autocast.
    """

    def __init__(self, backbone: Backbone, n_ctx: int = 4, ctx_init: str | None = DEFAULT_CTX_INIT,
                 text_encoding: TextEncoding | None = None):
        super().__init__()
        self.backbone = backbone
        self.clip = backbone.model
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.text_encoding = text_encoding or backbone.text_encoding
        check_text_encoding(self.text_encoding, self.device)
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
        self._auto_budget: int | None = None

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

    @torch.no_grad()
    def context_norms(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) the largest norm of the image-conditioned context vectors ctx + pi(x) each image gives the prompt."""
        return self.prompt_learner(self.image_features(images)).float().norm(dim=-1).amax(dim=-1)

    # ------------------------------------------------------------------ chunking

    def memory_budget(self) -> int:
        """Bytes one chunk of the text encoder may hold in activations."""
        if self.text_encoding.memory_budget is not None:
            return self.text_encoding.memory_budget
        if self._auto_budget is None:  # fixed at first use, so that the chunking stays the same afterwards
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                self._auto_budget = max(1, free // CUDA_BUDGET_SHARE)
            else:
                self._auto_budget = CPU_MEMORY_BUDGET
        return self._auto_budget

    def pair_activation_bytes(self, prompts: ClassPrompts, *, grad: bool) -> int:
        """Estimated activation bytes of one (image, class) prompt in the text encoder."""
        clip = self.clip
        blocks = clip.transformer.resblocks
        width, layers = self.backbone.text_width, len(blocks)
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", 1)
        p_len, s_len = 1 + self.n_ctx, prompts.suffix.shape[1]
        queries = s_len if self.shared_prefix else p_len + s_len
        keys = p_len + s_len
        element = 2 if self.text_encoding.bf16 else 4
        per_token = SAVED_WIDTHS_PER_TOKEN if grad else LIVE_WIDTHS_PER_TOKEN
        # attention weights (and their mask-filled copy) are (heads, queries, keys) per prompt and block
        per_block = (queries * width * per_token + 2 * heads * queries * keys) * element
        return per_block * (layers if grad else 1) + 2 * queries * width * element  # + the residual stream

    def pairs_per_chunk(self, prompts: ClassPrompts, *, grad: bool) -> int:
        """(image, class) prompts encoded at once: ``max_text_batch``, else what fits the memory budget."""
        if self.text_encoding.max_text_batch is not None:
            return self.text_encoding.max_text_batch
        return max(1, self.memory_budget() // self.pair_activation_bytes(prompts, grad=grad))

    @staticmethod
    def chunks(batch: int, n_classes: int, pairs: int) -> list[tuple[slice, slice]]:
        """(images, classes) slices covering the batch row by row, each with at most ``pairs`` prompts.

        Whole images while a chunk holds all classes; otherwise one image at a time, its classes split.
        """
        if pairs >= n_classes:
            per = pairs // n_classes
            return [(slice(i, min(i + per, batch)), slice(0, n_classes)) for i in range(0, batch, per)]
        return [(slice(i, i + 1), slice(k, min(k + pairs, n_classes)))
                for i in range(batch) for k in range(0, n_classes, pairs)]

    # ------------------------------------------------------------------ the text encoder

    def encode_prompts(self, ctx: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
        """(B, K, D) normalised text features for every (image context, class) pair."""
        batch, n_classes = ctx.shape[0], prompts.suffix.shape[0]
        grad = torch.is_grad_enabled() and ctx.requires_grad
        pieces = self.chunks(batch, n_classes, self.pairs_per_chunk(prompts, grad=grad))
        encode = self._encode_shared_prefix if self.shared_prefix else self._encode_full
        sot = prompts.prefix[:1]  # start-of-text: the same token for every class
        rows, row = [], []
        for images, classes in pieces:
            args = (ctx[images], sot, prompts.suffix[classes], prompts.eot[classes])
            if grad and len(pieces) > 1:
                # Keep only the chunk's inputs and outputs; its activations are recomputed in the backward pass.
                out = checkpoint(encode, *args, use_reentrant=False)
            else:
                out = encode(*args)
            row.append(out)
            if classes.stop == n_classes:
                rows.append(torch.cat(row, dim=1) if len(row) > 1 else row[0])
                row = []
        return F.normalize(torch.cat(rows) if len(rows) > 1 else rows[0], dim=-1)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.clip.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _encode_shared_prefix(self, ctx: torch.Tensor, sot: torch.Tensor, suffix: torch.Tensor,
                              eot: torch.Tensor) -> torch.Tensor:
        """(b, k, D) text features; the SOT+context prefix runs once per image, the class suffixes attend to it."""
        clip = self.clip
        batch, n_classes = ctx.shape[0], suffix.shape[0]
        prefix = torch.cat([sot.expand(batch, -1, -1), ctx], dim=1)
        p_len, s_len = prefix.shape[1], suffix.shape[1]
        pos = clip.positional_embedding
        prefix = prefix + pos[:p_len]
        suffix = suffix.unsqueeze(0).expand(batch, -1, -1, -1) + pos[p_len:p_len + s_len]
        for block in clip.transformer.resblocks:
            prefix, suffix = shared_prefix_block(block, prefix, suffix)
        pooled = clip.ln_final(suffix[:, torch.arange(n_classes, device=suffix.device), eot - p_len])
        return self._project(pooled)

    def _encode_full(self, ctx: torch.Tensor, sot: torch.Tensor, suffix: torch.Tensor,
                     eot: torch.Tensor) -> torch.Tensor:
        """(b, k, D) text features of the whole (truncated) prompts, for text blocks of any kind."""
        clip = self.clip
        batch, n_classes, width = ctx.shape[0], suffix.shape[0], ctx.shape[-1]
        full = torch.cat([
            sot.unsqueeze(0).expand(batch, n_classes, -1, -1),
            ctx.unsqueeze(1).expand(-1, n_classes, -1, -1),
            suffix.unsqueeze(0).expand(batch, -1, -1, -1),
        ], dim=2).reshape(batch * n_classes, -1, width)
        length = full.shape[1]
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.ln_final(clip.transformer(full + clip.positional_embedding[:length], attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eot.repeat(batch)]
        return self._project(x).view(batch, n_classes, -1)

    def forward(self, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """(B, K) logits of pixel-space images over ``classnames`` (paper Eq. 2, before the softmax)."""
        with self.text_encoding.autocast():
            features = self.image_features(images)
            text = self.encode_prompts(self.prompt_learner(features), self.class_prompts(classnames))
            logits = self.clip.logit_scale.exp() * torch.einsum("bd,bkd->bk", features, text)
        return logits.float()


def reference_logits(model: PromptTunedCLIP, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
    """CoCoOp as its reference code computes it: full-context (77-token) prompts, a Python loop over images.

    No truncation, batching or shared prefix: the oracle the fast path must equal.
    """
    clip = model.clip
    features = model.image_features(images)
    ctx = model.prompt_learner(features)
    n = model.n_ctx
    texts = [f"{' '.join(['X'] * n)} {name.replace('_', ' ')}." for name in classnames]
    tokens = model.backbone.tokenizer(texts).to(model.device)
    embedded = clip.token_embedding(tokens)
    eot = (tokens == model.backbone.eot_token_id).int().argmax(-1)
    rows = []
    for i in range(len(images)):
        x = torch.cat([embedded[:, :1], ctx[i].expand(len(classnames), -1, -1), embedded[:, 1 + n:]], dim=1)
        x = clip.ln_final(clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask))
        text = F.normalize(model._project(x[torch.arange(len(classnames), device=x.device), eot]), dim=-1)
        rows.append(clip.logit_scale.exp() * features[i] @ text.T)
    return torch.stack(rows)
