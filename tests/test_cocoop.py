import json

import open_clip
import pytest
import torch

from ci_core.errors import ConfigError
from ci_core.models.backbone import TextEncoding, load_backbone
from ci_core.models.cocoop import PromptTunedCLIP, reference_logits

# A small random architecture with CLIP's full 77-token context (the tiny CLIP's context is shorter).
SMALL_77 = "ci-test-small-77"
NAMES = ["red circle", "a much longer class name here", "star", "blue square", "green striped hexagon"]


@pytest.fixture(scope="module")
def small_77(tmp_path_factory):
    config = tmp_path_factory.mktemp("configs") / f"{SMALL_77}.json"
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 3},
    }))
    open_clip.add_model_config(config)
    return load_backbone(SMALL_77, "random:0")


def perturbed(backbone, **kwargs) -> PromptTunedCLIP:
    torch.manual_seed(0)
    model = PromptTunedCLIP(backbone, **kwargs)
    with torch.no_grad():  # make the meta-net and the context matter
        for p in model.prompt_learner.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def images_for(backbone, n: int, requires_grad: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(n, 3, backbone.image_size, backbone.image_size, requires_grad=requires_grad)


# auto (one chunk), whole images per chunk (7 pairs: one image of 5 classes), classes split (2), one pair (1)
@pytest.mark.parametrize("max_text_batch", [None, 7, 2, 1])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_fast_logits_equal_full_context_per_image_reference(small_77, max_text_batch, shared_prefix):
    model = perturbed(small_77, text_encoding=TextEncoding(max_text_batch=max_text_batch))
    assert model.shared_prefix
    model.shared_prefix = shared_prefix
    images = images_for(small_77, 3)
    with torch.no_grad():
        fast, reference = model(images, NAMES), reference_logits(model, images, NAMES)
    assert fast.shape == (3, len(NAMES))
    assert (fast - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("max_text_batch", [None, 3])
def test_fast_gradients_equal_reference_gradients(small_77, max_text_batch):
    """Forward and backward: with several chunks each is checkpointed and recomputed, exactly."""
    model = perturbed(small_77, text_encoding=TextEncoding(max_text_batch=max_text_batch))
    params = list(model.prompt_learner.parameters())

    def grads(fn):
        images = images_for(small_77, 2, requires_grad=True)
        logits = fn(images)
        (logits[:, 1] - logits[:, 0]).sum().backward()
        out = [images.grad.clone()] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return logits.detach(), out

    fast_logits, fast = grads(lambda x: model(x, NAMES))
    ref_logits, ref = grads(lambda x: reference_logits(model, x, NAMES))
    assert (fast_logits - ref_logits).abs().max().item() < 1e-5
    for g_fast, g_ref in zip(fast, ref):
        assert torch.allclose(g_fast, g_ref, atol=1e-6, rtol=1e-4)


def test_tiny_and_quickgelu_architectures_equal_reference(random_backbone):
    for backbone in (random_backbone, load_backbone(random_backbone.name, "random:0", quick_gelu=True)):
        model = perturbed(backbone, text_encoding=TextEncoding(max_text_batch=4))
        images = images_for(backbone, 2)
        with torch.no_grad():
            assert (model(images, NAMES) - reference_logits(model, images, NAMES)).abs().max().item() < 1e-5
    assert not random_backbone.quick_gelu and backbone.quick_gelu


def test_chunks_cover_every_pair_once_within_the_limit():
    for batch, n_classes, pairs in [(3, 5, 1), (3, 5, 2), (3, 5, 5), (3, 5, 7), (3, 5, 11), (4, 5, 100), (1, 1, 1)]:
        seen = torch.zeros(batch, n_classes, dtype=torch.int)
        for images, classes in PromptTunedCLIP.chunks(batch, n_classes, pairs):
            seen[images, classes] += 1
            assert len(range(batch)[images]) * len(range(n_classes)[classes]) <= pairs
        assert bool((seen == 1).all()), (batch, n_classes, pairs)


def test_memory_budget_sets_the_chunk_size(random_backbone):
    model = PromptTunedCLIP(random_backbone)
    prompts = model.class_prompts(NAMES)
    per_pair = model.pair_activation_bytes(prompts, grad=True)
    assert per_pair > model.pair_activation_bytes(prompts, grad=False) > 0
    budgeted = PromptTunedCLIP(random_backbone, text_encoding=TextEncoding(memory_budget=6 * per_pair + 1))
    assert budgeted.pairs_per_chunk(budgeted.class_prompts(NAMES), grad=True) == 6
    fixed = PromptTunedCLIP(random_backbone, text_encoding=TextEncoding(max_text_batch=3, memory_budget=1))
    assert fixed.pairs_per_chunk(prompts, grad=True) == 3  # an explicit chunk size wins
    assert PromptTunedCLIP(random_backbone, text_encoding=TextEncoding(memory_budget=1)).pairs_per_chunk(
        prompts, grad=True) == 1


def test_chunks_are_checkpointed_only_when_a_backward_pass_spans_several(random_backbone):
    model = perturbed(random_backbone, text_encoding=TextEncoding(max_text_batch=len(NAMES)))  # one image per chunk
    calls = []
    handle = model.clip.ln_final.register_forward_hook(lambda *_: calls.append(1))
    try:
        images = images_for(random_backbone, 2)
        model(images, NAMES).sum().backward()
        assert len(calls) == 2 * 2  # two chunks, each run again in the backward pass
        calls.clear()
        with torch.no_grad():
            model(images, NAMES)
        assert len(calls) == 2  # no backward pass, nothing recomputed
        calls.clear()
        model.text_encoding = TextEncoding()  # automatic: one chunk
        model(images, NAMES).sum().backward()
        assert len(calls) == 1
    finally:
        handle.remove()


def test_bf16_on_cpu_is_a_clear_error(random_backbone):
    with pytest.raises(ConfigError, match="bf16 autocast needs a CUDA device"):
        PromptTunedCLIP(random_backbone, text_encoding=TextEncoding(bf16=True))
    with pytest.raises(ConfigError, match="bf16 autocast needs a CUDA device"):
        random_backbone.with_text_encoding(TextEncoding(bf16=True))


def test_context_initialised_from_a_photo_of_a(random_backbone):
    model = PromptTunedCLIP(random_backbone)
    tokens = random_backbone.tokenizer(["a photo of a"])
    expected = random_backbone.model.token_embedding(tokens)[0, 1:5]
    assert torch.equal(model.prompt_learner.ctx.data, expected)
    hidden = model.prompt_learner.meta_net.linear1
    assert hidden.in_features == random_backbone.embed_dim and hidden.out_features == random_backbone.embed_dim // 16


def test_encoders_stay_frozen_in_training(random_backbone):
    model = PromptTunedCLIP(random_backbone).train()
    assert not model.clip.training
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.prompt_learner.parameters())
