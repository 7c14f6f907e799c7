"""Progressive growing: images/s per resolution phase, and the cost of a resolution switch,
for the growing families at the configs in params.yaml (measured in one run, on this machine).

    python bench/bench_progressive.py [--steps 20] [--job progan --job stylegan]

Per resolution: images/s of stable training (alpha = 1) and of fade-in (alpha = 0.5; the old
and new paths both run), after warm-up, and their ratio. Switch overhead: reading the next
pyramid level from Parquet plus the extra time of the first step at the new resolution, also
as a ratio: how many steady steps it costs.
On a CUDA device (``--cuda``) the steps run with mixed precision, as ``run.amp`` does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def steps_per_s(trainer, batch, steps: int) -> tuple[float, float]:
    """(first-step seconds, median seconds of the following steps)."""
    times = []
    for _ in range(steps + 1):
        tick = time.perf_counter()
        trainer.train_step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    return times[0], statistics.median(times[1:])


def bench_job(job: str, steps: int, device: str) -> None:
    from gm import params
    from gm.data.readers import ImageDataset, to_unit_range
    from gm.registry import families
    from gm.train.job import data_info
    from gm.train.loop import Trainer
    from gm.train.protocol import Batch, DataInfo

    p = params.load(REPO / "params.yaml")
    cfg = p.train[job]
    ds = REPO / "datasets/pyramid" / cfg.dataset
    info = DataInfo(**data_info(ds, cfg.resolution))
    model_cfg = cfg.family_config(f"train.{job}")
    torch.manual_seed(0)
    model = families()[cfg.family].build(model_cfg, info)
    trainer = Trainer(model, device=device, amp=cfg.run.amp)
    print(f"{job} ({cfg.family}) on {cfg.dataset}, {device}, torch threads "
          f"{torch.get_num_threads()}:")  # fmt: skip
    print(f"  {'res':>5} {'batch':>5} {'stable img/s':>13} {'fade img/s':>11} "
          f"{'fade/stable':>11} {'level load s':>13} {'1st step +s':>12} "
          f"{'switch/step':>11}")  # fmt: skip
    for g in model.schedule_phases():
        if g.alpha < 1:
            continue
        bs = g.batch_size or cfg.run.batch_size
        tick = time.perf_counter()
        level = ImageDataset(ds, g.resolution, split="train")
        load_s = time.perf_counter() - tick
        idx = torch.arange(bs) % len(level)
        batch = Batch(to_unit_range(level.pixels[idx]), level.labels[idx])
        model.level.fill_(g.resolution.bit_length() - 3)
        model.alpha.fill_(0.5)  # ignored at the start resolution (nothing to fade)
        model.on_progress = lambda step, seen: None  # hold the phase fixed while timing
        first, fade_s = steps_per_s(trainer, batch, steps)
        model.alpha.fill_(1.0)
        _, stable_s = steps_per_s(trainer, batch, steps)
        switch = (load_s + max(first - fade_s, 0.0)) / stable_s  # in steady steps
        print(f"  {g.resolution:>5} {bs:>5} {bs / stable_s:>13.0f} {bs / fade_s:>11.0f} "
              f"{stable_s / fade_s:>11.2f} {load_s:>13.3f} {first - fade_s:>12.3f} "
              f"{switch:>11.1f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--job", action="append", help="params.yaml train job (default: all growing)")
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()
    from gm import params

    p = params.load(REPO / "params.yaml")
    jobs = args.job or [n for n, c in p.train.items() if c.family in ("progan", "stylegan")]
    for job in jobs:
        bench_job(job, args.steps, "cuda" if args.cuda else "cpu")


if __name__ == "__main__":
    main()
