"""CPU training speed: what thread settings, channels_last and torch.compile buy for the
default jobs' models on this machine, measured in one run against eager PyTorch.

    python bench/bench_cpu.py [--jobs cgan dcgan ddpm cvae] [--steps 30] [--warmup 5]

For each job of params.yaml (its family, model config, resolution and batch; random images in
[-1, 1] of the job's size, random labels), in this process, one variant after another.
Growing models (ProGAN, StyleGAN) are timed in their last phase, at the top resolution.

- ``eager``: contiguous tensors (``run.channels_last: false``), ``--threads`` threads (Ray
  gives a worker as many as its ``cpus_per_worker``);
- ``1 thread``: the same with ``torch.set_num_threads(1)``;
- ``channels_last``: ``Trainer(channels_last=True)`` (``run.channels_last``, gm's default):
  weights and batches in ``torch.channels_last``;
- ``compile``: each trainable module through ``torch.compile`` (inductor); its first steps'
  compile time is printed apart, with how many default-budget steps it would take to repay.

Prints seconds per step after warm-up and the ratio to eager (< 1: faster). Eager runs first
and again after the others; its figure is the mean of the two (both printed). Same seed and
batches for every variant; nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def num_classes(dataset: str) -> int:
    """Classes of a prepared dataset (its manifest), else 1 with a note: timings of the
    conditional families barely depend on it."""
    manifest = REPO / "datasets" / "pyramid" / dataset / "manifest.json"
    if manifest.is_file():
        return max(len(json.loads(manifest.read_text())["classes"]), 1)
    print(f"note: {manifest} not found (dvc repro prepare@{dataset}): timing with 1 class")
    return 1


def build(job: str, params_file: Path, channels_last: bool = False):
    from gm import params
    from gm.config import from_dict
    from gm.registry import families
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    p = params.load(params_file)
    cfg = p.train[job]
    fam = families()[cfg.family]
    ds = p.datasets[cfg.dataset] if cfg.dataset in p.datasets else None
    channels = getattr(ds, "channels", 3) if ds is not None else 3
    classes = num_classes(cfg.dataset)
    res = cfg.resolution or getattr(ds, "top_resolution", 32)  # 0: the dataset's top level
    info = DataInfo(resolution=res, channels=channels, num_classes=classes)
    torch.manual_seed(0)
    model = fam.build(from_dict(fam.config, cfg.model, job), info)
    trainer = Trainer(model, total_steps=cfg.run.steps, channels_last=channels_last)
    if model.growth(0) is not None:  # a growing model: timed in its last (top-resolution) phase
        trainer.images_seen = 10**12
    return trainer, info, cfg.run


def batches(info, batch_size: int, n: int, levels: list[int]):
    from gm.train.protocol import Batch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.rand(batch_size, info.channels, info.resolution, info.resolution, generator=g)
        x = x * 2 - 1
        lv = {r: torch.nn.functional.interpolate(x, size=r, mode="area") for r in levels}
        y = torch.randint(0, max(info.num_classes, 1), (batch_size,), generator=g)
        out.append(Batch(x, y, lv))
    return out


def timed(trainer, data, warmup: int) -> tuple[float, float]:
    """(seconds of the warm-up steps, mean seconds per step after them)."""
    times = []
    for b in data:
        t = time.perf_counter()
        trainer.train_step(b)
        times.append(time.perf_counter() - t)
    return sum(times[:warmup]), sum(times[warmup:]) / (len(times) - warmup)


def compiled(job: str, params_file: Path, data, warmup: int, base: float, steps: int):
    """("compile", seconds per step, note) with every trainable module through torch.compile;
    the note gives the compile time and the steps it takes to repay, or why it failed."""
    trainer, *_ = build(job, params_file)
    try:
        for name, m in trainer.modules.items():
            trainer.nets[name] = torch.compile(m)
        warm, s = timed(trainer, data, warmup)
    except Exception as e:  # noqa: BLE001 - a family that does not compile is a result
        return "compile", float("nan"), f"failed: {type(e).__name__}: {e}"[:90]
    compile_s = warm - warmup * s
    repay = compile_s / max(base - s, 1e-9) if s < base else float("inf")
    return "compile", s, f"compile {compile_s:.1f} s; repaid after {repay:.0f} steps (job: {steps})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--jobs", nargs="+", default=["cgan", "dcgan", "ddpm", "cvae"])
    ap.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads of the eager baseline")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow)")
    args = ap.parse_args()
    n = args.warmup + args.steps
    print(f"torch {torch.__version__}, {args.threads} threads baseline, {args.steps} steps "
          f"after {args.warmup} warm-up")  # fmt: skip
    print(f"{'job':8} {'variant':14} {'s/step':>8} {'ratio':>6}  note")
    for job in args.jobs:
        trainer, info, run = build(job, Path(args.params))
        grow = trainer.model.growth(trainer.images_seen)
        size = (grow.batch_size if grow else None) or run.batch_size
        data = batches(info, size, n, trainer.model.pyramid_levels())
        variants = []

        def run_variant(channels_last=False, threads=args.threads, job=job, data=data) -> float:
            torch.set_num_threads(threads)
            trainer, *_ = build(job, Path(args.params), channels_last=channels_last)
            return timed(trainer, data, args.warmup)[1]

        # eager first and again last: the baseline is their mean, so whatever order effect the
        # process has (allocator, caches) falls on both sides of the comparison
        first = run_variant()
        variants.append(("channels_last", run_variant(channels_last=True), ""))
        variants.append(("1 thread", run_variant(threads=1), ""))
        last = run_variant()
        base = (first + last) / 2
        variants.insert(0, ("eager", base, f"first {first:.4f}, last {last:.4f}"))
        torch.set_num_threads(args.threads)
        if not args.no_compile:
            variants.append(compiled(job, Path(args.params), data, args.warmup, base, run.steps))
        for name, s, note in variants:
            print(f"{job:8} {name:14} {s:8.4f} {s / base:6.2f}  {note}", flush=True)


if __name__ == "__main__":
    main()
