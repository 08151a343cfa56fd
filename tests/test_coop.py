"""CoOp: the fast model equals the reference code's computation, and travels as a 'coop' bundle."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ci_core.errors import BundleError
from ci_core.models.backbone import TINY_IMAGE_SIZE
from ci_core.models.bundle import load_bundle, save_bundle
from ci_core.models.coop import CoOpCLIP, reference_logits, reference_text_features

CLASSES = ("red circle", "blue", "lake (natural)", "orange_triangle")  # "(natural)." ends in one token ")."


def coop_model(backbone, *, position="end", class_specific=False, n_ctx=4, seed=0):
    torch.manual_seed(seed)
    model = CoOpCLIP(backbone, n_ctx=n_ctx, ctx_classes=CLASSES if class_specific else None,
                     class_token_position=position)
    with torch.no_grad():
        model.prompt_learner.ctx.normal_(0, 0.5)  # far from the init, so that every context row matters
    return model.eval()


@pytest.mark.parametrize("class_specific", [False, True], ids=["shared", "class-specific"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_fast_text_features_equal_the_reference_code(random_backbone, position, class_specific):
    model = coop_model(random_backbone, position=position, class_specific=class_specific, n_ctx=5)
    with torch.no_grad():
        fast, reference = model.text_features(CLASSES), reference_text_features(model, CLASSES)
    assert fast.shape == (4, random_backbone.embed_dim)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_logits_are_the_scaled_cosines_of_image_and_text_features(random_backbone):
    model = coop_model(random_backbone, position="front")
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(images, CLASSES), reference_logits(model, images, CLASSES),
                                   atol=1e-5, rtol=1e-5)


def test_class_specific_context_follows_the_class_names(random_backbone):
    model = coop_model(random_backbone, class_specific=True)
    with torch.no_grad():
        full = model.text_features(CLASSES)
        subset = model.text_features([CLASSES[2], CLASSES[0]])
        torch.testing.assert_close(subset, full[[2, 0]], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"classes \['purple star'\] have no context: .*class-specific"):
            model.text_features(["purple star", CLASSES[0]])


def test_text_features_are_reused_only_while_the_context_is_frozen(random_backbone):
    model = coop_model(random_backbone)
    model.requires_grad_(False)
    with torch.no_grad():
        first = model.text_features(CLASSES)
        assert model.text_features(CLASSES) is first
        model.prompt_learner.ctx.add_(0.1)  # an in-place change of the context invalidates them
        assert not torch.equal(model.text_features(CLASSES), first)
    model.prompt_learner.requires_grad_(True)
    model.text_features(CLASSES).pow(3).sum().backward()
    assert model.prompt_learner.ctx.grad is not None and model.prompt_learner.ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("class_specific", [False, True], ids=["shared", "class-specific"])
def test_coop_bundle_round_trip(tmp_path, random_backbone, class_specific):
    model = coop_model(random_backbone, position="middle", class_specific=class_specific)
    bundle = save_bundle(model, CLASSES, tmp_path / "coop", base_classes=CLASSES[:2])
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["kind"] == "coop" and meta["n_ctx"] == 4 and meta["class_token_position"] == "middle"
    assert meta["class_specific"] is class_specific
    assert meta["tensors"] == {"prompt_learner.ctx": [4, 4, 64] if class_specific else [4, 64]}
    loaded, _ = load_bundle(bundle, backbone=random_backbone)
    assert isinstance(loaded, CoOpCLIP) and loaded.ctx_classes == (CLASSES if class_specific else None)
    with torch.no_grad():
        assert torch.equal(loaded.text_features(CLASSES), model.text_features(CLASSES))


def test_coop_bundle_is_shape_checked(tmp_path, random_backbone):
    bundle = save_bundle(coop_model(random_backbone), CLASSES, tmp_path / "coop")
    save_file({"prompt_learner.ctx": torch.zeros(4, 4, 64)}, str(bundle / "weights.safetensors"))
    with pytest.raises(BundleError, match=r"'prompt_learner.ctx' has shape \[4, 4, 64\], expected \[4, 64\]"):
        load_bundle(bundle, backbone=random_backbone)
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**meta, "class_token_position": "left"}))
    with pytest.raises(BundleError, match=r"'class_token_position' must be one of end, middle, front, got 'left'"):
        load_bundle(bundle, backbone=random_backbone)
    assert load_file(str(bundle / "weights.safetensors"))["prompt_learner.ctx"].shape == (4, 4, 64)


def test_a_class_specific_model_is_bundled_with_its_own_classes_only(tmp_path, random_backbone):
    with pytest.raises(BundleError, match=r"context is class-specific for 4 classes .* exactly those, in order"):
        save_bundle(coop_model(random_backbone, class_specific=True), CLASSES[::-1], tmp_path / "coop")
    assert not (tmp_path / "coop").exists()


def test_detectors_invert_triggers_through_a_coop_model(random_backbone):
    """What CI, NC and PixB need of a model: gradients reach the trigger through the (frozen) CoOp prompts."""
    from ci_core.scanning.cost_inversion import optimise_under_cost
    from ci_core.plugins import registry

    model = coop_model(random_backbone).requires_grad_(False)
    images = torch.rand(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    detector = registry().get("detector", "ci").from_options({"batch_size": 2}, preset="tiny")
    inversion = detector.invert(model=model, images=images, classnames=CLASSES, target=1,
                                generator=torch.Generator().manual_seed(0))
    assert inversion.trigger.linf > 0 and inversion.loss == inversion.loss
    delta = torch.zeros(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, requires_grad=True)  # NC's and PixB's shared loop
    losses = optimise_under_cost(
        model=model, images=images, classnames=CLASSES, target=0, generator=torch.Generator().manual_seed(0),
        variables=[delta], lr=0.1, betas=(0.5, 0.9), epochs=1, batch_size=2, batches_per_step=1, cost=lambda: 0.0,
        stamp=lambda x: ((x + delta).clamp(0, 1), delta.abs().mean(), None), end_step=lambda step, kept: False)
    assert len(losses) == 2 and delta.abs().max() > 0 and model.prompt_learner.ctx.grad is None
