"""CoCoOp's training augmentation: Dassl's random resized crop and flip, on for real backbones, off on the tiny world."""

import attrs
import pytest
import torch

from ci_core.plugins import registry
from ci_core.learning.training import CROP_AREA, CROP_RATIO, _crop_box, augment_batch


def test_crop_boxes_follow_dasslS_area_and_ratio_ranges():
    generator = torch.Generator().manual_seed(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = _crop_box(96, 96, generator)
        assert 0 <= top <= 96 - h and 0 <= left <= 96 - w and h > 0 and w > 0
        areas.append(h * w / 96**2)
        ratios.append(w / h)
    # Rounding to whole pixels moves the bounds by a pixel at most.
    assert CROP_AREA[0] * 0.9 <= min(areas) and max(areas) <= 1.0
    assert CROP_RATIO[0] * 0.9 <= min(ratios) and max(ratios) <= CROP_RATIO[1] * 1.1
    assert min(areas) < 0.15 and max(areas) > 0.9  # the whole range is used


def test_augment_batch_is_seeded_keeps_shape_and_range_and_flips_half():
    images = torch.rand(64, 3, 32, 32)
    a = augment_batch(images, torch.Generator().manual_seed(1))
    b = augment_batch(images, torch.Generator().manual_seed(1))
    c = augment_batch(images, torch.Generator().manual_seed(2))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # A left-right gradient shows which images were flipped: about half of them.
    ramp = torch.linspace(0, 1, 32).expand(64, 3, 32, 32).contiguous()
    out = augment_batch(ramp, torch.Generator().manual_seed(3))
    flipped = (out[:, 0, :, 0] > out[:, 0, :, -1]).all(dim=1).float().mean()
    assert 0.3 <= float(flipped) <= 0.7


def test_attacks_augment_on_real_backbones_and_not_on_the_tiny_world():
    plugins = registry()
    for name in plugins.names("attack"):
        cls = plugins.get("attack", name)
        fields = attrs.fields_dict(cls.Config)
        if "augment" not in fields:
            continue  # the encoder-level attack fine-tunes the image encoder with its own loop
        assert cls.Config().augment is True, name  # CoCoOp's recipe
        assert cls.from_options(preset="tiny").config.augment is False, name


@pytest.mark.parametrize("augment", [False, True])
def test_prompt_tuning_with_and_without_augmentation_trains(random_backbone, augment):
    from ci_core.data.datasets import LabeledImages
    from ci_core.models.cocoop import PromptTunedCLIP
    from ci_core.learning.training import PromptTuningConfig, prompt_tune

    torch.manual_seed(0)
    model = PromptTunedCLIP(random_backbone)
    data = LabeledImages(torch.rand(4, 3, random_backbone.image_size, random_backbone.image_size),
                         torch.tensor([0, 1, 0, 1]), ("red circle", "blue square"))
    before = model.prompt_learner.ctx.detach().clone()
    history = prompt_tune(model, data, PromptTuningConfig(epochs=1, batch_size=2, lr=0.1, warmup_epochs=0,
                                                          augment=augment), seed=0)
    assert len(history) == 1 and not torch.equal(before, model.prompt_learner.ctx.detach())
