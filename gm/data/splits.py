"""Deterministic train/val/test assignment by hashing a stable key.

Each key maps to a number u in [0, 1) from SHA-256; the split is decided by comparing u with the
cumulative fractions. Adding images never moves existing ones: their keys and hashes are unchanged.
"""

from __future__ import annotations

import hashlib

from gm.data.config import SplitConfig

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
