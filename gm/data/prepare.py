"""Raw images → multi-resolution Parquet dataset (one file per level) with a manifest.

Input is a folder with one subfolder per class (images directly in the folder form one class
named after it), or a folder of Parquet tables with an ``image`` column of encoded bytes and an
optional ``label`` (class name) and ``id`` column. Output (written atomically)::

    out/4x4.parquet ... out/{R}x{R}.parquet   id, source, label, label_name, split, image
    out/manifest.json                          counts, classes, mean/std, hashes, skipped inputs
    out/preview.png                            a few images at every level
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import gm
from gm.config import to_dict
from gm.data.config import DatasetConfig
from gm.data.images import BadImage, decode, fit_square
from gm.data.parquet import image_array, image_field, level_file, write_table
from gm.data.pyramid import build_pyramid
from gm.data.splits import SPLITS, assign_split
from gm.errors import DataError
from gm.io import atomic_dir, atomic_path, sha256_file, write_json

IMAGE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
}


@dataclass(frozen=True)
class RawItem:
    id: str  # stable id: path relative to the raw folder (or file:row for Parquet input)
    class_name: str
    load: Callable[[], bytes | str]  # the encoded bytes, or a path PIL can open


def scan(raw: Path) -> tuple[list[RawItem], list[str], list[dict[str, str]]]:
    """List a raw folder: (items, class names incl. empty ones, skipped entries)."""
    if not raw.is_dir():
        raise DataError(f"{raw}: raw data folder does not exist (run `gm data materialize`?)")
    tables = sorted(p for p in raw.iterdir() if p.suffix == ".parquet")
    if tables:
        return _scan_parquet(raw, tables)
    return _scan_folder(raw)


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _scan_folder(raw: Path) -> tuple[list[RawItem], list[str], list[dict[str, str]]]:
    skipped: list[dict[str, str]] = []
    entries = sorted(p for p in raw.iterdir() if _visible(p, raw))
    class_dirs = [p for p in entries if p.is_dir()]
    if class_dirs:
        classes = [d.name for d in class_dirs]
        files = [(d.name, f) for d in class_dirs for f in sorted(d.rglob("*")) if f.is_file()]
        for p in entries:
            if p.is_file():
                skipped.append({"path": p.name, "reason": "file outside a class folder"})
    else:
        files = [(raw.name, p) for p in entries if p.is_file()]
        if not files:
            raise DataError(
                f"{raw}: the dataset folder is empty (no class folders and no image files); "
                "put images in it, one sub-folder per class for a conditional dataset"
            )
        classes = [raw.name]
    items = []
    for cls, f in files:
        if not _visible(f, raw):
            continue
        rel = f.relative_to(raw).as_posix()
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"path": rel, "reason": f"not an image file (suffix {f.suffix!r})"})
            continue
        items.append(RawItem(rel, cls, lambda f=f: str(f)))
    return items, classes, skipped


def _scan_parquet(raw: Path, tables: list[Path]) -> tuple[list[RawItem], list[str], list]:
    items: list[RawItem] = []
    for path in tables:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{path}: not a readable Parquet table ({e})") from None
        if "image" not in table.column_names:
            raise DataError(f"{path}: Parquet input needs an 'image' column of encoded bytes")
        images = table.column("image").to_pylist()
        labels = (
            table.column("label").to_pylist()
            if "label" in table.column_names
            else [raw.name] * len(images)
        )
        ids = (
            [str(i) for i in table.column("id").to_pylist()]
            if "id" in table.column_names
            else [f"{path.name}:{i}" for i in range(len(images))]
        )
        for i, (img, label, id_) in enumerate(zip(images, labels, ids, strict=True)):
            if not isinstance(img, bytes):
                raise DataError(f"{path}: row {i}: 'image' must hold encoded image bytes")
            items.append(RawItem(id_, str(label), lambda img=img: img))
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise DataError(f"{raw}: duplicate id {it.id!r} in Parquet input")
        seen.add(it.id)
    classes = sorted({it.class_name for it in items})
    return items, classes, []


@dataclass
class Decoded:
    ids: list[str]
    sources: list[str]
    class_names: list[str]
    pixels: np.ndarray  # (N, R, R, C) uint8


def decode_all(
    items: list[RawItem], cfg: DatasetConfig, skipped: list[dict[str, str]], progress: bool
) -> Decoded:
    ids, sources, classes, squares = [], [], [], []
    for item in tqdm(items, desc="decode", unit="img", disable=not progress, mininterval=1.0):
        try:
            arr = decode(item.load(), cfg.channels, cfg.background)
            out = list(fit_square(arr, cfg))
        except BadImage as e:
            policy = cfg.undersize if e.kind == "undersize" else cfg.on_invalid
            if policy == "error":
                raise DataError(f"{item.id}: {e.reason}") from None
            skipped.append({"path": item.id, "reason": e.reason})
            continue
        for sq in out:
            ids.append(item.id + sq.suffix)
            sources.append(item.id)
            classes.append(item.class_name)
            squares.append(sq.pixels)
    r, c = cfg.top_resolution, cfg.channels
    pixels = np.stack(squares) if squares else np.empty((0, r, r, c), np.uint8)
    return Decoded(ids, sources, classes, pixels)


def content_hash(ids: list[str], labels: np.ndarray, splits: list[str], pixels: np.ndarray) -> str:
    """SHA-256 of the dataset's content (independent of the Parquet encoding)."""
    h = hashlib.sha256()
    for i, id_ in enumerate(ids):
        h.update(f"{id_}\0{int(labels[i])}\0{splits[i]}\0".encode())
        h.update(pixels[i].tobytes())
    return h.hexdigest()


