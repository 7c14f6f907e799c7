"""DVC stages `train@<name>`, `train_paired@<name>` and `train_codec@<name>`: a prepared
dataset (multi-resolution or paired) → trained model (checkpoint, samples, metrics)."""

from __future__ import annotations

import argparse
import os

from gm import params
from gm.cli import exit_now, guarded
from gm.errors import ConfigError
from gm.forkserver import run_main


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.tracking import repo_root, run_url
    from gm.train.job import run_job

    ap = argparse.ArgumentParser(prog="pipelines.train", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--name", required=True, help="key under SECTION in the params file")
    ap.add_argument(
        "--section",
        choices=("train", "train_paired", "train_codec"),
        default="train",
        help="params section of the job (default: %(default)s)",
    )
    ap.add_argument("--dataset", required=True, help="prepared dataset folder")
    ap.add_argument("--out", required=True, help="output folder (replaced atomically)")
    ap.add_argument("--runs", default="runs", help="Ray run storage, kept across crashes")
    ap.add_argument("--classifier", help="domain classifier: KID is tracked at each checkpoint")
    args = ap.parse_args(argv)
    p = params.load(args.params)
    jobs = getattr(p, args.section)
    if args.name not in jobs:
        raise ConfigError(f"{args.params}: {args.section}.{args.name}: no such training job")
    m = run_job(
        args.name,
        jobs[args.name],
        args.dataset,
        args.out,
        root=repo_root(),
        runs_dir=args.runs,
        stage=os.environ.get("DVC_STAGE") or f"{args.section}@{args.name}",
        progress=True,
        classifier=args.classifier,
    )
    print(
        f"{args.name}: {m['step']} steps, {m['images_seen']} images, "
        f"MLflow run {m['mlflow_run_id']} → {args.out}\n"
        f"  {run_url(repo_root(), m['mlflow_run_id'])}"
    )
    return 0


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
