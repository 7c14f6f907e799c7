"""Data at scale: prepare's memory as the dataset grows, its throughput on Ray Data, and the
pyramid's size.

    python bench/bench_scale.py [--sizes 1000,4000,16000] [--resolution 256] [--work DIR]

Makes N synthetic JPEG photographs (smooth random colour fields with noise, ``--resolution``
square, 10 classes) and prints, from one run:

- peak RSS of ``prepare_dataset`` (in one process, ``workers=0``, so every byte it touches is
  in the figure) for each N, and the ratio of the largest N's to the smallest's (goal: <= 1.3:
  memory bounded by a batch, not by the dataset);
- prepare images/s in this process and with 1 and 2 Ray Data tasks at a time (Ray's start-up
  excluded, measured once), and the 2-over-1 ratio;
- the pyramid's bytes over the top level's bytes, as pixels (goal: <= 1.45) and on disk;
- training's reader (gm.data.rowstore) on the largest dataset: images/s streamed over in
  memory (goal: >= 0.8) and the bytes each holds;
- per-image CPU time and bytes, extrapolated to FFHQ (70,000 images at 1024x1024) on a
  16-core node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, time
from gm.data.config import DatasetConfig
from gm.data.prepare import prepare_dataset
cfg = DatasetConfig(top_resolution=int(sys.argv[3]), fit="center_crop", undersize="skip")
t, c = time.perf_counter(), time.process_time()
m = prepare_dataset(sys.argv[1], sys.argv[2], cfg, progress=False, workers=0)
wall, cpu = time.perf_counter() - t, time.process_time() - c
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"n": m["num_images"], "wall": wall, "cpu": cpu, "rss": rss}))
"""


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` JPEGs (quality 90) in 10 class folders: a bilinear-upsampled 8x8 random colour
    field plus Gaussian noise, so they compress like photographs, not like noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR))
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"c{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)


def subset(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` images of ``src`` as hard links (same bytes, no copy)."""
    for i in range(n):
        f = src / f"c{i % 10}" / f"{i:06d}.jpg"
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, dst / f.parent.name / f.name)


def prepare_in_child(raw: Path, out: Path, resolution: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-c", _CHILD, str(raw), str(out), str(resolution)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise SystemExit(f"prepare failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_reader(ds: Path, r: int, batch: int = 64, steps: int = 150) -> None:
    """Training's reader (gm.data.rowstore) on the top level: images/s streamed over in memory
    (the same batches), and the peak bytes each holds. Streaming is timed first, from a cold
    page cache as far as the OS allows (the file was just written, so it is likely cached)."""
    from gm.data.parquet import level_path
    from gm.data.readers import to_unit_range
    from gm.data.rowstore import RowStore, shard_positions, window_rows

    window = window_rows(r * r * 3)
    speed, steady, held = {}, {}, {}
    for mode in ("stream", "memory"):
        t = time.perf_counter()
        store = RowStore(level_path(ds, r), ("image",), mode=mode, window=window)
        loaded = time.perf_counter()
        peak = store.resident_bytes
        for step in range(steps):
            pos = shard_positions(len(store), step, batch, 0, 1, seed=0, window=window)
            store.prefetch(shard_positions(len(store), step + 1, batch, 0, 1, 0, window))
            to_unit_range(store.take(pos)[0]["image"])
            peak = max(peak, store.resident_bytes)
        end = time.perf_counter()
        speed[mode], steady[mode] = steps * batch / (end - t), steps * batch / (end - loaded)
        held[mode] = peak
    print(f"\ntraining reader, {r}x{r}, batches of {batch}, {steps} steps (window {window} rows):")
    for mode in ("memory", "stream"):
        print(f"  {mode:<7} {speed[mode]:7.0f} img/s with the load, {steady[mode]:7.0f} after it;"
              f" holds at most {held[mode] / 2**20:6.0f} MiB")  # fmt: skip
    print(f"  stream / memory = {speed['stream'] / speed['memory']:.2f}x with the load, "
          f"{steady['stream'] / steady['memory']:.2f}x after it (goal >= 0.8); memory held "
          f"{held['stream'] / held['memory']:.3f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,4000,16000", help="dataset sizes, smallest first")
    ap.add_argument("--resolution", type=int, default=256, help="image side (top level)")
    ap.add_argument("--ray-images", type=int, default=4000, help="images for the Ray timing")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    r = args.resolution
    work = Path(args.work or tempfile.mkdtemp(prefix="gm-bench-scale-"))
    try:
        t = time.perf_counter()
        make_images(work / "all", max(sizes + [args.ray_images]), r)
        print(f"made {max(sizes)} synthetic {r}x{r} JPEGs in {time.perf_counter() - t:.0f} s")

        print(f"\npeak RSS of prepare (one process, workers=0), {r}x{r} → levels {r}..4:")
        rows = {}
        for n in sizes:
            raw = work / f"raw{n}"
            subset(work / "all", raw, n)
            rows[n] = prepare_in_child(raw, work / f"ds{n}", r)
            x = rows[n]
            print(f"  N={n:>6}: peak RSS {x['rss'] / 2**20:7.0f} MiB   {x['n'] / x['wall']:6.0f}"
                  f" img/s   {1e3 * x['cpu'] / x['n']:.1f} ms CPU per image")  # fmt: skip
        lo, hi = rows[sizes[0]], rows[sizes[-1]]
        ratio = hi["rss"] / lo["rss"]
        print(f"  RSS(N={sizes[-1]}) / RSS(N={sizes[0]}) = {ratio:.2f}   (goal <= 1.3; data grew "
              f"{sizes[-1] / sizes[0]:.0f}x)")  # fmt: skip

        ds = work / f"ds{sizes[-1]}"
        m = json.loads((ds / "manifest.json").read_text())
        top_px = m["num_images"] * r * r * 3
        px = sum(m["num_images"] * q * q * 3 for q in m["resolutions"])
        disk = {q: (ds / f"{q}x{q}.parquet").stat().st_size for q in m["resolutions"]}
        print("\npyramid size:")
        print(f"  pixels: all levels / top level = {px / top_px:.3f}   (goal <= 1.45)")
        print(
            f"  on disk (zstd): all levels / top level = {sum(disk.values()) / disk[r]:.3f}"
            f"   ({sum(disk.values()) / 2**20:.1f} MiB for {m['num_images']} images)"
        )

        bench_reader(ds, r)

        from gm.cluster import init_ray
        from gm.data.config import DatasetConfig
        from gm.data.prepare import prepare_dataset

        raw = work / f"raw{args.ray_images}"
        if not raw.exists():
            subset(work / "all", raw, args.ray_images)
        t = time.perf_counter()
        init_ray(0)
        print(f"\nprepare throughput, {args.ray_images} images ({time.perf_counter() - t:.1f} s "
              "to start Ray, excluded):")  # fmt: skip
        cfg = DatasetConfig(top_resolution=r)
        speed, hashes = {}, set()
        for w in (0, 1, 2):
            t = time.perf_counter()
            out = prepare_dataset(raw, work / f"ray{w}", cfg, progress=False, workers=w)
            speed[w] = out["num_images"] / (time.perf_counter() - t)
            hashes.add(json.dumps({k: v["sha256"] for k, v in out["files"].items()}))
            where = "this process" if w == 0 else f"{w} Ray task(s) at a time"
            print(f"  {where:<26} {speed[w]:7.0f} img/s")
        print(f"  2 tasks / 1 task = {speed[2] / speed[1]:.2f}x on {os.cpu_count()} cores; "
              f"identical files for 0, 1 and 2: {len(hashes) == 1}")  # fmt: skip

        # A task decodes and builds pyramids; the driver compresses and writes every level.
        # In-process both run on one core; with one task they overlap, so one task's rate is
        # the task's, and the difference of the two per-image times is about the driver's.
        task_ms, both_ms = 1e3 / speed[1], 1e3 / speed[0]
        driver_ms = max(both_ms - task_ms, 0.05)
        scale = (1024 / r) ** 2
        ffhq, cores = 70_000, 16
        tasks_rate = cores / (task_ms * scale / 1e3)  # 16 tasks, images/s
        driver_rate = 1e3 / (driver_ms * scale)
        rate = min(tasks_rate, driver_rate)
        bytes_1024 = ffhq * 1024 * 1024 * 3 * 4 / 3
        print(f"\nextrapolation to FFHQ ({ffhq:,} images, 1024x1024 RGB), {cores} cores, 128 GiB:")
        print(
            f"  per image at {r}: task {task_ms:.1f} ms, driver ~{driver_ms:.1f} ms; x{scale:.0f} "
            f"pixels at 1024: task {task_ms * scale:.0f} ms, driver ~{driver_ms * scale:.0f} ms"
        )
        print(
            f"  {cores} tasks: {tasks_rate:.0f} img/s; driver: {driver_rate:.0f} img/s → "
            f"~{ffhq / rate / 60:.0f} min ({'driver' if driver_rate < tasks_rate else 'task'}"
            "-bound)"
        )
        print(
            f"  memory: driver ~{hi['rss'] / 2**30:.1f} GiB measured here (one 64 MiB row group "
            f"per level at most), each task a batch of {max(1, (32 << 20) // (1024 * 1024 * 3))}"
            f" images; pyramid {bytes_1024 / 2**30:.0f} GiB of pixels before zstd"
        )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
