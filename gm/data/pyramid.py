"""Image pyramids by exact 2x2 box filtering.

Level k-1 is the mean of each 2x2 block of level k. The top level is the uint8 image; lower
levels are float32 in [0, 255] so that the relation is exact (a mean of 4**j uint8 values is a
multiple of 4**-j, which float32 holds exactly for every level gm builds). LAPGAN residuals
(I - up(down(I))) and ProGAN's fade-in of real images rely on it.
"""

from __future__ import annotations

import numpy as np


def box_down(x: np.ndarray) -> np.ndarray:
    """(..., H, W, C) → (..., H/2, W/2, C) float32 mean of 2x2 blocks (exact for pyramid data)."""
    *lead, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"box_down needs even height and width, got {h}x{w}")
    x = x.astype(np.float32, copy=False).reshape(*lead, h // 2, 2, w // 2, 2, c)
    # Sum pairs in a fixed order so the result is bit-reproducible.
    s = (x[..., 0, :, 0, :] + x[..., 0, :, 1, :]) + (x[..., 1, :, 0, :] + x[..., 1, :, 1, :])
    return s * np.float32(0.25)


def build_pyramid(top: np.ndarray, min_resolution: int = 4) -> dict[int, np.ndarray]:
    """(N, R, R, C) uint8 → {R: uint8 top, R/2: float32, ..., min_resolution: float32}."""
    levels: dict[int, np.ndarray] = {top.shape[-2]: top}
    x = top
    while x.shape[-2] > min_resolution:
        x = box_down(x)
        levels[x.shape[-2]] = x
    return levels


def nearest_up(x: np.ndarray) -> np.ndarray:
    """(..., H, W, C) → (..., 2H, 2W, C) by pixel repetition (the inverse layout of box_down)."""
    return x.repeat(2, axis=-3).repeat(2, axis=-2)
