"""Image pyramids by 2x2 box filtering, stored as uint8 at every level.

Level k-1 is the mean of each 2x2 block of level k, rounded to the nearest integer with halves
to even (as :func:`numpy.rint`): ``(a + b + c + d + 1 + q % 2) // 4`` with ``q = (a+b+c+d) // 4``.
A 2x2 sum of uint8 values has remainder 0, 1, 2 or 3 mod 4; only remainder 2 is a tie, and
sending ties to the even neighbour keeps the rounding unbiased, so the error does not drift
down the levels (halves always up would add about +1/8 grey level per level).

Every level is uint8, so the whole pyramid is 4/3 of the top level's bytes (the float32 lower
levels gm stored before were about 2.3x). Each level is derived from the stored level above it
(not from the top), so "each level is the box filter of the level above" holds for what is on
disk, and a LAPGAN's residual ``level_k - up(level_{k-1})`` reconstructs ``level_k`` exactly.
"""

from __future__ import annotations

import numpy as np


def box_down(x: np.ndarray) -> np.ndarray:
    """(..., H, W, C) uint8 → (..., H/2, W/2, C) uint8: each 2x2 block's mean, rounded half to
    even. Raises ValueError for an odd height or width, TypeError for a non-uint8 input."""
    *lead, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"box_down needs even height and width, got {h}x{w}")
    if x.dtype != np.uint8:
        raise TypeError(f"box_down takes uint8 images, got {x.dtype}")
    b = x.reshape(*lead, h // 2, 2, w // 2, 2, c).astype(np.uint16)
    s = (b[..., 0, :, 0, :] + b[..., 0, :, 1, :]) + (b[..., 1, :, 0, :] + b[..., 1, :, 1, :])
    q = s >> 2
    return ((s + 1 + (q & 1)) >> 2).astype(np.uint8)


def build_pyramid(top: np.ndarray, min_resolution: int = 4) -> dict[int, np.ndarray]:
    """(..., R, R, C) uint8 → {R: top, R/2: box_down(top), ..., min_resolution: ...}, all uint8.
    Works on one image or a batch."""
    levels: dict[int, np.ndarray] = {top.shape[-2]: top}
    x = top
    while x.shape[-2] > min_resolution:
        x = box_down(x)
        levels[x.shape[-2]] = x
    return levels


def nearest_up(x: np.ndarray) -> np.ndarray:
    """(..., H, W, C) → (..., 2H, 2W, C) by pixel repetition (the inverse layout of box_down)."""
    return x.repeat(2, axis=-3).repeat(2, axis=-2)
