"""DVC stage `classifier@<dataset>`: the domain classifier whose features FID/KID use."""

from __future__ import annotations

import argparse
from pathlib import Path

from gm import params
from gm.cli import exit_now, guarded
from gm.errors import ConfigError
from gm.forkserver import run_main


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.io import atomic_files, write_json
    from gm.metrics.classifier import save_classifier, train_classifier

    ap = argparse.ArgumentParser(prog="pipelines.classifier", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--name", required=True, help="key under `datasets` in the params file")
    ap.add_argument("--pyramid", required=True, help="prepared dataset folder")
    ap.add_argument("--out", required=True, help="output folder (its files replaced atomically)")
    args = ap.parse_args(argv)
    p = params.load(args.params)
    if args.name not in p.datasets:
        raise ConfigError(f"{args.params}: datasets.{args.name}: no such dataset")
    resolution = min(p.datasets[args.name].top_resolution, p.evaluate.max_resolution)
    cfg = p.evaluate.classifier
    net, report = train_classifier(args.pyramid, resolution, cfg)
    with atomic_files(Path(args.out)) as tmp:  # DVC's .gitignore there stays
        save_classifier(tmp / "classifier.pt", net, cfg, report)
        write_json(tmp / "metrics.json", report)
    print(
        f"{args.name}: classifier at {resolution}x{resolution}, test accuracy "
        f"{report['test_accuracy']:.3f} (chance {report['chance_accuracy']:.3f}) → {args.out}"
    )
    return 0


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
