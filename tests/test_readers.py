from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gm.data.config import DatasetConfig
from gm.data.parquet import load_level
from gm.data.prepare import prepare_dataset
from gm.data.raydata import ray_dataset
from gm.data.readers import ImageDataset, to_unit_range
from gm.errors import DataError


@pytest.fixture
def dataset(raw_folder, tmp_path):
    prepare_dataset(raw_folder, tmp_path / "ds", DatasetConfig(top_resolution=32), progress=False)
    return tmp_path / "ds"


def test_unit_range_mapping():
    x = np.array([[[[0, 255, 127.5]]]], dtype=np.float32)
    assert to_unit_range(x).reshape(-1).tolist() == [-1.0, 1.0, 0.0]
    hwc = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    chw = to_unit_range(hwc)
    assert chw.shape == (2, 5, 3, 4) and chw.is_contiguous()
    expected = np.float32(hwc[1, 2, 3, 4]) / np.float32(127.5) - np.float32(1)
    assert chw[1, 4, 2, 3].item() == float(expected)


def test_torch_dataset(dataset):
    ds = ImageDataset(dataset, 16, split=None)
    x, y = ds[0]
    images, labels = ds.tensors()
    assert len(ds) == 30 and x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, images[0]) and -1.0 <= images.min() and images.max() <= 1.0
    assert y.dtype == torch.int64 and set(labels.tolist()) == {0, 1, 2}
    # the batch path, in order and shuffled, covers the same data
    batches = list(ds.batches(8))
    assert [len(b[1]) for b in batches] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([b[0] for b in batches]), images)
    g = torch.Generator().manual_seed(0)
    shuffled = list(ds.batches(8, shuffle=True, generator=g, drop_last=True))
    assert len(shuffled) == 3
    seen = torch.cat([b[1] for b in shuffled])
    assert not torch.equal(seen, labels[:24])
    loader = torch.utils.data.DataLoader(ds, batch_size=30)
    assert torch.equal(next(iter(loader))[0], images)
    train = ImageDataset(dataset, 16, split="train")
    assert 0 < len(train) < 30
    with pytest.raises(DataError, match="unknown split 'training'"):
        ImageDataset(dataset, 16, split="training")
    with pytest.raises(DataError, match="no level 64x64"):
        ImageDataset(dataset, 64)


@pytest.mark.parametrize("resolution, split", [(32, "train"), (8, "val"), (4, None)])
def test_ray_data_yields_the_same_tensors_as_the_torch_dataset(
    ray_local, dataset, resolution, split
):
    ref_images, ref_labels = ImageDataset(dataset, resolution, split=split).tensors()
    src = ray_dataset(dataset, resolution, split)
    images, labels = [], []
    for batch in src.dataset.iter_torch_batches(batch_size=7, collate_fn=src.collate_fn):
        images.append(batch["image"])
        labels.append(batch["label"])
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == ref_images.shape
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


def test_load_level_in_the_file_order(dataset):
    px, labels = load_level(dataset, 32)
    assert px.shape == (30, 32, 32, 3) and px.dtype == np.uint8
    table = pq.read_table(dataset / "32x32.parquet")
    assert labels.tolist() == table.column("label").to_pylist()
    assert sorted(labels.tolist()) == [0] * 12 + [1] * 10 + [2] * 8
