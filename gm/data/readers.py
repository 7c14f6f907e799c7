"""Torch readers of gm datasets (the Ray Data path is :mod:`gm.data.raydata`).

Both give float32 images in [-1, 1], shape (C, H, W), with int64 labels. The conversion
``x / 127.5 - 1`` is the one function :func:`to_unit_range`, used by both paths, so they agree
bit for bit (tests/test_readers.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gm.data.parquet import image_fields, load_level, read_images, read_table


def to_unit_range(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 or float32 in [0, 255] → (N, C, H, W) float32 in [-1, 1].

    One copy with the layout change, then in-place arithmetic: per batch this stays in cache.
    """
    x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    n, h, w, c = x.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    out.copy_(x.permute(0, 3, 1, 2))
    return out.div_(127.5).sub_(1.0)


class ImageDataset(torch.utils.data.Dataset):
    """Images of one level (and split), read once into memory; converted per batch.

    Pixels stay as stored (uint8 top level: 4x less memory than float) and become float32 in
    [-1, 1] per item or per batch, where the conversion stays in cache (bench/bench_data.py).
    ``__getitem__`` returns ``(image (C, H, W), label)`` for a DataLoader; :meth:`batches` is
    the fast path.
    """

    def __init__(
        self, dataset_dir: str | os.PathLike, resolution: int, split: str | None = "train"
    ):
        pixels, labels = load_level(dataset_dir, resolution, split)
        self.pixels = torch.from_numpy(pixels)  # (N, H, W, C) as stored
        self.labels = torch.from_numpy(labels)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_unit_range(self.pixels[i : i + 1])[0], self.labels[i]

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images (B, C, H, W) in [-1, 1], labels (B,))``, optionally shuffled."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            if order is None:
                yield (
                    to_unit_range(self.pixels[i : i + batch_size]),
                    self.labels[i : i + batch_size],
                )
            else:
                idx = order[i : i + batch_size]
                yield to_unit_range(self.pixels[idx]), self.labels[idx]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image as one float tensor in [-1, 1] (small datasets, tests)."""
        return to_unit_range(self.pixels), self.labels


class PairedDataset(torch.utils.data.Dataset):
    """Two aligned image columns of a paired table (``lr``/``hr`` or ``a``/``b``): pixels kept
    as stored (uint8), converted to [-1, 1] per item or per batch (:meth:`batch`)."""

    def __init__(self, path: str | os.PathLike, columns: tuple[str, str], split: str | None):
        image_fields(path, columns)
        table = read_table(Path(path), split)
        self.first_pixels = torch.from_numpy(read_images(table, columns[0]))  # (N, h, w, C)
        self.second_pixels = torch.from_numpy(read_images(table, columns[1]))  # (N, H, W, C)
        self.labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(first (B, C, h, w), second (B, C, H, W), labels (B,)) of rows ``idx``, in [-1, 1]."""
        return (
            to_unit_range(self.first_pixels[idx]),
            to_unit_range(self.second_pixels[idx]),
            self.labels[idx],
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first, second, labels = self.batch(slice(i, i + 1))
        return first[0], second[0], labels[0]


class DomainImages:
    """The images of one domain (``A`` or ``B``) of an unpaired table (``image`` and ``domain``
    columns, e.g. ``unpaired.parquet`` of a translation dataset), kept as stored."""

    def __init__(self, path: str | os.PathLike, domain: str, split: str | None = "train"):
        import pyarrow.compute as pc

        from gm.errors import DataError

        image_fields(path, ("image", "domain"))
        table = read_table(Path(path), split)
        table = table.filter(pc.equal(table.column("domain"), domain))
        if table.num_rows == 0:
            raise DataError(f"{path}: no image of domain {domain!r} in split {split!r}")
        self.pixels = torch.from_numpy(read_images(table, "image"))
        self.labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)