def channel_stats(pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    if len(pixels) == 0:
        return [], []
    x = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / 255.0
    return [round(float(v), 6) for v in x.mean(0)], [round(float(v), 6) for v in x.std(0)]


def prepare_dataset(
    raw: str | os.PathLike,
    out: str | os.PathLike,
    cfg: DatasetConfig,
    name: str | None = None,
    progress: bool = True,
) -> dict:
    """Build the pyramid dataset of ``raw`` into ``out``; returns the manifest."""
    raw, out = Path(raw), Path(out)
    name = name or raw.name
    items, class_names, skipped = scan(raw)
    dec = decode_all(items, cfg, skipped, progress)

    present = set(dec.class_names)
    empty = [c for c in class_names if c not in present]
    flat = class_names == [raw.name] and not (raw / raw.name).is_dir()  # one unnamed class
    if empty and flat:
        detail = f" ({len(skipped)} skipped, e.g. {skipped[0]['path']}: {skipped[0]['reason']})"
        raise DataError(f"{raw}: the dataset folder has no usable image{detail if skipped else ''}")
    if empty and cfg.empty_class == "error":
        why = [s for s in skipped if s["path"].split("/")[0] == empty[0]]
        detail = f" ({len(why)} skipped, e.g. {why[0]['path']}: {why[0]['reason']})" if why else ""
        raise DataError(
            f"{raw / empty[0]}: class folder has no usable image{detail}; "
            "add images, remove the folder, or set empty_class: drop"
        )
    class_names = [c for c in class_names if c in present]
    if not class_names:
        raise DataError(f"{raw}: no usable image found ({len(skipped)} inputs skipped)")

    order = np.argsort(np.asarray(dec.ids, dtype=object), kind="stable")
    ids = [dec.ids[i] for i in order]
    sources = [dec.sources[i] for i in order]
    names = [dec.class_names[i] for i in order]
    pixels = dec.pixels[order]
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.asarray([index[c] for c in names], dtype=np.int16)
    keys = ids if cfg.split_by == "image" else sources
    splits = [assign_split(k, cfg.split) for k in keys]

    levels = build_pyramid(pixels)
    counts = {s: {c: 0 for c in class_names} for s in SPLITS}
    for s, c in zip(splits, names, strict=True):
        counts[s][c] += 1
    # A class no model can learn (none of its images is in train) is refused; one missing from
    # val or test (a few images) only thins those splits, and the manifest's counts show it.
    lacking = [c for c in class_names if counts["train"][c] == 0]
    if lacking:
        c = lacking[0]
        found = ", ".join(f"{s} {counts[s][c]}" for s in SPLITS)
        raise DataError(
            f"{raw / c}: class has no image in the train split ({found}; split by "
            f"{cfg.split_by}): no model can learn it; add images to it, or change the split"
        )
    train = np.asarray([s == "train" for s in splits])
    mean, std = channel_stats(pixels[train] if train.any() else pixels)

    manifest = {
        "gm_version": gm.__version__,
        "dataset": name,
        "top_resolution": cfg.top_resolution,
        "resolutions": sorted(levels),
        "channels": cfg.channels,
        "num_images": len(ids),
        "classes": class_names,
        "counts": counts,
        "mean": mean,
        "std": std,
        "stats_note": "per-channel mean/std of the train split at the top level, in [0, 1]",
        "content_hash": content_hash(ids, labels, splits, pixels),
        "dropped_classes": empty,
        "skipped": skipped,
        "config": to_dict(cfg),
        "files": {},
    }
    base = {
        "id": pa.array(ids, pa.string()),
        "source": pa.array(sources, pa.string()),
        "label": pa.array(labels, pa.int16()),
        "label_name": pa.array(names, pa.string()),
        "split": pa.array(splits, pa.string()),
    }
    with atomic_dir(out) as tmp:
        for res, arr in sorted(levels.items()):
            field = image_field("image", arr.shape[1:], arr.dtype)
            schema = pa.schema([pa.field(k, v.type, nullable=False) for k, v in base.items()])
            table = pa.Table.from_arrays(
                [*base.values(), image_array(arr)], schema=schema.append(field)
            )
            meta = {
                "dataset": name,
                "resolution": res,
                "channels": cfg.channels,
                "classes": class_names,
            }
            write_table(tmp / level_file(res), table, meta)
            manifest["files"][str(res)] = {
                "file": level_file(res),
                "rows": len(ids),
                "dtype": arr.dtype.name,
                "sha256": sha256_file(tmp / level_file(res)),
            }
        write_json(tmp / "manifest.json", manifest)
        save_preview(tmp / "preview.png", levels, labels)
    return manifest


def save_preview(path: Path, levels: dict[int, np.ndarray], labels: np.ndarray, cols: int = 8):
    """One row per level (nearest-upscaled to the top size), one column per class where possible."""
    from PIL import Image

    top = max(levels)
    picks: list[int] = []
    for lab in np.unique(labels):
        picks.append(int(np.flatnonzero(labels == lab)[0]))
    for i in range(len(labels)):
        if len(picks) >= cols:
            break
        if i not in picks:
            picks.append(i)
    picks = sorted(picks[:cols])
    if not picks:
        return
    rows = []
    for res in sorted(levels):
        imgs = np.rint(levels[res][picks]).astype(np.uint8)
        f = top // res
        imgs = imgs.repeat(f, axis=1).repeat(f, axis=2)
        rows.append(np.concatenate(list(imgs), axis=1))
    grid = np.concatenate(rows, axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
