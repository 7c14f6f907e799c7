"""GPU readiness: every model family trained on one CUDA device with AMP, then in fp32.

    make gpu-check        # = python bench/gpu_check.py
    python bench/gpu_check.py [--steps 300] [--batch 32] [--resolution 64] [--families a,b]
                              [--device cuda] [--ddp auto|nccl|gloo|off] [--out table.md]

For each family (``gm models``) at ``--resolution`` (64: every growing family grows to it), with
the default pipeline's architecture (params.yaml's ``model`` of the job of that family) on
3-channel, 10-class data, it prints one row:

- images/s with AMP (torch.autocast float16 + GradScaler, what ``run.amp`` does on CUDA) and in
  fp32, after a warm-up of a fifth of the steps, and AMP over fp32;
- peak GPU memory of each (``torch.cuda.max_memory_allocated``, MiB);
- that the AMP run's checkpoint resumes: written with gm's ``save_checkpoint``, loaded into a
  freshly built trainer, every weight, EMA copy, optimizer moment and the scaler bit-identical,
  and the next step's losses from the original and the restored trainer (same batch, same RNG)
  printed with their largest relative difference (cuDNN picks kernels per run, so not always 0);
- the resolution a growing family reached (Progressive GAN, StyleGAN: ``--resolution``);
- ``ok`` or the error (a non-finite loss under AMP is the usual one).

Then, where two devices exist (``--ddp auto``: two CUDA devices), one 2-process DDP run of the
conditional GAN over NCCL: images/s of both ranks together, and that the ranks' weights are
identical after training. ``--ddp gloo --device cpu`` runs the same on CPU (tests use it).

The data are synthetic (smooth random images made on the device, so no data loading is timed
and nothing is read from disk): this measures the models and the training loop, not the data
path. Exit status 1 if any family fails. ``--out`` also writes the table as Markdown.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = 10
CHANNELS = 3
POOL = 256  # synthetic images per domain, cycled through


def job_models() -> dict[str, dict]:
    """The default pipeline's ``model`` dict of each family (params.yaml, first job of it)."""
    from gm.config import yaml_load

    raw = yaml_load((REPO / "params.yaml").read_text())
    found: dict[str, dict] = {}
    for section in ("train", "train_paired", "train_codec"):
        for job in (raw.get(section) or {}).values():
            found.setdefault(job["family"], dict(job.get("model") or {}))
    return found


