"""Ray Train: a worker killed mid-run and a relaunched driver both continue from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from gm.data.config import DatasetConfig
from gm.data.prepare import prepare_dataset
from gm.train.checkpoint import load_checkpoint
from gm.train.ray_train import CHECKPOINT_FILE, RunSettings, fit, shard_indices

from .test_models_contract import TINY

pytestmark = pytest.mark.slow


@pytest.fixture
def dataset(raw_folder, tmp_path):
    prepare_dataset(raw_folder, tmp_path / "ds", DatasetConfig(top_resolution=16), progress=False)
    return tmp_path / "ds"


def final_payload(result):
    assert result.checkpoint is not None, result
    with result.checkpoint.as_directory() as d:
        return load_checkpoint(f"{d}/{CHECKPOINT_FILE}")


def test_shards_are_disjoint_and_cover_an_epoch():
    a = shard_indices(20, 0, 5, 0, 2, seed=0)
    b = shard_indices(20, 0, 5, 1, 2, seed=0)
    c = shard_indices(20, 1, 5, 0, 2, seed=0)
    d = shard_indices(20, 1, 5, 1, 2, seed=0)
    assert sorted(torch.cat([a, b, c, d]).tolist()) == list(range(20))
    assert not torch.equal(shard_indices(20, 2, 5, 0, 2, 0), a)  # next epoch, new order


def test_worker_killed_mid_run_resumes_from_its_checkpoint(ray_local, dataset, tmp_path):
    run = RunSettings(
        steps=8, batch_size=4, checkpoint_every=2, num_workers=2, cpus_per_worker=1, max_failures=2
    )
    result = fit(
        "cvae",
        TINY["cvae"],
        run,
        dataset,
        {"resolution": 16, "channels": 3, "num_classes": 3},
        tmp_path / "runs",
        "killed",
        fault_injection={"step": 5, "marker": str(tmp_path / "killed.marker")},
    )
    assert (tmp_path / "killed.marker").exists()  # the fault really happened
    payload = final_payload(result)
    assert payload["trainer"]["step"] == 8
    # continued from the last checkpoint before the fault (step 4), not restarted from 0
    assert payload["extra"]["resumed_from"] == 4


def test_relaunched_driver_continues_the_same_run(ray_local, dataset, tmp_path):
    info = {"resolution": 16, "channels": 3, "num_classes": 3}
    first = RunSettings(steps=2, batch_size=4, checkpoint_every=2, num_workers=1)
    fit("dcgan", TINY["dcgan"], first, dataset, info, tmp_path / "runs", "again")
    more = RunSettings(steps=4, batch_size=4, checkpoint_every=2, num_workers=1)
    payload = final_payload(
        fit("dcgan", TINY["dcgan"], more, dataset, info, tmp_path / "runs", "again")
    )
    assert payload["trainer"]["step"] == 4 and payload["extra"]["resumed_from"] == 2
