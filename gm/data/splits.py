"""Deterministic train/val/test assignment by hashing a stable key.

Each key maps to a number u in [0, 1) from SHA-256; the split is decided by comparing u with the
cumulative fractions. Adding images never moves existing ones: their keys and hashes are unchanged.
"""

from __future__ import annotations

import hashlib

from gm.data.config import DatasetConfig, SplitConfig

SPLITS = ("train", "val", "test")


def unit_hash(key: str, salt: str = "gm-split") -> float:
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(key: str, fractions: SplitConfig) -> str:
    u = unit_hash(key)
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val or fractions.test == 0:
        return "val" if fractions.val > 0 else "train"
    return "test"


def tile_block(tile: tuple[int, int], block: int) -> tuple[int, int]:
    """The (row, col) of the ``block``-square group of tiles holding grid position ``tile``."""
    return tile[0] // block, tile[1] // block


def split_key(source: str, suffix: str, tile: tuple[int, int] | None, cfg: DatasetConfig) -> str:
    """The key an output image's split is hashed from (``cfg.split_by``): its id (``source`` +
    ``suffix``), its source file, or (``block``) the ``split_block``-square group of tiles
    holding grid position ``tile`` = (row, col), e.g. ``"retina.jpg#b2c0"``."""
    if cfg.split_by == "source":
        return source
    if cfg.split_by == "block" and tile is not None:
        row, col = tile_block(tile, cfg.split_block)
        return f"{source}#b{row}c{col}"
    return source + suffix
