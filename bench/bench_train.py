"""Training-loop benchmark: the Ray Train loop against a bare PyTorch loop, same model, batch
and data, measured in one run.

    python bench/bench_train.py [--steps 60] [--warmup 20]

Prints
- seconds per step after warm-up of a bare loop (`Trainer` in a fresh process without Ray, the
  same in-memory shard and batch code, the same threads; run before and after the Ray loop)
  and of the Ray Train worker loop (`gm.train.ray_train.fit`, 1 worker with the same CPU
  threads), and their ratio (target: <= 1.10; checkpoint reports are timed apart);
- Ray Train's start-up (wall time of `fit` minus its training steps), reported separately;
- images/s with 1 worker (2 CPUs) and 2 workers (1 CPU each, DDP over gloo).
The model is the conditional GAN (ngf = ndf = 32) on 32x32 digits, batch 64 per worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = {"ngf": 32, "ndf": 32}
BATCH = 64


def dataset(work: Path) -> tuple[Path, dict]:
    """The repository's prepared digits if present, else prepared here from the same source."""
    from gm.train.job import data_info

    ds = REPO / "datasets/pyramid/digits"
    if not (ds / "manifest.json").is_file():
        from gm.data.config import DatasetConfig
        from gm.data.prepare import prepare_dataset
        from gm.data.sources import materialize

        materialize(work / "raw", only=["digits"], progress=False)
        cfg = DatasetConfig(top_resolution=32, channels=1, undersize="upscale", resample="bicubic")
        ds = work / "digits"
        prepare_dataset(work / "raw/digits", ds, cfg, progress=False)
    return ds, data_info(ds, 32)


def bare_loop(ds: Path, info: dict, steps: int, warmup: int, threads: int) -> float:
    """Mean seconds per step after ``warmup`` steps, timed exactly as the Ray worker times."""
    from gm.config import from_dict
    from gm.data.readers import ImageDataset, to_unit_range
    from gm.registry import families
    from gm.train.loop import Trainer
    from gm.train.protocol import Batch, DataInfo
    from gm.train.ray_train import shard_indices

    torch.set_num_threads(threads)
    fam = families()["cgan"]
    torch.manual_seed(0)
    trainer = Trainer(fam.build(from_dict(fam.config, MODEL, "cgan"), DataInfo(**info)))
    data = ImageDataset(ds, info["resolution"], split="train")
    times = []
    tick = time.perf_counter()
    for _ in range(warmup + steps):
        idx = shard_indices(len(data), trainer.step, BATCH, 0, 1, 0)
        trainer.train_step(Batch(to_unit_range(data.pixels[idx]), data.labels[idx]))
        now = time.perf_counter()
        times.append(now - tick)
        tick = now
    return sum(times[warmup:]) / steps


def bare_subprocess(ds: Path, steps: int, warmup: int, threads: int) -> float:
    """The bare loop in a fresh process with no Ray client in it, like a Ray worker, and the
    same thread settings Ray gives a worker (OMP_NUM_THREADS = its CPUs)."""
    import json
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--bare", str(ds), "--steps", str(steps)]
    out = subprocess.run(
        [*cmd, "--warmup", str(warmup), "--threads", str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["step_s"]


def ray_loop(ds: Path, info: dict, steps: int, warmup: int, workers: int, cpus: float, work):
    """(mean seconds per step after warm-up, start-up seconds) of the Ray Train loop."""
    from gm.train.checkpoint import load_checkpoint
    from gm.train.ray_train import CHECKPOINT_FILE, RunSettings, fit

    run = RunSettings(
        steps=warmup + steps,
        batch_size=BATCH,
        checkpoint_every=warmup,  # one report after warm-up, one at the end
        num_workers=workers,
        cpus_per_worker=cpus,
    )
    t = time.perf_counter()
    result = fit("cgan", MODEL, run, ds, info, work, f"bench-{workers}-{time.time_ns()}")
    wall = time.perf_counter() - t
    with result.checkpoint.as_directory() as d:
        history = load_checkpoint(Path(d) / CHECKPOINT_FILE)["extra"]["history"]
    warm, measured = history[0], history[-1]
    startup = wall - warm["step_s"] * warmup - measured["step_s"] * steps
    return measured["step_s"], startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--bare", metavar="DATASET", help=argparse.SUPPRESS)  # internal
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        import json

        from gm.train.job import data_info

        info = data_info(args.bare, 32)
        step_s = bare_loop(Path(args.bare), info, args.steps, args.warmup, args.threads)
        print(json.dumps({"step_s": step_s}))
        return
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ds, info = dataset(work)
        print(f"cgan {MODEL} at {info['resolution']}x{info['resolution']}, batch {BATCH}/worker")
        t = time.perf_counter()
        ray.init(num_cpus=max(cores, 2), include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t
        # Bare loop before and after the Ray run (the best of the two): drift in machine
        # speed shows as a spread between them, printed below.
        bare_a = bare_subprocess(ds, args.steps, args.warmup, threads=min(cores, 2))
        ray_1, startup_1 = ray_loop(ds, info, args.steps, args.warmup, 1, min(cores, 2), work)
        bare_b = bare_subprocess(ds, args.steps, args.warmup, threads=min(cores, 2))
        bare = min(bare_a, bare_b)
        ray_2, startup_2 = ray_loop(ds, info, args.steps, args.warmup, 2, max(cores, 2) / 2, work)
        ray.shutdown()
    print(
        f"bare PyTorch loop      {bare * 1000:8.1f} ms/step  {BATCH / bare:8.0f} img/s  "
        f"(runs before/after Ray: {bare_a * 1000:.1f} / {bare_b * 1000:.1f} ms)"
    )
    print(
        f"Ray Train, 1 worker    {ray_1 * 1000:8.1f} ms/step  {BATCH / ray_1:8.0f} img/s  "
        f"ratio {ray_1 / bare:.3f} (target <= 1.10)"
    )
    print(f"Ray Train, 2 workers   {ray_2 * 1000:8.1f} ms/step  {2 * BATCH / ray_2:8.0f} img/s")
    print(
        f"start-up: ray.init {init_s:.1f} s; fit before/around steps {startup_1:.1f} s "
        f"(1 worker), {startup_2:.1f} s (2 workers)"
    )


if __name__ == "__main__":
    main()
