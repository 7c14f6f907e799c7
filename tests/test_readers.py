from __future__ import annotations

import numpy as np
import pytest
import torch

from gm.data.config import DatasetConfig
from gm.data.prepare import prepare_dataset
from gm.data.readers import ImageDataset, load_level, ray_dataset, to_unit_range
from gm.errors import DataError


@pytest.fixture
def dataset(raw_folder, tmp_path):
    prepare_dataset(raw_folder, tmp_path / "ds", DatasetConfig(top_resolution=32), progress=False)
    return tmp_path / "ds"


def test_unit_range_mapping():
    x = np.array([[[[0, 255, 127.5]]]], dtype=np.float32)
    assert to_unit_range(x).reshape(-1).tolist() == [-1.0, 1.0, 0.0]


def test_torch_dataset(dataset):
    ds = ImageDataset(dataset, 16, split=None)
    x, y = ds[0]
    assert len(ds) == 30 and x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert y.dtype == torch.int64 and set(ds.labels.tolist()) == {0, 1, 2}
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
    ref = ImageDataset(dataset, resolution, split=split)
    images, labels = [], []
    for batch in ray_dataset(dataset, resolution, split).iter_torch_batches(batch_size=7):
        images.append(batch["image"])
        labels.append(batch["label"])
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == ref.images.shape
    assert torch.equal(images, ref.images) and torch.equal(labels, ref.labels)


def test_load_level_sorted_by_id(dataset):
    px, labels = load_level(dataset, 32)
    assert px.shape == (30, 32, 32, 3) and px.dtype == np.uint8
    assert labels[:12].tolist() == [0] * 12  # cats/000..011 sort first
