"""CoOp over a frozen open_clip CLIP (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models").

A CoOp prompt learner is context vectors only, no meta-net: the prompt of a
class is ``[SOT] ctx_1..ctx_n [class name tokens] . [EOT]`` with the class
token at the ``end`` (as above), in the ``middle`` (``ctx_1..ctx_{n/2} [name]
ctx_{n/2+1}..ctx_n``) or at the ``front`` (``[name] ctx_1..ctx_n``), exactly as
the reference code assembles it.  The context is ``shared`` by every class
(shape ``(n_ctx, width)``) or ``class-specific`` (``(n_cls, n_ctx, width)``, one
row per training class, so such a model classifies only the classes it was
trained on, and a forward pass over any other class is an error).

Since the prompts do not depend on the image, the text features are computed
once per class list and reused while the context is unchanged (never while the
context itself is being trained).  As for CoCoOp, prompts are truncated just
after the last end-of-text position of the class set, which under the causal
mask leaves the logits unchanged; ``reference_logits`` is the reference code's
full-context computation that tests compare against.

The model offers what the scanner, the evaluation and the detectors use of a
``PromptTunedCLIP``: ``model(images, classnames)`` on pixel-space images,
``image_features``, ``clip``, ``backbone``, ``device`` and ``trainable_state``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ci_core.models.backbone import Backbone, TextEncoding, check_text_encoding
from ci_core.models.cocoop import CPU_MEMORY_BUDGET, CUDA_BUDGET_SHARE, LIVE_WIDTHS_PER_TOKEN, SAVED_WIDTHS_PER_TOKEN

POSITIONS = ("end", "middle", "front")


class CoOpPromptLearner(nn.Module):
    """The learned context: ``(n_ctx, width)`` shared, or ``(n_cls, n_ctx, width)`` class-specific."""

    def __init__(self, n_ctx: int, ctx_dim: int, n_cls: int | None = None):
        super().__init__()
        shape = (n_ctx, ctx_dim) if n_cls is None else (n_cls, n_ctx, ctx_dim)
        self.ctx = nn.Parameter(torch.randn(*shape) * 0.02)


def project_text(clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class CoOpCLIP(nn.Module):
    """A frozen CLIP with a CoOp prompt learner.

    ``ctx_classes`` (class-specific context only) are the classes of the context's rows, in order.
    """

    def __init__(self, backbone: Backbone, n_ctx: int = 16, *, ctx_classes: Sequence[str] | None = None,
                 class_token_position: str = "end", text_encoding: TextEncoding | None = None):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position {class_token_position!r}: expected one of {', '.join(POSITIONS)}")
        if ctx_classes is not None and len(set(ctx_classes)) != len(ctx_classes):
            raise ValueError("ctx_classes has duplicates")
        self.backbone = backbone
        self.clip = backbone.model
        self.n_ctx = n_ctx
        self.ctx_init = None
        self.class_token_position = class_token_position
        self.ctx_classes = tuple(ctx_classes) if ctx_classes is not None else None
        self.text_encoding = text_encoding or backbone.text_encoding
        check_text_encoding(self.text_encoding, self.device)
        n_cls = len(self.ctx_classes) if self.ctx_classes is not None else None
        self.prompt_learner = CoOpPromptLearner(n_ctx, backbone.text_width, n_cls).to(self.device)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self._prompt_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]] = {}
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    @property
    def class_specific(self) -> bool:
        return self.ctx_classes is not None

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the encoders stay frozen, and in eval mode
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"prompt_learner.{k}": v for k, v in self.prompt_learner.state_dict().items()}

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features of pixel-space images."""
        features = self.clip.encode_image((images - self.mean) / self.std)
        return F.normalize(features, dim=-1)

    def _token_prompts(self, classnames: tuple[str, ...]):
        """(SOT embedding (1, 1, w), suffixes (K, S, w), end-of-text positions (K,), name lengths in tokens)."""
        if classnames not in self._prompt_cache:
            placeholder = " ".join(["X"] * self.n_ctx)
            tokens = self.backbone.tokenizer([f"{placeholder} {n.replace('_', ' ')}." for n in classnames]).to(self.device)
            eot = (tokens == self.backbone.eot_token_id).int().argmax(dim=-1)
            length = int(eot.max()) + 1
            with torch.no_grad():
                embedded = self.clip.token_embedding(tokens[:, :length])
            # The reference code cuts the class name off the suffix at the length of the name tokenised alone
            # (which for a name ending in punctuation takes the full stop merged into its last token along).
            name_lengths = [len(self.backbone.tokenizer.encode(n.replace("_", " "))) for n in classnames]
            self._prompt_cache[classnames] = (embedded[:1, :1], embedded[:, 1 + self.n_ctx:], eot, name_lengths)
        return self._prompt_cache[classnames]

    def _contexts(self, classnames: tuple[str, ...]) -> torch.Tensor:
        """(K, n_ctx, w): each class's context."""
        ctx = self.prompt_learner.ctx
        if self.ctx_classes is None:
            return ctx.unsqueeze(0).expand(len(classnames), -1, -1)
        missing = [n for n in classnames if n not in self.ctx_classes]
        if missing:
            raise ValueError(f"classes {missing} have no context: this CoOp model's context is class-specific, "
                             f"for its {len(self.ctx_classes)} training classes only")
        return ctx[torch.tensor([self.ctx_classes.index(n) for n in classnames], device=ctx.device)]

    def prompts(self, classnames: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, L, w) prompt embeddings (truncated after the last end-of-text) and (K,) end-of-text positions."""
        sot, suffix, eot, name_lengths = self._token_prompts(classnames)
        ctx = self._contexts(classnames)
        n_cls = len(classnames)
        prefix = sot.expand(n_cls, -1, -1)
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1), eot
        half = self.n_ctx // 2
        rows = []
        for k, n in enumerate(name_lengths):
            name, rest = suffix[k:k + 1, :n], suffix[k:k + 1, n:]
            if self.class_token_position == "middle":
                rows.append(torch.cat([prefix[k:k + 1], ctx[k:k + 1, :half], name, ctx[k:k + 1, half:], rest], dim=1))
            else:
                rows.append(torch.cat([prefix[k:k + 1], name, ctx[k:k + 1], rest], dim=1))
        return torch.cat(rows), eot

    def _classes_per_chunk(self, length: int, grad: bool) -> int:
        if self.text_encoding.max_text_batch is not None:
            return self.text_encoding.max_text_batch
        budget = self.text_encoding.memory_budget
        if budget is None:
            if self.device.type == "cuda":
                budget = max(1, torch.cuda.mem_get_info(self.device)[0] // CUDA_BUDGET_SHARE)
            else:
                budget = CPU_MEMORY_BUDGET
        blocks = self.clip.transformer.resblocks
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", 1)
        element = 2 if self.text_encoding.bf16 else 4
        per_token = SAVED_WIDTHS_PER_TOKEN if grad else LIVE_WIDTHS_PER_TOKEN
        per_block = (length * self.backbone.text_width * per_token + 2 * heads * length * length) * element
        return max(1, budget // (per_block * (len(blocks) if grad else 1)))

    def _encode(self, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        length = prompts.shape[1]
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.ln_final(clip.transformer(prompts + clip.positional_embedding[:length], attn_mask=mask))
        return project_text(clip, x[torch.arange(x.shape[0], device=x.device), eot])

    def text_features(self, classnames: Sequence[str]) -> torch.Tensor:
        """(K, D) normalised text features of the classes' prompts."""
        classnames = tuple(classnames)
        ctx = self.prompt_learner.ctx
        grad = torch.is_grad_enabled() and ctx.requires_grad
        key = (classnames, ctx._version, ctx.data_ptr(), self.text_encoding.bf16)
        if not grad and key in self._text_cache:
            return self._text_cache[key]
        prompts, eot = self.prompts(classnames)
        step = self._classes_per_chunk(prompts.shape[1], grad)
        with self.text_encoding.autocast():
            parts = [self._encode(prompts[i:i + step], eot[i:i + step]) for i in range(0, len(classnames), step)]
        features = F.normalize(torch.cat(parts).float(), dim=-1)
        if not grad:
            features = features.detach()
            self._text_cache = {key: features}  # one class list at a time: a scan uses one
        return features

    def forward(self, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """(B, K) logits of pixel-space images over ``classnames``."""
        with self.text_encoding.autocast():
            features = self.image_features(images)
        text = self.text_features(classnames)
        return (self.clip.logit_scale.exp() * features.float() @ text.t()).float()


def reference_text_features(model: CoOpCLIP, classnames: Sequence[str]) -> torch.Tensor:
    """(K, D) normalised text features as CoOp's reference code computes them: full-context (77-token) prompts
    assembled class by class, pooled at the end-of-text token.  No truncation, no caching: the oracle
    ``CoOpCLIP.text_features`` must equal."""
    clip = model.clip
    n = model.n_ctx
    texts = [f"{' '.join(['X'] * n)} {name.replace('_', ' ')}." for name in classnames]
    tokens = model.backbone.tokenizer(texts).to(model.device)
    embedded = clip.token_embedding(tokens)
    prefix, suffix = embedded[:, :1], embedded[:, 1 + n:]
    ctx = model._contexts(tuple(classnames))
    prompts = []
    for k, name in enumerate(classnames):
        name_len = len(model.backbone.tokenizer.encode(name.replace("_", " ")))
        half = n // 2
        p, c, s = prefix[k:k + 1], ctx[k:k + 1], suffix[k:k + 1]
        if model.class_token_position == "end":
            prompts.append(torch.cat([p, c, s], dim=1))
        elif model.class_token_position == "middle":
            prompts.append(torch.cat([p, c[:, :half], s[:, :name_len], c[:, half:], s[:, name_len:]], dim=1))
        else:
            prompts.append(torch.cat([p, s[:, :name_len], c, s[:, name_len:]], dim=1))
    x = torch.cat(prompts) + clip.positional_embedding
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    return F.normalize(project_text(clip, x[torch.arange(len(classnames)), tokens.argmax(dim=-1)]), dim=-1)


def reference_logits(model: CoOpCLIP, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
    """CoOp's logits as its reference code computes them (see ``reference_text_features``)."""
    features = model.image_features(images)
    return model.clip.logit_scale.exp() * features @ reference_text_features(model, classnames).t()
