"""Decode one user image into a square uint8 array under the documented policies.

Colour policy (docs/data.md): EXIF orientation is applied; the first frame of animated or
multi-page files is used; alpha (RGBA, LA, palette transparency) is composited onto
``background``; CMYK and YCbCr are converted to RGB; 16-bit images are mapped linearly to 8 bits
(v / 257); 1-bit images become 0/255; floating-point images are rejected. The result has
``channels`` channels (RGB or ITU-R 601 luma).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gm.data.config import DatasetConfig

RESAMPLE = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# Guard against decompression bombs explicitly rather than through a PIL warning.
MAX_PIXELS = 16384 * 16384


class BadImage(Exception):
    """An input the policy may skip. ``kind`` selects the policy: invalid, undersize."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def decode(data: bytes | str, channels: int, background: tuple[int, ...]) -> np.ndarray:
    """Bytes or a path → (H, W, channels) uint8. Raises BadImage('invalid', why)."""
    src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(src)
            if im.width * im.height > MAX_PIXELS:
                raise BadImage("invalid", f"too large ({im.width}x{im.height} pixels)")
            im.seek(0)
            im.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("invalid", "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise BadImage("invalid", f"corrupt or truncated image ({e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the pixels
        pass
    return _to_array(im, channels, background)


def _to_array(im: Image.Image, channels: int, background: tuple[int, ...]) -> np.ndarray:
    mode = im.mode
    if mode == "F":
        raise BadImage("invalid", "floating-point image (mode F) is not supported")
    if mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N: 16-bit (or int32) grayscale
        a = np.asarray(im, dtype=np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise BadImage("invalid", f"integer image (mode {mode}) outside the 16-bit range")
        a = np.rint(a / 257.0).astype(np.uint8)
        im = Image.fromarray(a, mode="L")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode in ("LA", "RGBA", "RGBa", "La"):
        im = im.convert("RGBA")
        flat = Image.new("RGBA", im.size, tuple(background) + (255,))
        flat.alpha_composite(im)
        im = flat.convert("RGB")
    im = im.convert("L" if channels == 1 else "RGB")
    a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _resize(a: np.ndarray, size: int, resample: str) -> np.ndarray:
    if a.shape[0] == size and a.shape[1] == size:
        return a
    im = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
    out = np.asarray(im.resize((size, size), RESAMPLE[resample]), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


@dataclass(frozen=True)
class Square:
    suffix: str  # "" for the whole image, "#r{row}c{col}" for a tile
    pixels: np.ndarray  # (top, top, channels) uint8


def fit_square(a: np.ndarray, cfg: DatasetConfig) -> Iterator[Square]:
    """Apply ``cfg.fit`` and ``cfg.undersize``; yields one square (or several tiles)."""
    top = cfg.top_resolution
    h, w = a.shape[:2]
    if cfg.fit == "tile":
        if min(h, w) < top:
            if cfg.undersize != "upscale":
                raise BadImage("undersize", f"smaller ({w}x{h}) than one {top}x{top} tile")
            yield Square("", _resize(_crop_center(a), top, cfg.resample))
            return
        rows, cols = h // top, w // top
        y0, x0 = (h - rows * top) // 2, (w - cols * top) // 2
        for r in range(rows):
            for c in range(cols):
                y, x = y0 + r * top, x0 + c * top
                yield Square(f"#r{r}c{c}", np.ascontiguousarray(a[y : y + top, x : x + top]))
        return
    if h != w:
        if cfg.fit == "reject":
            raise BadImage("invalid", f"not square ({w}x{h}) and fit is 'reject'")
        a = _crop_center(a) if cfg.fit == "center_crop" else _pad(a, cfg.background)
    side = a.shape[0]
    if side < top and cfg.undersize != "upscale":
        raise BadImage("undersize", f"smaller ({side}x{side}) than top_resolution {top}")
    yield Square("", _resize(a, top, cfg.resample))


def _crop_center(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.ascontiguousarray(a[y : y + s, x : x + s])


def _pad(a: np.ndarray, background: tuple[int, ...]) -> np.ndarray:
    h, w, c = a.shape
    s = max(h, w)
    fill = np.asarray(background, dtype=np.uint8)
    if c == 1:  # luma of the background colour, as PIL converts
        r, g, b = (int(v) for v in background)
        fill = np.asarray([(r * 299 + g * 587 + b * 114 + 500) // 1000], dtype=np.uint8)
    out = np.empty((s, s, c), dtype=np.uint8)
    out[:] = fill
    y, x = (s - h) // 2, (s - w) // 2
    out[y : y + h, x : x + w] = a
    return out