def model_config(name: str, base: dict, steps: int, batch: int, resolution: int) -> dict:
    """``base`` adapted so a short run exercises every phase of the family: growing families
    reach ``resolution`` halfway through, SRGAN starts its adversarial phase halfway."""
    cfg = dict(base)
    if "growth" in cfg or name in ("progan", "stylegan"):
        growth = dict(cfg.get("growth") or {})
        start = growth.get("start_resolution") or (8 if name == "stylegan" else 4)
        transitions = int(math.log2(resolution // start))
        per = max(batch, (steps // 2) * batch // max(1, 2 * transitions))
        cfg["growth"] = growth | {"fade_images": per, "stable_images": per}
    if name == "srgan":
        cfg["pretrain_steps"] = steps // 2
    return cfg


class Synthetic:
    """Smooth random images in [-1, 1] made on ``device``, at every pyramid level asked for;
    domain A (the paired families' inputs) is a second, independent set."""

    def __init__(self, resolution: int, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.top, self.device = resolution, device
        self.sets = {}
        for domain in ("B", "A"):
            coarse = torch.rand(POOL, CHANNELS, 8, 8, generator=g)
            top = F.interpolate(coarse, size=resolution, mode="bicubic", align_corners=False)
            self.sets[domain] = {resolution: (top.clamp(0, 1) * 2 - 1).to(device)}
        self.labels = torch.randint(0, CLASSES, (POOL,), generator=g).to(device)

    def level(self, resolution: int, domain: str = "B") -> torch.Tensor:
        levels = self.sets[domain]
        if resolution not in levels:
            levels[resolution] = F.adaptive_avg_pool2d(levels[self.top], resolution)
        return levels[resolution]

    def batch(self, trainer, step: int, batch: int):
        from gm.train.protocol import Batch

        model = trainer.model
        g = model.growth(trainer.images_seen)
        res = g.resolution if g is not None else self.top
        n = (g.batch_size if g is not None and g.batch_size else None) or batch
        idx = (torch.arange(n, device=self.device) + step * n) % POOL
        levels = {r: self.level(r)[idx] for r in model.pyramid_levels()}
        src, inputs = model.pair_source(), None
        if src is not None and src.scale > 1:  # super-resolution: the targets downscaled
            inputs = self.level(res // src.scale)[idx]
        elif src is not None:  # translation: the other domain (aligned or not, same cost)
            inputs = self.level(res, "A")[idx]
        return Batch(self.level(res)[idx], self.labels[idx], levels, inputs)


def build(name: str, cfg: dict, resolution: int, device, amp: bool, seed: int = 0):
    from gm.config import from_dict
    from gm.registry import families
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    fam = families()[name]
    torch.manual_seed(seed)
    config = from_dict(fam.config, cfg, f"{name}.model")
    info = DataInfo(resolution=resolution, channels=CHANNELS, num_classes=CLASSES)
    model = fam.build(config, info)
    ema = 0.99 if model.ema_modules else 0.0
    return Trainer(model, device=device, amp=amp, ema_beta=ema), config, info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(name, cfg, data, args, device, amp: bool):
    """(trainer, config, info, images/s after warm-up, peak MiB or None)."""
    trainer, config, info = build(name, cfg, args.resolution, device, amp)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    warmup = max(1, args.steps // 5)
    images = 0
    for step in range(args.steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        batch = data.batch(trainer, step, args.batch)
        trainer.train_step(batch)
        if step >= warmup:
            images += batch.images.shape[0]
    sync(device)
    rate = images / max(time.perf_counter() - start, 1e-9)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return trainer, config, info, rate, peak


def same_state(a, b, where: str = "") -> str | None:
    """The first path at which two nested states differ (tensors bit for bit), else None."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        return None if same else where
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where} keys"
        for k in a:
            if k == "rng":
                continue
            found = same_state(a[k], b[k], f"{where}/{k}")
            if found:
                return found
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{where} length"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = same_state(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else where


def resume_check(name, trainer, config, info, data, args, device) -> str:
    """Save, restore into a fresh trainer, compare state bit for bit and the next step."""
    from gm.train.checkpoint import load_checkpoint, save_checkpoint
    from gm.train.loop import Trainer, rng_state, set_rng_state

    saved = trainer.state_dict()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint.pt"
        save_checkpoint(path, name, config, info, saved, extra={})
        payload = load_checkpoint(path, family=name)
    from gm.registry import families

    restored = Trainer(
        families()[name].build(config, info),
        device=device,
        amp=trainer.amp,
        ema_beta=0.99 if trainer.ema else 0.0,
    )
    restored.load_state_dict(payload["trainer"])
    differs = same_state(saved, restored.state_dict())
    if differs:
        return f"FAIL: restored state differs at {differs}"
    rng = rng_state()
    batch = data.batch(trainer, trainer.step, args.batch)
    a = restored.train_step(batch)
    set_rng_state(rng)
    b = trainer.train_step(batch)
    losses = [k for k in a if k.startswith("loss/")]
    rel = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in losses) if losses else 0.0
    return f"bit-identical; next step Δ {rel:.1e}"


def check_family(name, base, data, args, device) -> dict:
    cfg = model_config(name, base, args.steps, args.batch, args.resolution)
    row = {"family": name, "status": "ok"}
    try:
        trainer, config, info, rate, peak = timed_run(name, cfg, data, args, device, amp=True)
        g = trainer.model.growth(trainer.images_seen)
        row |= {"amp_img_s": rate, "amp_mib": peak, "reached": g.resolution if g else None}
        row["resume"] = resume_check(name, trainer, config, info, data, args, device)
        if row["resume"].startswith("FAIL"):
            row["status"] = "FAIL"
        del trainer
        _, _, _, rate32, peak32 = timed_run(name, cfg, data, args, device, amp=False)
        row |= {"fp32_img_s": rate32, "fp32_mib": peak32, "amp_over_fp32": rate / rate32}
    except Exception as e:  # a row per family, whatever breaks
        row["status"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if args.verbose:
            traceback.print_exc()
    return row


# --- DDP ----------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, backend: str, port: int, args, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        from gm.config import from_dict
        from gm.registry import families
        from gm.train.loop import Trainer
        from gm.train.protocol import DataInfo

        fam = families()["cgan"]
        torch.manual_seed(0)  # the same initial weights on every rank
        info = DataInfo(resolution=args.resolution, channels=CHANNELS, num_classes=CLASSES)
        model = fam.build(from_dict(fam.config, job_models().get("cgan", {}), "cgan"), info)
        trainer = Trainer(model, device=device, distributed=True, amp=True, world_size=world)
        data = Synthetic(args.resolution, device, seed=1 + rank)  # each rank its own shard
        torch.manual_seed(1 + rank)
        warmup = max(1, args.steps // 5)
        for step in range(args.steps):
            if step == warmup:
                sync(device)
                dist.barrier()
                start = time.perf_counter()
            trainer.train_step(data.batch(trainer, step, args.batch))
        sync(device)
        seconds = time.perf_counter() - start
        flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered[1:])
            rate = (args.steps - warmup) * args.batch * world / seconds
            Path(out).write_text(f"{rate} {int(same)}")
    finally:
        dist.destroy_process_group()


def ddp_check(backend: str, args) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "ddp.txt")
        mp.spawn(_ddp_worker, args=(2, backend, port, args, out), nprocs=2, join=True)
        rate, same = Path(out).read_text().split()
    return {"backend": backend, "img_s": float(rate), "replicas_identical": same == "1"}


# --- table --------------------------------------------------------------------------------------


def render(rows: list[dict], ddp: dict | str, device: torch.device, args) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        f"gm gpu-check: {name}, torch {torch.__version__}, {args.resolution}x{args.resolution}, "
        f"batch {args.batch}, {args.steps} steps per run (synthetic data)",
        "",
        "| family | AMP img/s | fp32 img/s | AMP/fp32 | peak MiB AMP | peak MiB fp32 | grown to "
        "| resume | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {num(r.get('amp_img_s'), '.0f')} "
            f"| {num(r.get('fp32_img_s'), '.0f')} | {num(r.get('amp_over_fp32'), '.2f')} "
            f"| {num(r.get('amp_mib'), '.0f')} | {num(r.get('fp32_mib'), '.0f')} "
            f"| {num(r.get('reached'), 'd')} | {r.get('resume', '-')} | {r['status']} |"
        )
    lines.append("")
    if isinstance(ddp, dict):
        lines.append(
            f"DDP, 2 processes ({ddp['backend']}), cgan: {ddp['img_s']:.0f} img/s in all; "
            f"replicas identical after training: {'yes' if ddp['replicas_identical'] else 'NO'}"
        )
    else:
        lines.append(f"DDP, 2 processes: {ddp}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--families", default="", help="comma-separated (default: every family)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--ddp", default="auto", choices=["auto", "nccl", "gloo", "off"])
    p.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = p.parse_args(argv)

    from gm.registry import families

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    known = families()
    names = [n for n in args.families.split(",") if n] or list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        print(f"gpu-check: --families: unknown {unknown} (known: {', '.join(known)})",
              file=sys.stderr)  # fmt: skip
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models = job_models()
    data = Synthetic(args.resolution, device)
    rows = []
    for name in names:
        t = time.perf_counter()
        row = check_family(name, models.get(name, {}), data, args, device)
        print(f"{name}: {row['status']} ({time.perf_counter() - t:.0f} s)", flush=True)
        rows.append(row)
    backend = args.ddp
    if backend == "auto":
        backend = "nccl" if torch.cuda.device_count() >= 2 else "off"
    if backend == "off":
        ddp = f"skipped ({torch.cuda.device_count()} CUDA device(s); it needs 2)"
    else:
        try:
            ddp = ddp_check(backend, args)
        except Exception as e:
            ddp = f"FAIL: {type(e).__name__}: {e}"
    table = render(rows, ddp, device, args)
    print(table)
    if args.out:
        args.out.write_text(table)
    failed = any(r["status"] != "ok" for r in rows) or str(ddp).startswith("FAIL")
    if isinstance(ddp, dict) and not ddp["replicas_identical"]:
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
