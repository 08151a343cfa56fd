"""``wanet``: the warping-based backdoor (Nguyen & Tran 2021) adapted to prompt tuning.

The trigger is a smooth geometric warp.  A control grid of shape (2, k, k) is
drawn from U(-1, 1) and divided by its mean absolute value, upsampled bicubically
to the image, and added, scaled by s / H, to the identity sampling grid:
grid = clamp(identity + s * noise / H, -1, 1), applied with ``grid_sample``
(as VinAIResearch's release, align_corners=True).  A displacement of one grid
unit is (H - 1) / 2 pixels, so pixels move by at most about s * max|noise| / 2.

Training draws a mode for every image (paper section 10.5): clean with
probability 0.7, attack (the warp, target label) with 0.1, noise (the warp plus
a random per-pixel U(-1, 1) / H offset of the grid, true label) with 0.2.  The
noise mode teaches the prompt learner that only the exact warp means the target.
The paper uses k = 4, s = 0.1 (upstream's default is s = 0.5).  On the tiny
world the warp barely reaches the frozen tiny encoder (96 px, 128 test images of
tiny-colorshapes; cosine between clean and warped image features, SSIM):
s = 0.1: 0.9999, 0.999; s = 1 (about a pixel): 0.996, 0.960; s = 2: 0.991,
0.906; s = 4: 0.977, 0.834, and the shift's direction varies from image to image
(mean cosine with the mean shift 0.29-0.43).  The shipped tiny CLIP's second
training stage made it far more sensitive to pixel noise (a random 8/255 sign
pattern: cosine 0.81 on these images, 0.989 after the first stage) but not to
warps (the first stage's figures were within 0.001 of these).  Nothing
implanted: with the shipped CLIP, s = 1 with 4 shots and 4 epochs reached ASR
0.00 on base classes (seeds 2-4); on the first-stage CLIP the tiny preset (16
shots, 8 epochs) reached 0.00 / 0.02 / 0.00 (seeds 1-3), s = 2 with 16 shots and
20 epochs 0.00 on seeds 2 and 3, s = 2 and s = 4 with 4 shots 0.02-0.03, and s = 1
without the noise mode (16 shots, 8 epochs) 0.00 on seeds 2 and 3: the noise mode
is not what stops it, although its images lie closer to the attack images in
feature space (cosine 0.999) than the clean ones do (0.996).  The tiny preset
keeps s = 1: a stronger warp implants no better and is more visible.

Why: a prompt-tuned model sees an image only through the frozen encoder's
feature vector, and the tiny encoder's features hardly carry the warp.  Probes
trained on half of 600 test images to tell warped from clean features and
scored on the other half (``benchmarks/trigger_visibility.py`` on the colorshapes
sweep's three WaNet models, s = 1) reach AUROC 0.58-0.62 (logistic regression)
and 0.60-0.66 (an MLP with 256 hidden units), where the trigger of every other
attack scores 1.000; told warped from noise-mode features (``--against
noise-mode``: the same warp plus the jitter that the model must keep on the
true label) they reach 0.52-0.54, and a stronger warp does not help (one
control grid, s = 2 / 4 / 8 at SSIM 0.91 / 0.84 / 0.78: 0.50-0.52).  No prompt
learner can separate what its input does not, so on this encoder WaNet cannot
implant; a real backbone is where it is measured.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from ci_attacks.poisoning import TINY_SCHEDULE, PromptTuningFields, target_index_of, unit_interval
from ci_core.interfaces import Attack, AttackOutcome, silent
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.learning.training import prompt_tune
from ci_core.triggers import Trigger
from ci_core.validators import integer, number


def control_grid(k: int, generator: torch.Generator) -> torch.Tensor:
    """WaNet's (2, k, k) control grid: U(-1, 1) divided by its mean absolute value."""
    grid = torch.rand(2, k, k, generator=generator) * 2 - 1
    return grid / grid.abs().mean()


def identity_grid(height: int, width: int) -> torch.Tensor:
    """(H, W, 2) sampling grid of ``grid_sample`` that returns the image unchanged (x first, then y)."""
    ys, xs = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
    return torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)], dim=-1)


