"""Data benchmarks: prepare-stage throughput and reader throughput against a baseline.

    python bench/bench_data.py [--data data] [--repeats 3]

Prints
- images/s of the prepare stage on each default dataset (target: all of them in < 2 min);
- images/s of reading the 64x64 level into torch batches (Parquet → ImageDataset → DataLoader,
  and the Ray Data path) against torchvision ImageFolder + PIL decoding of the same images
  written as PNG files, as a ratio measured in this run (target: >= 10x);
- the time of a no-op `dvc repro` in this repository when its outputs exist (target: < 5 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_prepare(data: Path, work: Path, repeats: int) -> dict[str, float]:
    from gm import params
    from gm.data.prepare import prepare_dataset

    p = params.load(REPO / "params.yaml")
    total_time, total_images, out = 0.0, 0, {}
    print("prepare stage (params.yaml defaults):")
    for name, cfg in p.datasets.items():
        manifest = {}

        def run(name=name, cfg=cfg, manifest=manifest):
            manifest.update(
                prepare_dataset(
                    data / name, work / "pyramid" / name, cfg, name=name, progress=False
                )
            )

        sec = timed(run, repeats)
        n = manifest["num_images"]
        total_time += sec
        total_images += n
        out[name] = n / sec
        print(f"  {name:<8} {n:>6} images  {sec:6.2f} s  {n / sec:8.0f} img/s")
    print(f"  all      {total_images:>6} images  {total_time:6.2f} s  (target < 120 s)")
    out["total_seconds"] = total_time
    return out


def write_image_folder(dataset: Path, root: Path) -> int:
    """The 64x64 level as PNG files in class folders (the ImageFolder baseline's input)."""
    from PIL import Image

    from gm.data.parquet import read_images, read_table

    table = read_table(dataset / "64x64.parquet", None)
    images = read_images(table)
    names = table.column("label_name").to_pylist()
    for i, (img, cls) in enumerate(zip(images, names, strict=True)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / cls / f"{i:05d}.png")
    return len(images)


def bench_reader(dataset: Path, work: Path, repeats: int, batch_size: int = 256) -> float:
    import torchvision
    from torchvision import transforms

    from gm.data.readers import ImageDataset

    folder = work / "imagefolder"
    n = write_image_folder(dataset, folder)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def baseline():
        ds = torchvision.datasets.ImageFolder(str(folder), transform=tf)
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            assert x.shape[1:] == (3, 64, 64)

    def ours():  # read the Parquet file, then one epoch of batches
        ds = ImageDataset(dataset, 64, split=None)
        for x, _ in ds.batches(batch_size):
            assert x.shape[1:] == (3, 64, 64)

    def ours_loader():  # the same through a DataLoader (per-item indexing and collation)
        ds = ImageDataset(dataset, 64, split=None)
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            assert x.shape[1:] == (3, 64, 64)

    warm = ImageDataset(dataset, 64, split=None)

    def ours_warm():  # a later epoch: data already in memory
        for x, _ in warm.batches(batch_size, shuffle=True):
            assert x.shape[1:] == (3, 64, 64)

    t_base = timed(baseline, repeats)
    t_ours = timed(ours, repeats)
    t_loader = timed(ours_loader, repeats)
    t_warm = timed(ours_warm, repeats)
    t_ray, t_ray_cached = bench_ray(dataset, batch_size, repeats)
    rows = [
        ("torchvision ImageFolder + PIL", t_base, "(baseline)"),
        ("gm ImageDataset.batches, cold", t_ours, "(target >= 10x)"),
        ("gm ImageDataset + DataLoader", t_loader, ""),
        ("gm ImageDataset.batches, warm", t_warm, "(later epochs, shuffled)"),
        ("gm ray_dataset, streaming", t_ray, "(Ray Data, after warm-up)"),
        ("gm ray_dataset, materialized", t_ray_cached, "(Ray Data, later epochs)"),
    ]
    print(f"reader, {n} images at 64x64, batch {batch_size}, float [-1, 1] (best of {repeats}):")
    for name, sec, note in rows:
        print(f"  {name:<31} {n / sec:9.0f} img/s  {t_base / sec:6.1f}x  {note}")
    return t_base / t_ours


def bench_ray(dataset: Path, batch_size: int, repeats: int) -> tuple[float, float]:
    import ray

    from gm.data.raydata import ray_dataset

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False

        def run():
            src = ray_dataset(dataset, 64, split=None)
            for b in src.dataset.iter_torch_batches(
                batch_size=batch_size, collate_fn=src.collate_fn
            ):
                assert b["image"].shape[1:] == (3, 64, 64)

        run()  # warm-up: worker start-up is Ray's fixed cost, not the reader's
        streaming = timed(run, repeats)
        src = ray_dataset(dataset, 64, split=None)
        cached = src.dataset.materialize()

        def run_cached():
            for b in cached.iter_torch_batches(batch_size=batch_size, collate_fn=src.collate_fn):
                assert b["image"].shape[1:] == (3, 64, 64)

        return streaming, timed(run_cached, repeats)
    finally:
        ray.shutdown()


def bench_noop_repro() -> None:
    if not (REPO / "dvc.lock").is_file() or not (REPO / "datasets").is_dir():
        print("no-op dvc repro: skipped (run `make repro` first)")
        return
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run([*dvc, "status"], cwd=REPO, capture_output=True, text=True)
    if "up to date" not in status.stdout:
        print("no-op dvc repro: skipped (pipeline not up to date: run `make repro` first)")
        return
    t = time.perf_counter()
    r = subprocess.run([*dvc, "repro"], cwd=REPO, capture_output=True, text=True)
    sec = time.perf_counter() - t
    state = "nothing to do" if "up to date" in r.stdout else "RAN STAGES (not a no-op)"
    print(f"no-op dvc repro: {sec:.2f} s, {state} (target < 5 s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(REPO / "data"), help="raw data folder")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="gm-bench-"))
    try:
        data = Path(args.data)
        if not data.is_dir():
            from gm.data.sources import materialize

            data = work / "data"
            materialize(data, progress=False)
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, numpy {np.__version__}")
        bench_prepare(data, work, args.repeats)
        bench_reader(work / "pyramid" / "emoji", work, args.repeats)
        bench_noop_repro()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
