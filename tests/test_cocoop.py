import torch
import torch.nn.functional as F

from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.backbone import TINY_IMAGE_SIZE


def reference_logits(model: PromptTunedCLIP, images, classnames):
    """CoCoOp as the reference code does it: full-context prompts, one image at a time."""
    clip = model.clip
    features = model.image_features(images)
    ctx = model.prompt_learner(features)
    n = model.n_ctx
    tokens = model.backbone.tokenizer([f"{' '.join(['X'] * n)} {c}." for c in classnames])
    embedded = clip.token_embedding(tokens)
    eot = (tokens == model.backbone.eot_token_id).int().argmax(-1)
    rows = []
    for i in range(len(images)):
        x = torch.cat([embedded[:, :1], ctx[i].expand(len(classnames), -1, -1), embedded[:, 1 + n:]], dim=1)
        x = clip.ln_final(clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask))
        text = F.normalize(x[torch.arange(len(classnames)), eot] @ clip.text_projection, dim=-1)
        rows.append(clip.logit_scale.exp() * features[i] @ text.T)
    return torch.stack(rows)


def test_truncated_batched_prompts_equal_reference(random_backbone):
    torch.manual_seed(0)
    model = PromptTunedCLIP(random_backbone, max_text_batch=7)  # odd chunk size exercises chunking
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    names = ["red circle", "a much longer class name here", "star"]
    images = torch.rand(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        assert torch.allclose(model(images, names), reference_logits(model, images, names), atol=1e-5)


def test_context_initialised_from_a_photo_of_a(random_backbone):
    model = PromptTunedCLIP(random_backbone)
    tokens = random_backbone.tokenizer(["a photo of a"])
    expected = random_backbone.model.token_embedding(tokens)[0, 1:5]
    assert torch.equal(model.prompt_learner.ctx.data, expected)
    hidden = model.prompt_learner.meta_net.linear1
    assert hidden.in_features == 128 and hidden.out_features == 128 // 16


def test_encoders_stay_frozen_in_training(random_backbone):
    model = PromptTunedCLIP(random_backbone).train()
    assert not model.clip.training
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.prompt_learner.parameters())


def test_shared_prefix_path_equals_plain_path(random_backbone):
    torch.manual_seed(1)
    model = PromptTunedCLIP(random_backbone, max_text_batch=5)
    assert model.shared_prefix
    names = ["red circle", "blue", "a much longer class name here"]
    images = torch.rand(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        fast = model(images, names)
        model.shared_prefix = False
        plain = model(images, names)
    assert torch.allclose(fast, plain, atol=1e-5)