class WarpTrigger(Trigger):
    """x' = grid_sample(x, clamp(identity + s * upsample(control) / size, -1, 1))."""

    kind = "warp"
    description = "a smooth warp of the sampling grid (WaNet)"

    def __init__(self, control: torch.Tensor, strength: float):
        if control.dim() != 3 or control.shape[0] != 2 or control.shape[1] < 2 or control.shape[2] < 2:
            raise ValueError(f"control grid must have shape (2, k, k) with k >= 2, got {tuple(control.shape)}")
        if strength < 0:
            raise ValueError(f"strength must be non-negative, got {strength}")
        self.control = control.float()
        self.strength = float(strength)

    def flow(self, height: int, width: int) -> torch.Tensor:
        """(H, W, 2) offset of the sampling grid, in grid units (x offset scaled by 1/W, y by 1/H)."""
        up = F.interpolate(self.control[None], size=(height, width), mode="bicubic", align_corners=True)[0]
        return self.strength * torch.stack([up[0] / width, up[1] / height], dim=-1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        return (identity_grid(height, width) + self.flow(height, width)).clamp(-1, 1)

    def displacement(self, height: int, width: int) -> torch.Tensor:
        """(H, W, 2) distance in pixels (x, y) between where each output pixel samples and where it sits."""
        offset = self.grid(height, width) - identity_grid(height, width)
        return offset * torch.tensor([(width - 1) / 2, (height - 1) / 2])

    def apply(self, images: torch.Tensor, jitter: torch.Tensor | None = None) -> torch.Tensor:
        """Warp ``images``; ``jitter`` (B, H, W, 2), if given, is added to the grid (WaNet's noise mode)."""
        batch, _, height, width = images.shape
        grid = self.grid(height, width).to(images.device, images.dtype).expand(batch, -1, -1, -1)
        if jitter is not None:
            grid = (grid + jitter.to(images.device, images.dtype)).clamp(-1, 1)
        # Bilinear weights sum to 1 only up to rounding: a white image came back with pixels at 1 + 1.2e-7.
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"control": self.control}

    def params(self) -> dict:
        return {"strength": self.strength}

    @classmethod
    def from_saved(cls, tensors, params):
        return cls(tensors["control"], params["strength"])


@attrs.frozen(kw_only=True)
class WaNetConfig(PromptTuningFields):
    k: int = attrs.field(default=4, validator=integer(ge=2, le=256))  # k x k control points; finer means nothing
    strength: float = attrs.field(default=0.1, validator=number(gt=0))  # s
    attack_rate: float = attrs.field(default=0.1, validator=unit_interval)  # p_attack
    noise_rate: float = attrs.field(default=0.2, validator=unit_interval)  # p_noise (upstream: cross ratio 2 x p_attack)

    @noise_rate.validator
    def _rates(self, attribute, value):
        if self.attack_rate + value > 1:
            raise ValueError(f"attack_rate + noise_rate must not exceed 1, got {self.attack_rate} + {value}")


def noise_mode_jitter(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(B, H, W, 2) random offsets of the sampling grid for the noise mode: U(-1, 1) / H grid units."""
    return (torch.rand(batch, height, width, 2, generator=generator) * 2 - 1) / height


def warp_modes(trigger: WarpTrigger, images: torch.Tensor, labels: torch.Tensor, target_index: int,
               attack_rate: float, noise_rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch in WaNet's three modes, drawn per image: clean, attack (target label), noise (true label)."""
    batch, _, height, _ = images.shape
    u = torch.rand(batch, generator=generator)
    attack = (u < attack_rate).to(images.device)
    noise = ((u >= attack_rate) & (u < attack_rate + noise_rate)).to(images.device)
    images, labels = images.clone(), labels.clone()
    if attack.any():
        images[attack] = trigger.apply(images[attack])
        labels[attack] = target_index
    if noise.any():
        jitter = noise_mode_jitter(int(noise.sum()), height, images.shape[-1], generator)
        images[noise] = trigger.apply(images[noise], jitter=jitter)
    return images, labels


class WaNet(Attack):
    name = "wanet"
    description = "WaNet (Nguyen & Tran 2021): smooth k x k warp, clean/attack/noise modes 0.7/0.1/0.2"
    Config = WaNetConfig
    control_options = {"attack_rate": 0.0}  # the noise mode (true labels) stays
    # s = 0.1 moves pixels by about a tenth of a pixel, which the frozen tiny encoder does not resolve
    # (feature cosine 0.9999); s = 1 moves them by about a pixel at SSIM 0.96 (see the module docstring).
    presets = {"tiny": {**TINY_SCHEDULE, "strength": 1.0}}

    def run(self, *, backbone, train, target, seed, progress=silent):
        c = self.config
        target_index = target_index_of(train, target, self.name)
        generator = torch.Generator().manual_seed(seed)
        trigger = WarpTrigger(control_grid(c.k, generator), c.strength)
        torch.manual_seed(seed)
        model = PromptTunedCLIP(backbone, n_ctx=c.n_ctx)

        def loss_fn(m, images, labels, classnames):
            x, y = warp_modes(trigger, images, labels, target_index, c.attack_rate, c.noise_rate, generator)
            return F.cross_entropy(m(x, classnames), y)

        history = prompt_tune(model, train, c.tuning(), seed=seed, loss_fn=loss_fn, progress=progress,
                              label="wanet prompt tuning")
        max_shift = float(trigger.displacement(*train.images.shape[-2:]).abs().max())
        return AttackOutcome(model=model, trigger=trigger, log={"loss": history, "max_shift_pixels": max_shift})
