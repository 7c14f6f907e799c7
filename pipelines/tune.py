"""DVC stage `tune@<name>`: a hyperparameter search (Ray Tune) over a training job →
best_params.yaml, trials.csv (in OUT), a JSON summary and a picture of the trials' curves."""

from __future__ import annotations

import argparse
import os

from gm import params
from gm.cli import exit_now, guarded
from gm.forkserver import run_main


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.tracking import repo_root
    from gm.tune import run_search, search_paths

    ap = argparse.ArgumentParser(prog="pipelines.tune", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--name", required=True, help="key of the tune section")
    ap.add_argument("--out", help="results folder, replaced atomically (default: tune/NAME)")
    ap.add_argument("--report", help="summary REPORT.json and REPORT.png (default: "
                    "reports/tune/NAME)")  # fmt: skip
    ap.add_argument("--runs", default="runs", help="Tune storage, kept across crashes: a folder "
                    "or a URI such as s3://bucket/gm-runs (default: %(default)s)")  # fmt: skip
    ap.add_argument("--datasets", default="datasets",
                    help="prepared datasets (default: %(default)s)")  # fmt: skip
    ap.add_argument("--classifiers", default="models/classifiers",
                    help="domain classifiers, for KID (default: %(default)s)")  # fmt: skip
    args = ap.parse_args(argv)
    p = params.load(args.params)
    where = search_paths(p, args.name, args.datasets, args.classifiers)
    report = args.report or f"reports/tune/{args.name}"
    clf = where["classifier"]
    summary = run_search(
        args.name,
        where["search"],
        where["section"],
        where["job"],
        where["dataset_dir"],
        args.out or f"tune/{args.name}",
        f"{report}.json",
        f"{report}.png",
        root=repo_root(),
        runs=args.runs,
        classifier=clf if clf is not None and clf.is_file() else None,
        stage=os.environ.get("DVC_STAGE") or f"tune@{args.name}",
    )
    best = summary["best"]
    metric = where["search"].metric
    print(
        f"tune.{args.name}: {summary['trials']} trials ({summary['stopped_early']} stopped "
        f"early) in {summary['wall_s']:.0f} s; best {metric} {best[metric]:.4g} "
        f"(trial {best['trial_id']}) → {args.out or f'tune/{args.name}'}/best_params.yaml"
    )
    return 0


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
