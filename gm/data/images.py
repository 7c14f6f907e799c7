"""Decode one user image into a square uint8 array under the documented policies.

Colour policy (docs/data.md): EXIF orientation is applied; the first frame of animated or
multi-page files is used; transparency in every PNG form (alpha channel, palette alpha, tRNS
colour key) and in RGBA/LA images of other formats is composited onto ``background``; CMYK and
YCbCr are converted to RGB; 16-bit images are mapped linearly to 8 bits (v / 257); 1-bit images
become 0/255; floating-point images are rejected. The result has ``channels`` channels (RGB or
ITU-R 601 luma). Images larger than 16384x16384 pixels are refused from their header.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
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

# The documented limit (docs/data.md), checked from the header before any pixel is decoded.
# Pillow's own guard (a warning above Image.MAX_IMAGE_PIXELS, about 89 Mpx, and an exception
# above twice that) is switched off while gm opens an image, so this is the only limit.
MAX_SIDE = 16384
MAX_PIXELS = MAX_SIDE * MAX_SIDE
_PIL_LIMIT = threading.Lock()


class BadImage(Exception):
    """An input the policy may skip. ``kind`` selects the policy: invalid, undersize."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@contextlib.contextmanager
def _own_size_limit():
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode(data: bytes | str, channels: int, background: tuple[int, ...]) -> np.ndarray:
    """Bytes or a path → (H, W, channels) uint8 under the colour policy above.

    Raises BadImage('invalid', why) for every failure to decode this one image, whatever the
    imaging library raises (unrecognised format, truncated or corrupt data, a header larger
    than MAX_SIDE x MAX_SIDE pixels, an unsupported mode, an unreadable file): ``why`` names
    the real cause, so the ``on_invalid`` policy applies to it like to any bad file."""
    src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        with _own_size_limit():
            im = Image.open(src)  # lazy: reads the header only
        w, h = im.size
        if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
            raise BadImage(
                "invalid", f"too large: the header declares {w}x{h} pixels, above the "
                f"{MAX_SIDE}x{MAX_SIDE} limit (checked before decoding)"
            )  # fmt: skip
        im.seek(0)
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the pixels
            pass
        return _to_array(im, channels, background)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("invalid", "not an image (unrecognised format)") from None
    except OSError as e:
        if e.errno is not None:  # the file itself: missing, a folder, no permission ...
            raise BadImage("invalid", f"cannot be read ({e.strerror})") from None
        raise BadImage("invalid", f"corrupt or truncated image ({e})") from None
    except (SyntaxError, EOFError) as e:
        raise BadImage("invalid", f"corrupt or truncated image ({e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this image's, named
        raise BadImage("invalid", f"cannot be decoded ({type(e).__name__}: {e})") from None


def _colour_key_mask(im: Image.Image) -> np.ndarray | None:
    """(H, W) bool, True where a PNG tRNS colour key marks the pixel transparent, for images
    without an alpha channel (greyscale, 1-bit, 16-bit, RGB); None when there is no key.
    Palette transparency is converted to alpha by PIL itself (mode P)."""
    key = im.info.get("transparency")
    if key is None or im.mode in ("P", "PA") or isinstance(key, bytes):
        return None
    raw = np.asarray(im)
    if raw.ndim == 3:  # RGB: every channel equals the key's
        k = np.asarray(key, dtype=raw.dtype).reshape(1, 1, -1)[..., : raw.shape[2]]
        return (raw == k).all(axis=2)
    if raw.dtype == bool:  # 1-bit: the key is 0 or 1 (or 255 for white)
        return raw == bool(key)
    return raw == key


def _to_array(im: Image.Image, channels: int, background: tuple[int, ...]) -> np.ndarray:
    mode = im.mode
    if mode == "F":
        raise BadImage("invalid", "floating-point image (mode F) is not supported")
    keyed = _colour_key_mask(im)
    if keyed is not None:
        im.info.pop("transparency")  # applied below, as the mask
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
    a = a[..., None] if a.ndim == 2 else a
    if keyed is not None:
        a = a.copy()
        a[keyed] = background_fill(background, a.shape[2])
    return a


def background_fill(background: tuple[int, ...], channels: int) -> np.ndarray:
    """The background colour as ``channels`` uint8 values: RGB, or its luma as PIL computes
    it (ITU-R 601) for greyscale."""
    if channels == 1:
        r, g, b = (int(v) for v in background)
        return np.asarray([(r * 299 + g * 587 + b * 114 + 500) // 1000], dtype=np.uint8)
    return np.asarray(background, dtype=np.uint8)


def _resize(a: np.ndarray, size: int, resample: str) -> np.ndarray:
    if a.shape[0] == size and a.shape[1] == size:
        return a
    im = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
    out = np.asarray(im.resize((size, size), RESAMPLE[resample]), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


_TILE_SUFFIX = re.compile(r"#r(\d+)c(\d+)$")


def tile_suffix(row: int, col: int) -> str:
    """The id suffix of the tile at grid position (row, col) of its photo: ``#r{row}c{col}``."""
    return f"#r{row}c{col}"


def tile_position(image_id: str) -> tuple[int, int] | None:
    """(row, col) of a tile from its id (``source#r<row>c<col>``, :func:`tile_suffix`); None
    for the id of a whole image."""
    m = _TILE_SUFFIX.search(image_id)
    return None if m is None else (int(m[1]), int(m[2]))


@dataclass(frozen=True)
class Square:
    suffix: str  # "" for the whole image, tile_suffix(row, col) for a tile
    pixels: np.ndarray  # (top, top, channels) uint8
    tile: tuple[int, int] | None = None  # (row, col) in the photo's tile grid; None: whole


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
                tile = np.ascontiguousarray(a[y : y + top, x : x + top])
                yield Square(tile_suffix(r, c), tile, (r, c))
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
    out = np.empty((s, s, c), dtype=np.uint8)
    out[:] = background_fill(background, c)
    y, x = (s - h) // 2, (s - w) // 2
    out[y : y + h, x : x + w] = a
    return out
