"""Paired datasets built from one level of a prepared pyramid.

- ``super_resolution``: ``x{s}.parquet`` per scale with ``hr`` (R×R) and ``lr`` (R/s × R/s) made
  by the documented degradation: optional Gaussian blur → antialiased downsampling → optional
  Gaussian noise (seeded per image) → optional JPEG.
- ``translation``: ``aligned.parquet`` with ``a`` (line-art or grayscale rendering) and ``b``
  (the image); ``unpaired.parquet`` cuts the train split by hash into disjoint A-only and B-only
  halves (``domain`` column) so an unpaired model never sees both sides of one pair.
- ``conditional``: ``pairs.parquet`` with ``image`` and ``label``; every class must occur in the
  train split.

Every table keeps ``id``, ``label``, ``label_name`` and ``split`` of the pyramid rows.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

import gm
from gm.config import to_dict
from gm.data.config import DegradationConfig, PairConfig
from gm.data.images import RESAMPLE
from gm.data.parquet import (
    image_array,
    image_field,
    level_path,
    read_images,
    read_metadata,
    read_table,
    write_table,
)
from gm.data.splits import SPLITS, unit_hash
from gm.errors import DataError
from gm.io import atomic_dir, atomic_path, sha256_file, write_json

KEEP = ["id", "label", "label_name", "split"]


def _seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")


def degrade(hr: np.ndarray, scale: int, cfg: DegradationConfig, key: str) -> np.ndarray:
    """One (R, R, C) uint8 HR image → (R/s, R/s, C) uint8 LR image."""
    r, _, c = hr.shape
    im = Image.fromarray(hr[..., 0] if c == 1 else hr)
    if cfg.blur_sigma > 0:
        im = im.filter(ImageFilter.GaussianBlur(radius=cfg.blur_sigma))
    im = im.resize((r // scale, r // scale), RESAMPLE[cfg.resample])
    lr = np.asarray(im, dtype=np.uint8)
    if cfg.noise_sigma > 0:
        rng = np.random.default_rng(_seed(cfg.seed, key))
        noisy = lr.astype(np.float32) + rng.normal(0.0, cfg.noise_sigma, lr.shape)
        lr = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if cfg.jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(lr).save(buf, format="JPEG", quality=cfg.jpeg_quality)
        lr = np.asarray(Image.open(buf).convert(im.mode), dtype=np.uint8)
    return lr[..., None] if lr.ndim == 2 else lr


def luma(x: np.ndarray) -> np.ndarray:
    """(..., C) [0, 255] → (...) float32 ITU-R 601 luma in [0, 1]."""
    x = x.astype(np.float32) / 255.0
    if x.shape[-1] == 1:
        return x[..., 0]
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def sobel_magnitude(y: np.ndarray) -> np.ndarray:
    """(..., H, W) → gradient magnitude with edge-replicated borders."""
    p = np.pad(y, [(0, 0)] * (y.ndim - 2) + [(1, 1), (1, 1)], mode="edge")

    def s(dy, dx):
        h, w = y.shape[-2:]
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return np.sqrt(gx * gx + gy * gy)


def render_domain_a(images: np.ndarray, kind: str, threshold: float) -> np.ndarray:
    """(N, H, W, C) uint8 → same shape uint8: black lines on white, or grayscale."""
    y = luma(images)
    if kind == "grayscale":
        a = np.rint(y * 255.0).astype(np.uint8)
    else:
        lines = (sobel_magnitude(y) > threshold) | (y < 0.2)
        a = np.where(lines, 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], images.shape[-1], axis=-1)


def _columns(table: pa.Table, idx: np.ndarray | None = None) -> dict[str, pa.Array]:
    t = table if idx is None else table.take(pa.array(idx))
    return {k: t.column(k).combine_chunks() for k in KEEP}


def _table(cols: dict[str, pa.Array], images: dict[str, np.ndarray]) -> pa.Table:
    fields = [pa.field(k, v.type, nullable=False) for k, v in cols.items()]
    arrays = list(cols.values())
    for name, arr in images.items():
        fields.append(image_field(name, arr.shape[1:], arr.dtype))
        arrays.append(image_array(arr))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


@dataclass
class _Source:
    """The top level a paired dataset is built from, read once."""

    table: pa.Table
    images: np.ndarray  # (N, R, R, C) uint8
    ids: list[str]
    splits: np.ndarray  # (N,) str
    classes: list[str]

    def split_counts(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in SPLITS}


@dataclass
class _Output:
    files: list[tuple[str, pa.Table, dict[str, int]]]  # (file name, table, counts)
    previews: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)  # extra manifest entries


def _super_resolution(src: _Source, cfg: PairConfig) -> _Output:
    out = _Output([])
    for s in cfg.scales:
        pairs = zip(src.images, src.ids, strict=True)
        lr = np.stack([degrade(img, s, cfg.degradation, i) for img, i in pairs])
        table = _table(_columns(src.table), {"lr": lr, "hr": src.images})
        out.files.append((f"x{s}.parquet", table, src.split_counts()))
        out.previews[f"x{s}"] = (lr.repeat(s, axis=1).repeat(s, axis=2), src.images)
    return out


def _translation(src: _Source, cfg: PairConfig) -> _Output:
    a = render_domain_a(src.images, cfg.domain_a, cfg.lineart_threshold)
    aligned = _table(_columns(src.table), {"a": a, "b": src.images})
    train = np.flatnonzero(src.splits == "train")
    side_a = np.asarray([unit_hash(src.ids[i], salt="gm-domain") < 0.5 for i in train], bool)
    in_a, in_b = train[side_a], train[~side_a]
    cols = _columns(src.table, np.concatenate([in_a, in_b]))
    cols["domain"] = pa.array(["A"] * len(in_a) + ["B"] * len(in_b), pa.string())
    unpaired = _table(cols, {"image": np.concatenate([a[in_a], src.images[in_b]])})
    return _Output(
        [
            ("aligned.parquet", aligned, src.split_counts()),
            ("unpaired.parquet", unpaired, {"A": len(in_a), "B": len(in_b)}),
        ],
        previews={"aligned": (a, src.images)},
    )


def _conditional(src: _Source, cfg: PairConfig) -> _Output:
    labels = src.table.column("label").to_numpy()
    # (every class has train images: prepare_dataset refuses a dataset where one has none)
    train_counts = np.bincount(labels[src.splits == "train"], minlength=len(src.classes))
    table = _table(_columns(src.table), {"image": src.images})
    counts = dict(zip(src.classes, train_counts.tolist(), strict=True))
    return _Output(
        [("pairs.parquet", table, src.split_counts())], manifest={"train_class_counts": counts}
    )


KINDS = {
    "super_resolution": _super_resolution,
    "translation": _translation,
    "conditional": _conditional,
}


def build_pairs(
    pyramid_dir: str | os.PathLike, out: str | os.PathLike, cfg: PairConfig, name: str = ""
) -> dict:
    """Build the paired dataset ``cfg.kind`` from ``pyramid_dir`` into ``out`` (atomically)."""
    pyramid_dir, out = Path(pyramid_dir), Path(out)
    path = level_path(pyramid_dir, cfg.resolution)
    meta = read_metadata(path)
    levels = [int(f.name.split("x")[0]) for f in pyramid_dir.glob("*x*.parquet")]
    if cfg.resolution != max(levels):
        raise DataError(
            f"{path}: level {cfg.resolution} is not the dataset's top level; pairs need the "
            f"top level ({max(levels)}: set resolution to the dataset's top_resolution)"
        )
    table = read_table(path, None)
    images = read_images(table)
    ids = table.column("id").to_pylist()
    splits = np.asarray(table.column("split").to_pylist())
    src = _Source(table, images, ids, splits, list(meta["classes"]))
    try:  # everything is computed before anything is written
        result = KINDS[cfg.kind](src, cfg)
    except DataError as e:
        raise DataError(f"{pyramid_dir}: {e}") from None
    manifest: dict = {
        "gm_version": gm.__version__,
        "name": name or out.name,
        "kind": cfg.kind,
        "dataset": cfg.dataset,
        "resolution": cfg.resolution,
        "classes": src.classes,
        "config": to_dict(cfg),
        "files": {},
        **result.manifest,
    }
    with atomic_dir(out) as tmp:
        for fname, t, counts in result.files:
            _write(tmp, fname, t, manifest, counts)
        write_json(tmp / "manifest.json", manifest)
        for key, (first, second) in result.previews.items():
            _preview(tmp / f"preview_{key}.png", first, second)
    return manifest


def _write(tmp: Path, fname: str, table: pa.Table, manifest: dict, counts: dict) -> None:
    write_table(
        tmp / fname,
        table,
        {"kind": manifest["kind"], "dataset": manifest["dataset"], "classes": manifest["classes"]},
    )
    manifest["files"][fname] = {
        "rows": table.num_rows,
        "counts": counts,
        "sha256": sha256_file(tmp / fname),
    }


def _preview(path: Path, first: np.ndarray, second: np.ndarray, n: int = 8) -> None:
    """Two rows: inputs (upscaled by repetition) over targets."""
    n = min(n, len(first))
    if n == 0:
        return
    grid = np.concatenate([np.concatenate(list(first[:n]), 1), np.concatenate(list(second[:n]), 1)])
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(grid.astype(np.uint8)).save(tmp, format="PNG")
