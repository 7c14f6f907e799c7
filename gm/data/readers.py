"""Readers of gm datasets: a torch ``Dataset`` and a Ray Data path that yield the same tensors.

Both give float32 images in [-1, 1], shape (C, H, W), with int64 labels. The conversion
``x / 127.5 - 1`` is the one function :func:`to_unit_range`, used by both paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from gm.data.parquet import decode_images, level_file, read_metadata
from gm.data.splits import SPLITS
from gm.errors import DataError


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 or float32 in [0, 255] → (N, C, H, W) float32 in [-1, 1]."""
    x = images.astype(np.float32, copy=False) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def level_path(dataset_dir: str | os.PathLike, resolution: int) -> Path:
    path = Path(dataset_dir) / level_file(resolution)
    if not path.is_file():
        have = sorted(p.name for p in Path(dataset_dir).glob("*x*.parquet"))
        raise DataError(
            f"{path}: no level {resolution}x{resolution} in this dataset "
            f"(has: {', '.join(have) or 'nothing'})"
        )
    return path


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")


def read_table(path: Path, split: str | None, columns: list[str] | None = None) -> pa.Table:
    _check_split(split)
    read_metadata(path)
    filters = (pc.field("split") == split) if split else None
    return pq.read_table(path, columns=columns, filters=filters)


def read_images(table: pa.Table, column: str = "image") -> np.ndarray:
    return decode_images(table.column(column), table.schema.field(column))


def load_level(
    dataset_dir: str | os.PathLike, resolution: int, split: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One level as ((N, H, W, C) uint8|float32 in [0, 255], (N,) int64 labels), sorted by id."""
    table = read_table(level_path(dataset_dir, resolution), split, ["id", "label", "image"])
    return read_images(table), table.column("label").to_numpy().astype(np.int64)


class ImageDataset(torch.utils.data.Dataset):
    """Images of one level (and split) held in memory as a float tensor in [-1, 1].

    Small datasets are read once and indexed from memory: far faster than decoding files
    (bench/bench_data.py). ``__getitem__`` returns ``(image (C, H, W), label)``.
    """

    def __init__(
        self, dataset_dir: str | os.PathLike, resolution: int, split: str | None = "train"
    ):
        pixels, labels = load_level(dataset_dir, resolution, split)
        self.images = torch.from_numpy(to_unit_range(pixels))
        self.labels = torch.from_numpy(labels)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class PairedDataset(torch.utils.data.Dataset):
    """Two aligned image columns of a paired table (``lr``/``hr`` or ``a``/``b``) in [-1, 1]."""

    def __init__(self, path: str | os.PathLike, columns: tuple[str, str], split: str | None):
        table = read_table(Path(path), split)
        for c in columns:
            if c not in table.column_names:
                raise DataError(f"{path}: no column {c!r} (has {', '.join(table.column_names)})")
        self.first = torch.from_numpy(to_unit_range(read_images(table, columns[0])))
        self.second = torch.from_numpy(to_unit_range(read_images(table, columns[1])))
        self.labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.first[i], self.second[i], self.labels[i]


class _Decode:
    """Ray Data batch function: Arrow batch → {'image': (B, C, H, W) float32, 'label': int64}."""

    def __init__(self, field: pa.Field, columns: tuple[str, ...]):
        self.field = field
        self.columns = columns

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out = {}
        for c in self.columns:
            f = self.field.with_name(c)
            out[c] = to_unit_range(decode_images(batch.column(c), f))
        out["label"] = batch.column("label").to_numpy().astype(np.int64)
        return out


def ray_dataset(
    dataset_dir_or_file: str | os.PathLike,
    resolution: int | None = None,
    split: str | None = "train",
    columns: tuple[str, ...] = ("image",),
):
    """A ``ray.data.Dataset`` of decoded batches (use ``iter_torch_batches`` on it or its shards).

    Rows keep the file's id order; the split filter is pushed into the Parquet scan.
    """
    import ray.data

    _check_split(split)
    path = Path(dataset_dir_or_file)
    if resolution is not None:
        path = level_path(path, resolution)
    read_metadata(path)
    schema = pq.read_schema(path)
    field = schema.field(columns[0])
    ds = ray.data.read_parquet(str(path.resolve()), override_num_blocks=1).select_columns(
        ["split", "label", *columns]
    )
    if split:
        from ray.data.expressions import col

        ds = ds.filter(expr=col("split") == split)
    return ds.map_batches(_Decode(field, columns), batch_format="pyarrow", zero_copy_batch=True)
