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
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

import gm
from gm.config import to_dict
from gm.data.config import DegradationConfig, PairConfig
from gm.data.images import RESAMPLE
from gm.data.parquet import (
    GroupedWriter,
    decode_images,
    image_array,
    image_field,
    image_fields,
    level_path,
    read_metadata,
    row_group_rows,
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


BATCH_BYTES = 32 << 20  # top-level image bytes read per batch


def _keep(table: pa.Table) -> list[pa.Array]:
    return [table.column(k).combine_chunks() for k in KEEP]


class _Out:
    """One output file: a :class:`GroupedWriter` of the KEEP columns plus uint8 image columns
    ``images`` ({name: (H, W, C)}), in row groups of about 64 MiB."""

    def __init__(self, path: Path, keep: pa.Schema, images: dict[str, tuple[int, ...]],
                 meta: dict, extra: dict[str, pa.DataType] | None = None):  # fmt: skip
        fields = [pa.field(k, keep.field(k).type, nullable=False) for k in KEEP]
        fields += [pa.field(k, t, nullable=False) for k, t in (extra or {}).items()]
        fields += [image_field(k, shape, np.uint8) for k, shape in images.items()]
        width = sum(int(np.prod(shape)) for shape in images.values())
        self.path, self.names = path, list(images)
        self.w = GroupedWriter(path, pa.schema(fields), meta, row_group_rows(width))
        self.counts: dict[str, int] = {}

    def add(self, keep: list[pa.Array], images: dict[str, np.ndarray], extra=()) -> None:
        arrays = [*keep, *extra, *(image_array(images[k]) for k in self.names)]
        self.w.append(pa.Table.from_arrays(arrays, schema=self.w.schema))

    def close(self) -> None:
        self.w.close()


class _Kind:
    """A paired dataset kind, built batch by batch from the top level (module docstring)."""

    def __init__(self, tmp: Path, cfg: PairConfig, keep: pa.Schema, shape, meta: dict):
        self.tmp, self.cfg, self.keep, self.shape, self.meta = tmp, cfg, keep, shape, meta
        self.files: dict[str, _Out] = {}
        self.previews: dict[str, list[np.ndarray]] = {}
        self.manifest: dict = {}

    def preview(self, key: str, first: np.ndarray, second: np.ndarray, n: int = 8) -> None:
        have = self.previews.setdefault(key, [first[:0], second[:0]])
        k = n - len(have[0])
        if k > 0:
            have[0] = np.concatenate([have[0], first[:k]])
            have[1] = np.concatenate([have[1], second[:k]])

    def finish(self) -> dict[str, dict[str, int]]:
        """{file name: counts} after every batch."""
        for f in self.files.values():
            f.close()
        return {name: f.counts for name, f in self.files.items()}


def _split_counts(out: _Out, splits: list[str]) -> None:
    for s in SPLITS:
        out.counts[s] = out.counts.get(s, 0) + splits.count(s)


class _SuperResolution(_Kind):
    def __init__(self, *a):
        super().__init__(*a)
        r, c = self.shape[0], self.shape[2]
        for s in self.cfg.scales:
            self.files[f"x{s}.parquet"] = _Out(self.tmp / f"x{s}.parquet", self.keep,
                                               {"lr": (r // s, r // s, c), "hr": self.shape},
                                               self.meta)  # fmt: skip

    def add(self, keep, images, ids, splits) -> None:
        for s in self.cfg.scales:
            lr = np.stack([degrade(img, s, self.cfg.degradation, i) for img, i in
                           zip(images, ids, strict=True)])  # fmt: skip
            out = self.files[f"x{s}.parquet"]
            out.add(keep, {"lr": lr, "hr": images})
            _split_counts(out, splits)
            self.preview(f"x{s}", lr.repeat(s, axis=1).repeat(s, axis=2), images)


class _Translation(_Kind):
    """``unpaired.parquet`` lists the A half of the train split, then the B half: B rows wait
    in a temporary file until every batch is read (bounded memory)."""

    def __init__(self, *a):
        super().__init__(*a)
        extra = {"domain": pa.string()}
        both, one = {"a": self.shape, "b": self.shape}, {"image": self.shape}
        self.files["aligned.parquet"] = _Out(self.tmp / "aligned.parquet", self.keep, both,
                                             self.meta)  # fmt: skip
        self.files["unpaired.parquet"] = _Out(self.tmp / "unpaired.parquet", self.keep, one,
                                              self.meta, extra)  # fmt: skip
        self.side_b = _Out(self.tmp / ".unpaired-B.parquet", self.keep, {"image": self.shape},
                           self.meta, extra)  # fmt: skip

    def add(self, keep, images, ids, splits) -> None:
        a = render_domain_a(images, self.cfg.domain_a, self.cfg.lineart_threshold)
        aligned = self.files["aligned.parquet"]
        aligned.add(keep, {"a": a, "b": images})
        _split_counts(aligned, splits)
        self.preview("aligned", a, images)
        train = np.flatnonzero(np.asarray(splits) == "train")
        side_a = np.asarray([unit_hash(ids[i], salt="gm-domain") < 0.5 for i in train], bool)
        unpaired = self.files["unpaired.parquet"]
        halves = ((unpaired, train[side_a], a, "A"), (self.side_b, train[~side_a], images, "B"))
        for out, rows, images_of, domain in halves:
            if len(rows):
                idx = pa.array(rows)
                cols = [k.take(idx) for k in keep]
                out.add(cols, {"image": images_of[rows]}, [pa.array([domain] * len(rows))])
                out.counts[domain] = out.counts.get(domain, 0) + len(rows)

    def finish(self) -> dict[str, dict[str, int]]:
        self.side_b.close()
        unpaired = self.files["unpaired.parquet"]
        f = pq.ParquetFile(self.side_b.path)
        for g in range(f.num_row_groups):
            unpaired.w.append(f.read_row_group(g).cast(unpaired.w.schema))
        unpaired.counts["B"] = self.side_b.counts.get("B", 0)
        unpaired.counts = {"A": unpaired.counts.get("A", 0), "B": unpaired.counts["B"]}
        self.side_b.path.unlink()
        return super().finish()


class _Conditional(_Kind):
    def __init__(self, *a):
        super().__init__(*a)
        self.files["pairs.parquet"] = _Out(self.tmp / "pairs.parquet", self.keep,
                                           {"image": self.shape}, self.meta)  # fmt: skip
        self.train_counts = np.zeros(len(self.meta["classes"]), np.int64)

    def add(self, keep, images, ids, splits) -> None:
        out = self.files["pairs.parquet"]
        out.add(keep, {"image": images})
        _split_counts(out, splits)
        labels = keep[KEEP.index("label")].to_numpy()
        train = np.asarray(splits) == "train"
        self.train_counts += np.bincount(labels[train], minlength=len(self.train_counts))

    def finish(self):
        # (every class has train images: prepare_dataset refuses a dataset where one has none)
        counts = self.train_counts.tolist()
        self.manifest["train_class_counts"] = dict(zip(self.meta["classes"], counts, strict=True))
        return super().finish()


KINDS = {
    "super_resolution": _SuperResolution,
    "translation": _Translation,
    "conditional": _Conditional,
}


def build_pairs(
    pyramid_dir: str | os.PathLike, out: str | os.PathLike, cfg: PairConfig, name: str = ""
) -> dict:
    """Build the paired dataset ``cfg.kind`` from ``pyramid_dir`` into ``out`` (atomically),
    reading the top level a batch at a time (about 32 MiB of images): memory is bounded by a
    batch and one row group per output file, whatever the dataset's size."""
    pyramid_dir, out = Path(pyramid_dir), Path(out)
    path = level_path(pyramid_dir, cfg.resolution)
    meta = read_metadata(path)
    levels = [int(f.name.split("x")[0]) for f in pyramid_dir.glob("*x*.parquet")]
    if cfg.resolution != max(levels):
        raise DataError(
            f"{path}: level {cfg.resolution} is not the dataset's top level; pairs need the "
            f"top level ({max(levels)}: set resolution to the dataset's top_resolution)"
        )
    field = image_fields(path, ("image",))["image"]
    shape = tuple(json.loads(field.metadata[b"shape"]))
    source = pq.ParquetFile(path)
    classes = list(meta["classes"])
    file_meta = {"kind": cfg.kind, "dataset": cfg.dataset, "classes": classes}
    rows = max(1, BATCH_BYTES // field.type.byte_width)
    with atomic_dir(out) as tmp:
        kind = KINDS[cfg.kind](tmp, cfg, source.schema_arrow, shape, file_meta)
        for batch in source.iter_batches(batch_size=rows, columns=[*KEEP, "image"]):
            table = pa.Table.from_batches([batch])
            images = decode_images(table.column("image"), field)
            ids, splits = table.column("id").to_pylist(), table.column("split").to_pylist()
            kind.add(_keep(table), images, ids, splits)
        counts = kind.finish()
        manifest: dict = {
            "gm_version": gm.__version__,
            "name": name or out.name,
            "kind": cfg.kind,
            "dataset": cfg.dataset,
            "resolution": cfg.resolution,
            "classes": classes,
            "config": to_dict(cfg),
            "files": {
                fname: {
                    "rows": int(sum(c.values())),
                    "counts": c,
                    "sha256": sha256_file(tmp / fname),
                }
                for fname, c in counts.items()
            },  # fmt: skip
            **kind.manifest,
        }
        write_json(tmp / "manifest.json", manifest)
        for key, (first, second) in kind.previews.items():
            _preview(tmp / f"preview_{key}.png", first, second)
    return manifest


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
