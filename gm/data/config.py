"""Configuration of the data stages: one ``datasets.<name>`` and one ``pairs.<name>`` section each.

Field comments are the documentation of each key; ``docs/data.md`` explains the policies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gm.config import check

Resample = Literal["box", "bilinear", "bicubic", "lanczos"]


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.8  # share of ids hashed into train
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self):
        for name in ("train", "val", "test"):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        check(
            abs(self.train + self.val + self.test - 1.0) < 1e-9,
            "train",
            f"train + val + test must sum to 1, got {self.train + self.val + self.test:g}",
        )


@dataclass(frozen=True)
class DatasetConfig:
    """How one raw folder ``data/<name>`` becomes a multi-resolution Parquet dataset."""

    top_resolution: int = 64  # largest side of the pyramid; a power of two >= 4
    channels: Literal[1, 3] = 3  # 1: luma (ITU-R 601), 3: RGB
    # Geometry: center_crop = largest central square; pad = pad to a square with `background`;
    # tile = cut non-overlapping top_resolution tiles at native scale (photos for SR/codecs);
    # reject = non-square images are invalid inputs (see on_invalid).
    fit: Literal["center_crop", "pad", "tile", "reject"] = "center_crop"
    # Images smaller than top_resolution after `fit`: skip (listed in the manifest),
    # upscale (resampled up with `resample`), or error (stop naming the file).
    undersize: Literal["skip", "upscale", "error"] = "skip"
    # Corrupt, truncated, non-image or unsupported files: skip (listed) or error.
    on_invalid: Literal["skip", "error"] = "skip"
    # A class folder with no usable image: error, or drop the class.
    empty_class: Literal["error", "drop"] = "error"
    background: tuple[int, ...] = (255, 255, 255)  # RGB used to flatten alpha and to pad
    resample: Resample = "lanczos"  # filter used to resize to top_resolution
    split: SplitConfig = field(default_factory=SplitConfig)
    # What the split hash is taken of: image = each output image's id; source = its source
    # file, so all tiles of one photo land in the same split (no leakage across splits);
    # block = a split_block x split_block group of neighbouring tiles of one photo (fit: tile),
    # so held-out images are contiguous regions of the photos (rd's layout: blocks).
    split_by: Literal["image", "source", "block"] = "image"
    split_block: int = 4  # tiles per side of a block (split_by: block)

    def __post_init__(self):
        check(
            is_power_of_two(self.top_resolution) and self.top_resolution >= 4,
            "top_resolution",
            f"{self.top_resolution} is not a power of two >= 4",
        )
        check(self.top_resolution <= 4096, "top_resolution", "must be <= 4096")
        check(self.split_block >= 1, "split_block", f"{self.split_block} is not >= 1")
        check(
            self.split_by != "block" or self.fit == "tile",
            "split_by",
            f"'block' groups tiles, and fit is {self.fit!r} (set fit: tile)",
        )
        check(
            len(self.background) == 3 and all(0 <= v <= 255 for v in self.background),
            "background",
            f"{list(self.background)} is not three integers in [0, 255]",
        )

    @property
    def resolutions(self) -> list[int]:
        """4, 8, ..., top_resolution."""
        return [2**k for k in range(2, self.top_resolution.bit_length())]


@dataclass(frozen=True)
class DegradationConfig:
    """Low-resolution images from high-resolution ones, in this order (docs/data.md)."""

    blur_sigma: float = 0.0  # Gaussian blur of the HR image before downsampling (pixels); 0 = off
    resample: Resample = "bicubic"  # downsampling filter (antialiased, as PIL resize)
    noise_sigma: float = 0.0  # additive Gaussian noise on the LR image, in 0..255 units; 0 = off
    jpeg_quality: int = 0  # JPEG-compress the LR image at this quality (1..95); 0 = off
    seed: int = 0  # noise is seeded by (seed, image id): the same pair on every run

    def __post_init__(self):
        check(self.blur_sigma >= 0, "blur_sigma", "must be >= 0")
        check(self.noise_sigma >= 0, "noise_sigma", "must be >= 0")
        check(
            self.jpeg_quality == 0 or 1 <= self.jpeg_quality <= 95,
            "jpeg_quality",
            f"{self.jpeg_quality} is not 0 (off) or in 1..95",
        )


@dataclass(frozen=True)
class PairConfig:
    """One paired dataset built from a prepared pyramid."""

    kind: Literal["super_resolution", "translation", "conditional"]
    dataset: str  # name of the `datasets` entry it reads
    resolution: int  # pyramid level used (the HR size for super_resolution)
    # super_resolution: upscaling factors; LR side = resolution / scale
    scales: tuple[int, ...] = (2, 4)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    # translation: domain A is derived from the image (B): lineart = edges and dark outlines
    # in black on white; grayscale = luma. Aligned pairs in aligned.parquet; the train split is
    # also cut by hash into disjoint A-only and B-only halves in unpaired.parquet (CycleGAN).
    domain_a: Literal["lineart", "grayscale"] = "lineart"
    lineart_threshold: float = (
        0.25  # Sobel magnitude (image in [0, 1]) above which a pixel is a line
    )

    def __post_init__(self):
        check(
            is_power_of_two(self.resolution) and self.resolution >= 4,
            "resolution",
            f"{self.resolution} is not a power of two >= 4",
        )
        check(len(self.scales) > 0, "scales", "needs at least one scale")
        for i, s in enumerate(self.scales):
            check(s in (2, 4, 8), f"scales[{i}]", f"{s} is not one of 2, 4, 8")
            check(
                self.resolution // s >= 2, f"scales[{i}]", f"x{s} of {self.resolution} is too small"
            )
        check(0 < self.lineart_threshold < 4, "lineart_threshold", "must be in (0, 4)")
