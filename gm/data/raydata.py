"""The Ray Data path of gm datasets: ``read_parquet`` → ``iter_torch_batches``.

Yields the same tensors as :class:`gm.data.readers.ImageDataset` (tests/test_readers.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from gm.data.parquet import check_split, decode_images, image_fields, level_path
from gm.data.readers import to_unit_range


class ImageCollate(ArrowBatchCollateFn):
    """Collate for ``iter_torch_batches``: an Arrow batch → {column: (B, C, H, W) float32 in
    [-1, 1], 'label': (B,) int64}. Decoding happens here, in the consumer, so no tensor
    extension type round-trips through Ray's object store."""

    def __init__(self, fields: dict[str, pa.Field]):
        super().__init__()
        self.fields = fields

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        out = {c: to_unit_range(decode_images(batch.column(c), f)) for c, f in self.fields.items()}
        out["label"] = torch.from_numpy(batch.column("label").to_numpy().astype(np.int64))
        return out


@dataclass(frozen=True)
class RaySource:
    """A Ray Data dataset of raw rows and the collate function that decodes its batches:
    ``for b in src.dataset.iter_torch_batches(batch_size=64, collate_fn=src.collate_fn)``.
    In Ray Train, pass ``dataset`` to the trainer and use ``collate_fn`` on the worker's shard."""

    dataset: ray.data.Dataset
    collate_fn: ImageCollate


def ray_dataset(
    dataset_dir_or_file: str | os.PathLike,
    resolution: int | None = None,
    split: str | None = "train",
    columns: tuple[str, ...] = ("image",),
) -> RaySource:
    """Ray Data over one level (or a paired table); rows keep the file's order."""
    from ray.data.expressions import col

    check_split(split)
    path = Path(dataset_dir_or_file)
    if resolution is not None:
        path = level_path(path, resolution)
    fields = image_fields(path, columns)
    ds = ray.data.read_parquet(str(path.resolve()), override_num_blocks=1)
    ds = ds.select_columns(["split", "label", *columns])
    if split:
        ds = ds.filter(expr=col("split") == split)
    return RaySource(ds, ImageCollate(fields))
