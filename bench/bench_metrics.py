"""Cost of the in-training metric: KID on a fixed, seeded sample set at each checkpoint,
against the training steps between two checkpoints, measured in one run.

    python bench/bench_metrics.py [--steps 40] [--every 250]

Prints, for the default conditional GAN on 32x32 digits (batch 64) and DCGAN on 32x32 emoji:
seconds per training step, seconds per KID probe (256 samples against 256 validation images in
the domain classifier's feature space, 20 subsets), and the probe's share of training time at a
checkpoint every ``--every`` steps (params.yaml's default: 250; target < 10 %).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {  # job: (family, dataset, model config)
    "cgan": ("cgan", "digits", {"ngf": 32, "ndf": 32}),
    "dcgan": ("dcgan", "emoji", {"ngf": 32, "ndf": 32}),
}


def prepared(name: str, work: Path) -> Path:
    """The repository's prepared dataset if present, else prepared here from the same source."""
    ds = REPO / "datasets/pyramid" / name
    if (ds / "manifest.json").is_file():
        return ds
    from gm import params
    from gm.data.prepare import prepare_dataset
    from gm.data.sources import materialize

    materialize(work / "raw", only=[name], progress=False)
    cfg = params.load(REPO / "params.yaml").datasets[name]
    prepare_dataset(work / "raw" / name, work / name, cfg, progress=False)
    return work / name


def measure(job: str, steps: int, work: Path) -> tuple[float, float]:
    from gm.config import from_dict
    from gm.data.readers import ImageDataset, to_unit_range
    from gm.metrics.classifier import ClassifierConfig, save_classifier, train_classifier
    from gm.metrics.evaluate import KidProbe
    from gm.registry import families
    from gm.train.job import data_info
    from gm.train.loop import Trainer
    from gm.train.protocol import Batch, DataInfo
    from gm.train.ray_train import shard_indices

    family, name, model = CASES[job]
    ds = prepared(name, work)
    info = DataInfo(**data_info(ds, 32))
    clf_cfg = ClassifierConfig(width=16, steps=20, batch_size=64)  # cost, not accuracy, matters
    net, report = train_classifier(ds, 32, clf_cfg, progress=False)
    save_classifier(work / f"{job}-clf.pt", net, clf_cfg, report)
    fam = families()[family]
    torch.manual_seed(0)
    trainer = Trainer(fam.build(from_dict(fam.config, model, family), info))
    data = ImageDataset(ds, 32, split="train")
    for _ in range(5):  # warm-up
        idx = shard_indices(len(data), trainer.step, 64, 0, 1, 0)
        trainer.train_step(Batch(to_unit_range(data.pixels[idx]), data.labels[idx]))
    tick = time.perf_counter()
    for _ in range(steps):
        idx = shard_indices(len(data), trainer.step, 64, 0, 1, 0)
        trainer.train_step(Batch(to_unit_range(data.pixels[idx]), data.labels[idx]))
    step_s = (time.perf_counter() - tick) / steps
    probe = KidProbe(work / f"{job}-clf.pt", ds, info)
    probe(trainer)  # warm-up
    tick = time.perf_counter()
    for _ in range(3):
        probe(trainer)
    return step_s, (time.perf_counter() - tick) / 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=250)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        print(f"in-training KID every {args.every} steps (torch threads: 2)")
        for job in CASES:
            step_s, kid_s = measure(job, args.steps, Path(d))
            share = kid_s / (args.every * step_s + kid_s)
            print(
                f"{job:6s} {step_s * 1000:7.1f} ms/step  KID probe {kid_s:6.2f} s  "
                f"share of training time {share * 100:5.2f} %"
            )


if __name__ == "__main__":
    main()
