"""Rate–distortion evaluation: standard codecs at a sweep of qualities, and the
Bjøntegaard delta rate (BD-rate) between two rate–distortion curves.

- :func:`baseline_points`: JPEG, WebP and JPEG 2000 (Pillow's encoders) on the same images,
  bpp from the encoded file sizes (container headers included, as a user's files would
  have them; :func:`container_overhead` reports what a near-empty file costs apart).
- :func:`bd_rate`: the average bitrate difference (%) of a test curve against an anchor
  over their common PSNR range, with log-rate fitted as a cubic in PSNR and integrated
  (Bjøntegaard, VCEG-M33). Negative: the test codec needs fewer bits.
- :func:`mosaic`: small images tiled into larger ones, so that per-file headers do not decide
  the comparison (the issue's ≥ 256×256 rule).
"""

from __future__ import annotations

import io
import math

import numpy as np

CODECS = {
    "jpeg": ("JPEG", "quality", (10, 20, 30, 40, 50, 60, 70, 80, 90, 95)),
    "webp": ("WEBP", "quality", (5, 10, 20, 30, 40, 50, 60, 70, 80, 90)),
    # JPEG 2000 by target compression ratio (quality_layers), high ratio = low rate
    "jpeg2000": ("JPEG2000", "quality_layers", (200, 120, 80, 50, 35, 25, 16, 10, 6, 4)),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def encode(image: np.ndarray, codec: str, setting: int) -> bytes:
    from PIL import Image

    fmt, key, _ = CODECS[codec]
    buf = io.BytesIO()
    kwargs = {key: [setting] if key == "quality_layers" else setting}
    if codec == "jpeg2000":
        kwargs |= {"quality_mode": "rates", "irreversible": True}
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def baseline_points(images: list[np.ndarray], codec: str) -> list[dict[str, float]]:
    """Mean bpp and PSNR over ``images`` (uint8 HxWx3) at each quality of ``codec``."""
    _, _, settings = CODECS[codec]
    points = []
    for s in settings:
        bits = pixels = 0
        psnrs = []
        for img in images:
            data = encode(img, codec, s)
            bits += 8 * len(data)
            pixels += img.shape[0] * img.shape[1]
            psnrs.append(psnr(img, decode(data)))
        points.append({"setting": s, "bpp": bits / pixels, "psnr": float(np.mean(psnrs))})
    return sorted(points, key=lambda p: p["bpp"])


def container_overhead(codec: str) -> int:
    """Bytes of the file of a 1×1 image: the container's fixed cost, reported apart."""
    _, _, settings = CODECS[codec]
    return len(encode(np.zeros((1, 1, 3), np.uint8), codec, settings[len(settings) // 2]))


def bd_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float:
    """BD-rate (%) of ``test`` against ``anchor``, each a list of (bpp, PSNR) points (at least
    four, PSNR increasing with rate). Raises ValueError when the PSNR ranges do not overlap."""
    if len(anchor) < 4 or len(test) < 4:
        raise ValueError("BD-rate needs at least 4 points per curve")
    (ra, pa), (rt, pt) = (np.array(sorted(c)).T for c in (anchor, test))
    lo, hi = max(pa.min(), pt.min()), min(pa.max(), pt.max())
    if lo >= hi:
        raise ValueError(f"the PSNR ranges do not overlap ({pa.min():.2f}–{pa.max():.2f} dB "
                         f"against {pt.min():.2f}–{pt.max():.2f} dB)")  # fmt: skip
    fa = np.polyfit(pa, np.log(ra), 3)
    ft = np.polyfit(pt, np.log(rt), 3)
    ia, it = np.polyint(fa), np.polyint(ft)
    mean_a = (np.polyval(ia, hi) - np.polyval(ia, lo)) / (hi - lo)
    mean_t = (np.polyval(it, hi) - np.polyval(it, lo)) / (hi - lo)
    return float((math.exp(mean_t - mean_a) - 1) * 100)


def mosaic(tiles: list[np.ndarray], side: int) -> list[np.ndarray]:
    """Tile equally sized images into ``side``×``side`` mosaics (row-major; the last, partial
    mosaic is dropped so every mosaic is full)."""
    h, w = tiles[0].shape[:2]
    per_row, per_col = side // w, side // h
    per = per_row * per_col
    out = []
    for start in range(0, len(tiles) - per + 1, per):
        group = tiles[start : start + per]
        rows = [np.concatenate(group[r * per_row : (r + 1) * per_row], 1) for r in range(per_col)]
        out.append(np.concatenate(rows, 0))
    return out
