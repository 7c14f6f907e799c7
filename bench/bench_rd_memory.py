"""The rd stage's memory as the held-out split grows: streamed (gm.metrics.rd.evaluate_rd, one
block at a time) against every held-out block in memory at once (the list the stage held
before it streamed), in the same run.

    python bench/bench_rd_memory.py [--photos 4,16] [--side 1024] [--work DIR]

Makes N synthetic JPEG photographs (bench_scale's smooth colour fields, ``--side`` square) for
each N, prepares each set as the ``photos`` dataset is prepared (64-pixel tiles, blocks of 4×4
tiles, half the blocks held out; row groups of 1 MiB, so that the small sets span many row
groups as a large dataset's 64 MiB groups do), and scores a small learned codec and JPEG on the
held-out blocks in a fresh process per (N, mode). Prints, per N: the held-out pixels' bytes and
the peak resident memory each mode adds above its process after imports and a warm-up on one
block (Linux's VmHWM, reset through /proc/self/clear_refs); then the growth ratios, largest N over
smallest (the goal for the streamed stage is <= 1.3: bounded by a block and a row group, not by
the split, while the list grows with it), and the memory each mode adds per MiB of held-out
pixels added.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_CHILD = """
import json, resource, sys
from pathlib import Path
import numpy as np
from gm.metrics import rd

ds, sweep_dir, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = rd.RDConfig(dataset="bench", sweep="s", split="test", layout="blocks",
                  baselines=("jpeg",), anchor="jpeg")
sweep = rd.load_sweep(sweep_dir)
# warm up on one synthetic block (lazy imports, first allocations) so that what follows the
# reset below is the held-out data's cost alone
warm = [np.full((256, 256, 3), 128, np.uint8)]
rd.codec_point(sweep[0][1], warm)
rd.baseline_points(warm, "jpeg", with_ms_ssim=True)
rd.bd_rate([(0.1, 30.0), (1.0, 40.0)], [(0.2, 31.0), (0.9, 39.0)])


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


start = status("VmRSS")
try:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    peak = lambda: status("VmHWM")
except OSError:
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if mode == "stream":
    result, _ = rd.evaluate_rd(cfg, ds, sweep, progress=False)
    images, psnr = result["images"], result["learned"][0]["psnr"]
else:  # every held-out block in memory, then each codec's pass over the list
    blocks = rd.held_out_images(cfg, ds)
    psnr = rd.codec_point(sweep[0][1], blocks)["psnr"]
    rd.baseline_points(blocks, "jpeg", with_ms_ssim=True)
    images = len(blocks)
print(json.dumps({"added": peak() - start, "images": images, "psnr": psnr}))
"""


def make_sweep(out: Path) -> Path:
    """A sweep folder (checkpoints/t0/{checkpoint.pt, trial.json}) holding one small codec,
    fitted for a few steps on smooth images: what the rd stage loads from a tune stage."""
    import torch

    from gm.models.codec import Codec, CodecConfig
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import Batch, DataInfo, OptimConfig

    torch.manual_seed(0)
    cfg = CodecConfig(n=16, m=16, lmbda=0.01, optim=OptimConfig(lr=2e-3, betas=(0.9, 0.999)))
    model = Codec(cfg, DataInfo(64, 3, 1))
    trainer = Trainer(model)
    for _ in range(20):
        low = torch.rand(8, 3, 4, 4)
        x = torch.nn.functional.interpolate(low, size=64, mode="bilinear") * 2 - 1
        trainer.train_step(Batch(x, torch.zeros(8, dtype=torch.long)))
    d = out / "checkpoints" / "t0"
    d.mkdir(parents=True)
    save_checkpoint(d / "checkpoint.pt", "codec", model.cfg, model.info, trainer.state_dict())
    (d / "trial.json").write_text(json.dumps({"trial_id": "t0", "steps": 20, "status": "full",
                                              "mlflow_run_id": "", "values": {}}))  # fmt: skip
    return out


def prepare(raw: Path, out: Path) -> None:
    from gm.data import parquet
    from gm.data.config import DatasetConfig, SplitConfig
    from gm.data.prepare import prepare_dataset

    parquet.ROW_GROUP_BYTES = 1 << 20
    cfg = DatasetConfig(top_resolution=64, fit="tile", split_by="block", split_block=4,
                        split=SplitConfig(train=0.25, val=0.25, test=0.5))  # fmt: skip
    prepare_dataset(raw, out, cfg, progress=False, workers=0)


def measure(ds: Path, sweep: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _CHILD, str(ds), str(sweep), mode]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise SystemExit(f"{mode} on {ds} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    from bench.bench_scale import make_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", default="4,16", help="photo counts, comma-separated")
    ap.add_argument("--side", type=int, default=1024, help="photo side in pixels")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    counts = [int(n) for n in args.photos.split(",")]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        sweep = make_sweep(work / "sweep")
        rows = []
        for n in counts:
            raw = work / f"raw{n}"
            make_images(work / "classes", n, args.side, seed=n)
            raw.mkdir()
            for f in (work / "classes").rglob("*.jpg"):  # one class, as data/photos
                f.rename(raw / f.name)
            prepare(raw, work / f"ds{n}")
            stream = measure(work / f"ds{n}", sweep, "stream")
            held = measure(work / f"ds{n}", sweep, "list")
            if stream["images"] != held["images"] or abs(stream["psnr"] - held["psnr"]) > 1e-9:
                raise SystemExit(f"N={n}: the modes scored different images: {stream} {held}")
            pixels = stream["images"] * 256 * 256 * 3
            rows.append((n, stream["images"], pixels, stream["added"], held["added"]))
    mib = 1 << 20
    print(f"{'photos':>6} {'blocks':>6} {'held-out MiB':>12} {'streamed +MiB':>13} "
          f"{'list +MiB':>9}")  # fmt: skip
    for n, images, pixels, s, h in rows:
        print(f"{n:>6} {images:>6} {pixels / mib:>12.1f} {s / mib:>13.1f} {h / mib:>9.1f}")
    (n0, _, p0, s0, h0), (n1, _, p1, s1, h1) = rows[0], rows[-1]
    print(f"held-out pixels {n1} over {n0} photos: {p1 / p0:.2f}x; peak added, streamed: "
          f"{s1 / max(s0, 1):.2f}x (goal <= 1.3), all in memory: {h1 / max(h0, 1):.2f}x; "
          f"streamed over all in memory at {n1} photos: {s1 / max(h1, 1):.2f}")  # fmt: skip
    print(f"MiB added per MiB more held out: streamed {(s1 - s0) / (p1 - p0):.2f}, all in "
          f"memory {(h1 - h0) / (p1 - p0):.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
