"""Ray Train: a worker killed mid-run and a relaunched driver both continue from a checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from gm.data.config import DatasetConfig
from gm.data.prepare import prepare_dataset
from gm.train.checkpoint import load_checkpoint
from gm.train.ray_train import CHECKPOINT_FILE, RunSettings, fit, shard_indices

from .test_models_contract import TINY

pytestmark = pytest.mark.slow


@pytest.fixture
def dataset(toy_dataset):
    return toy_dataset


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


def test_ray_train_polls_four_times_a_second_unless_the_user_set_the_interval(monkeypatch):
    from ray.train.v2._internal import constants

    from gm.train.ray_train import HEALTH_CHECK_ENV, ray_train_env

    # Ray Train still reads this variable and passes it on to its controller and workers
    assert HEALTH_CHECK_ENV == constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert HEALTH_CHECK_ENV in constants.ENV_VARS_TO_PROPAGATE
    monkeypatch.delenv(HEALTH_CHECK_ENV, raising=False)
    ray_train_env()
    assert os.environ[HEALTH_CHECK_ENV] == "0.25"
    monkeypatch.setenv(HEALTH_CHECK_ENV, "3")
    ray_train_env()
    assert os.environ[HEALTH_CHECK_ENV] == "3"


def test_worker_killed_mid_run_resumes_from_its_checkpoint(ray_local, dataset, tmp_path):
    run = RunSettings(steps=8, batch_size=4, checkpoint_every=2, num_workers=2, cpus_per_worker=1,
                      max_failures=2, data="stream")  # fmt: skip
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


def actor_classes(ray) -> dict[str, str]:
    """Actor id -> class name of every actor the GCS knows, dead ones included (the suite's
    Ray has no dashboard, so no State API: the GCS table directly)."""
    from ray._private import state

    return {i: a["ActorClassName"] for i, a in state.actors().items()}


def test_relaunched_driver_continues_the_same_run(ray_local, dataset, tmp_path, capfd):
    """The second launch continues from step 2; its driver draws the progress bar from what
    rank 0 posts to Ray's KV store, up to the run's last step, and removes the key after. On a
    local Ray, Ray Train starts no PreemptionWatcher (no node is ever drained) and, with no
    Ray Dataset passed, no DatasetManager: two processes fewer per training."""
    from ray.experimental.internal_kv import _internal_kv_list

    from gm.train.ray_train import PROGRESS_NAMESPACE

    before = actor_classes(ray_local)
    info = {"resolution": 16, "channels": 3, "num_classes": 3}
    first = RunSettings(steps=2, batch_size=4, checkpoint_every=2, num_workers=1)
    fit("dcgan", TINY["dcgan"], first, dataset, info, tmp_path / "runs", "again")
    capfd.readouterr()
    more = RunSettings(steps=4, batch_size=4, checkpoint_every=2, num_workers=1)
    payload = final_payload(
        fit("dcgan", TINY["dcgan"], more, dataset, info, tmp_path / "runs", "again", progress=True)
    )
    assert payload["trainer"]["step"] == 4 and payload["extra"]["resumed_from"] == 2
    bar = capfd.readouterr().err.split("\r")[-1]
    assert "again: 100%" in bar and "4/4" in bar and "D=" in bar and "img/s=" in bar, bar
    assert _internal_kv_list("", namespace=PROGRESS_NAMESPACE) == []
    started = {c for i, c in actor_classes(ray_local).items() if i not in before}
    assert "TrainController" in started, started  # the listing sees this run's actors
    assert not started & {"PreemptionWatcher", "DatasetManager"}, started


def test_two_workers_streaming_train_the_same_weights_as_in_memory(ray_local, dataset, tmp_path):
    """run.data: stream (a window of rows at a time) and memory feed the two DDP ranks the same
    batches: bit-identical weights."""
    info = {"resolution": 16, "channels": 3, "num_classes": 3}
    weights = {}
    for mode in ("memory", "stream"):
        run = RunSettings(steps=5, batch_size=4, checkpoint_every=5, num_workers=2, data=mode,
                          max_failures=0)  # fmt: skip
        payload = final_payload(fit("cvae", TINY["cvae"], run, dataset, info, tmp_path, mode))
        assert payload["trainer"]["step"] == 5 and payload["extra"]["images_seen_total"] == 40
        weights[mode] = payload["trainer"]["model"]
    for k, v in weights["memory"].items():
        assert torch.equal(v, weights["stream"][k]), k


def _grad_probe_loop(config):
    """One DDP step of a tiny cGAN per rank; each rank saves its gradients and weights."""
    import ray.train
    import ray.train.torch

    from gm.config import from_dict
    from gm.registry import families
    from gm.train.loop import Trainer
    from gm.train.protocol import Batch, DataInfo

    rank = ray.train.get_context().get_world_rank()
    fam = families()["cgan"]
    torch.manual_seed(0)
    model = fam.build(from_dict(fam.config, config["model"], "cgan"), DataInfo(16, 3, 3))
    trainer = Trainer(model, device=ray.train.torch.get_device(), distributed=True)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    torch.manual_seed(1000 + rank)  # and different noise
    trainer.train_step(Batch(images, torch.arange(4) % 3))
    grads = {n: p.grad.clone() for n, p in model.G.named_parameters()}  # the last phase: G
    torch.save({"grads": grads, "weights": model.state_dict()}, f"{config['out']}/{rank}.pt")
    ray.train.report({"done": 1})


def test_ddp_under_ray_train_gives_identical_gradients_on_every_rank(ray_local, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import tests.test_ray_train as this

    ray.cloudpickle.register_pickle_by_value(this)  # workers need not import the tests
    TorchTrainer(
        _grad_probe_loop,
        train_loop_config={"model": TINY["cgan"], "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="grads", storage_path=str(tmp_path / "runs")),
    ).fit()
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert a["grads"].keys() == b["grads"].keys() and a["grads"]
    for name in a["grads"]:
        assert torch.equal(a["grads"][name], b["grads"][name]), name  # all-reduced
    nonzero = [n for n, gr in a["grads"].items() if gr.abs().sum() > 0]
    assert nonzero  # a real step, not an all-zero gradient
    for name in a["weights"]:
        if "running" in name or "num_batches" in name:
            continue  # BatchNorm statistics are per rank, as in any DDP setup
        assert torch.equal(a["weights"][name], b["weights"][name]), name


def test_relaunched_driver_after_sigkill_continues(tmp_path, raw_folder):
    """`gm train` killed (its whole process group, SIGKILL) after its first checkpoint; the
    same command continues from that checkpoint into the same MLflow run."""
    import json
    import signal
    import subprocess
    import time

    import yaml

    from .conftest import BIN, registered_checkpoints

    root = tmp_path / "proj"
    prepare_dataset(
        raw_folder, root / "datasets/pyramid/toy", DatasetConfig(top_resolution=16), progress=False
    )
    params = {
        "datasets": {"toy": {"top_resolution": 16}},
        "train": {
            "toy": {
                "family": "dcgan",
                "dataset": "toy",
                "model": TINY["dcgan"],
                "run": {"steps": 150, "batch_size": 4, "checkpoint_every": 10},
            }
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [BIN / "gm", "train", "toy", "--quiet", "--out", "models"]
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not registered_checkpoints((root / "runs").glob("toy-*")):
        assert proc.poll() is None, "gm train ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "models/toy").exists()  # nothing half-written

    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((root / "models/toy/metrics.json").read_text())
    assert metrics["step"] == 150 and 10 <= metrics["resumed_from"] < 150
    state = json.loads(next((root / "runs").glob("toy-*/gm_run.json")).read_text())
    assert metrics["mlflow_run_id"] == state["run_id"]


def test_flips_and_rotations_reach_training_and_resume_exactly(ray_local, dataset, tmp_path):
    """run.rot90 changes the batches a run trains on (other weights than mirror's flips alone
    give), and with both, a run continued from a checkpoint trains on the same batches as one
    run through: bit-identical weights."""
    info = {"resolution": 16, "channels": 3, "num_classes": 3}

    def weights(name, steps, **aug):
        run = RunSettings(steps=steps, batch_size=4, checkpoint_every=2, num_workers=1,
                          max_failures=0, **aug)  # fmt: skip
        payload = final_payload(fit("cvae", TINY["cvae"], run, dataset, info, tmp_path, name))
        assert payload["trainer"]["step"] == steps
        return payload["trainer"]["model"]

    aug = {"mirror": True, "rot90": True}
    through = weights("through", 4, **aug)
    weights("continued", 2, **aug)
    continued = weights("continued", 4, **aug)
    flips = weights("flips", 4, mirror=True)
    for k, v in through.items():
        assert torch.equal(v, continued[k]), k
    assert any(not torch.equal(v, flips[k]) for k, v in through.items())
