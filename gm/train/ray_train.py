"""Training under Ray Train (V2): one TorchTrainer whose workers run :class:`Trainer` steps.

- Data: each worker reads the dataset level once into memory and takes its shard of a
  per-epoch permutation seeded by (seed, epoch); the position in the data follows from the step,
  so a resumed run sees exactly the batches it would have seen.
- Checkpoints: every ``checkpoint_every`` steps all ranks call ``ray.train.report`` (a barrier);
  rank 0 attaches the full trainer state. A restarted worker group (``FailureConfig``) and a
  relaunched driver (same ``RunConfig(name, storage_path)``) both continue from the latest one.

Not yet here (issue 3, in progress): MLflow tracking, the DVC `train` stage and `gm train`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gm.config import check

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class RunSettings:
    """How a training run executes (the model's own hyperparameters live in its config)."""

    steps: int = 1000  # optimizer steps (each runs every due phase once)
    batch_size: int = 64  # per worker
    checkpoint_every: int = 100  # steps between checkpoints
    seed: int = 0
    ema_beta: float = 0.0  # EMA of the family's ema_modules; 0 = off
    amp: bool = True  # mixed precision with torch.amp (CUDA only)
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts before the run fails

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "num_workers"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(0.0 <= self.ema_beta < 1.0, "ema_beta", "must be in [0, 1)")
        check(self.max_failures >= -1, "max_failures", "must be >= -1 (-1: unlimited)")


def shard_indices(n: int, step: int, batch_size: int, rank: int, world: int, seed: int):
    """Indices of this rank's batch at ``step``: a per-epoch permutation, cut across ranks."""
    per_step = batch_size * world
    steps_per_epoch = max(n // per_step, 1)
    epoch, pos = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    start = pos * per_step + rank * batch_size
    return perm[torch.arange(start, start + batch_size) % n]  # wraps only if n < per_step


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function. ``config`` holds plain values only (it crosses processes)."""
    import ray.train
    import ray.train.torch

    from gm.config import from_dict
    from gm.data.readers import ImageDataset, to_unit_range
    from gm.registry import families
    from gm.train.checkpoint import load_checkpoint, save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import Batch, DataInfo

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run = from_dict(RunSettings, config["run"], "run")
    fam = families()[config["family"]]
    model_cfg = from_dict(fam.config, config["model"], config["family"])
    info = DataInfo(**config["data_info"])
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    model = fam.build(model_cfg, info)
    device = ray.train.torch.get_device()
    trainer = Trainer(
        model, device=device, distributed=world > 1, amp=run.amp, ema_beta=run.ema_beta
    )
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            payload = load_checkpoint(Path(d) / CHECKPOINT_FILE, family=config["family"])
        trainer.load_state_dict(payload["trainer"])  # RNG: rank 0's saved state
        resumed_from = trainer.step
    if checkpoint is None or rank > 0:
        # Per-rank noise streams; rank 0 continues its saved stream exactly, other ranks
        # restart a stream determined by (seed, rank, step).
        torch.manual_seed(run.seed + 1 + rank + 7919 * trainer.step)

    data = ImageDataset(config["dataset_dir"], info.resolution, split="train")
    fault = config.get("fault_injection")  # tests: {"step": k, "marker": path}
    metrics: dict[str, float] = {}
    while trainer.step < run.steps:
        idx = shard_indices(len(data), trainer.step, run.batch_size, rank, world, run.seed)
        metrics = trainer.train_step(Batch(to_unit_range(data.pixels[idx]), data.labels[idx]))
        if fault and rank == world - 1 and trainer.step == fault["step"]:
            marker = Path(fault["marker"])
            if not marker.exists():
                # Wait until Ray Train has registered every report so far, so the test knows
                # which checkpoint the restart must find; then die without cleanup.
                ray.train.get_all_reported_checkpoints(timeout_s=60)
                marker.write_text("killed once")
                os.kill(os.getpid(), 9)
        if trainer.step % run.checkpoint_every == 0 or trainer.step == run.steps:
            report = {
                "step": trainer.step,
                "images_seen": trainer.images_seen * world,
                "resumed_from": resumed_from,
                **metrics,
            }
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    save_checkpoint(
                        Path(d) / CHECKPOINT_FILE,
                        config["family"],
                        model_cfg,
                        info,
                        trainer.state_dict(),
                        extra={"resumed_from": resumed_from},
                    )
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(report, checkpoint=None)


def fit(
    family: str,
    model_config: dict[str, Any],
    run: RunSettings,
    dataset_dir: str | os.PathLike,
    data_info: dict[str, int],
    storage_path: str | os.PathLike,
    name: str,
    fault_injection: dict | None = None,
):
    """Run (or continue) a training under Ray Train; returns the Ray ``Result``.

    ``name`` and ``storage_path`` identify the run: launching again with the same pair continues
    from its latest checkpoint. Paths are made absolute here (workers chdir elsewhere).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gm.config import to_dict

    config = {
        "family": family,
        "model": model_config,
        "run": to_dict(run),
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "data_info": dict(data_info),
        "fault_injection": fault_injection,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()
