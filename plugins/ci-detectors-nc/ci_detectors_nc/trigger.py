"""Neural Cleanse's trigger: a mask that blends a pattern into the image."""

from __future__ import annotations

import torch

from ci_core.errors import DataError
from ci_core.triggers import Trigger


def _check(mask: torch.Tensor, pattern: torch.Tensor) -> None:
    if mask.dim() != 3 or mask.shape[0] != 1:
        raise ValueError(f"mask must have shape (1, H, W), got {tuple(mask.shape)}")
    if pattern.dim() != 3 or pattern.shape[0] != 3:
        raise ValueError(f"pattern must have shape (3, H, W), got {tuple(pattern.shape)}")
    if mask.shape[1:] != pattern.shape[1:]:
        raise ValueError(f"mask {tuple(mask.shape)} and pattern {tuple(pattern.shape)} cover different image sizes")
    for label, t in (("mask", mask), ("pattern", pattern)):
        if not t.is_floating_point():
            raise ValueError(f"{label} must be a floating-point tensor, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label} has non-finite values")
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError(f"{label} values must lie in [0, 1], got [{float(t.min()):.4g}, {float(t.max()):.4g}]")


class MaskPatternTrigger(Trigger):
    """x' = (1 - mask) * x + mask * pattern, with mask (1, H, W) and pattern (3, H, W) in [0, 1]."""

    kind = "mask-pattern"
    description = "(1 - mask) x + mask pattern (Neural Cleanse)"

    def __init__(self, mask: torch.Tensor, pattern: torch.Tensor):
        _check(mask, pattern)
        self.mask = mask
        self.pattern = pattern

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != self.mask.shape[-2:]:
            raise ValueError(f"trigger is {tuple(self.mask.shape[-2:])} pixels but the images are {tuple(images.shape[-2:])}")
        mask = self.mask.to(images.device, images.dtype)
        pattern = self.pattern.to(images.device, images.dtype)
        return ((1 - mask) * images + mask * pattern).clamp(0, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask, "pattern": self.pattern}

    @property
    def l1(self) -> float:
        """Neural Cleanse's trigger size: the l1 norm of the mask."""
        return float(self.mask.abs().sum())

    @classmethod
    def from_saved(cls, tensors, params):
        missing = sorted({"mask", "pattern"} - set(tensors))
        if missing:
            raise DataError(f"a {cls.kind!r} trigger needs tensors 'mask' and 'pattern'; missing {missing}")
        try:
            return cls(tensors["mask"], tensors["pattern"])
        except ValueError as exc:
            raise DataError(f"invalid {cls.kind!r} trigger: {exc}") from exc
