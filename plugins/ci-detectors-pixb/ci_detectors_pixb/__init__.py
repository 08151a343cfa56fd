"""Pixel Backdoor as a clip-inspector detector plugin (``pixb``)."""

from ci_detectors_pixb.detector import (
    CostBalancer,
    PixelBackdoor,
    PixelBackdoorConfig,
    count_pixels,
    l0_surrogate,
    prune,
)

__all__ = ["CostBalancer", "PixelBackdoor", "PixelBackdoorConfig", "count_pixels", "l0_surrogate", "prune"]
