"""SSIM between batches of images (how visible a trigger is)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of two (B, C, H, W) batches in [0, 1], averaged over channels.

    Gaussian window 11/1.5 and constants K1 = 0.01, K2 = 0.03 as in the original;
    the window shrinks to the image for images smaller than it.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    window = min(window, x.shape[-1], x.shape[-2])
    channels = x.shape[1]
    kernel = _gaussian_window(window, sigma).to(x.device, x.dtype).expand(channels, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=channels)  # noqa: E731  (valid convolution)
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))
