"""Hyperparameter-search benchmark: the default search of params.yaml (``tune.dcgan``) with
ASHA against the same trials run to the full budget (FIFO), measured in one run.

    python bench/bench_tune.py [--name dcgan] [--samples 6]

Both searches sample the same configurations (random search, one seed), so the comparison is
the scheduler's alone. Prints, for each: wall time, trials per hour, trial-seconds and
optimizer steps spent (the compute), how many trials were stopped early, and the best metric
among trials that ran the full budget; then the ratios ASHA / full budget. Needs the prepared
dataset and its domain classifier (``dvc repro tune@dcgan`` builds both; else they are built
here from the packaged data).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def inputs(work: Path, job) -> tuple[Path, Path]:
    """The job's prepared dataset and domain classifier: the repository's, or built here."""
    ds = REPO / "datasets/pyramid" / job.dataset
    clf = REPO / "models/classifiers" / job.dataset / "classifier.pt"
    if not (ds / "manifest.json").is_file():
        from gm import params
        from gm.data.prepare import prepare_dataset
        from gm.data.sources import materialize

        materialize(work / "raw", only=[job.dataset], progress=False)
        cfg = params.load(REPO / "params.yaml").datasets[job.dataset]
        ds = work / "pyramid" / job.dataset
        prepare_dataset(work / "raw" / job.dataset, ds, cfg, progress=False)
    if not clf.is_file():
        from gm import params
        from gm.metrics.classifier import save_classifier, train_classifier

        ev = params.load(REPO / "params.yaml").evaluate
        res = min(job.resolution or 10**9, ev.max_resolution)
        net, report = train_classifier(ds, res, ev.classifier, progress=False)
        clf = work / "classifier.pt"
        save_classifier(clf, net, ev.classifier, report)
    return ds, clf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="dcgan", help="a search of params.yaml: tune")
    ap.add_argument("--samples", type=int, default=0, help="trials (default: the search's)")
    args = ap.parse_args()

    from gm import params
    from gm.tune import run_search

    p = params.load(REPO / "params.yaml")
    search = p.tune[args.name]
    section, job = p.job(search.job)
    search = replace(search, search="random", num_samples=args.samples or search.num_samples)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
        ds, clf = inputs(work, job)
        out = {}
        for scheduler in ("asha", "fifo"):
            s = replace(search, scheduler=scheduler)
            out[scheduler] = run_search(
                args.name, s, section, job, ds, work / scheduler, work / f"{scheduler}.json",
                work / f"{scheduler}.png", root=work, runs=work / "runs", classifier=clf,
            )  # fmt: skip
    print(
        f"\nsearch tune.{args.name}: {search.num_samples} trials of {search.job}, "
        f"{search.steps or job.run.steps} steps each, {search.max_concurrent_trials} at a "
        f"time, {search.cpus_per_trial:g} CPU each; metric {search.metric} ({search.mode})"
    )
    print(f"{'':>12} {'wall s':>8} {'trials/h':>9} {'trial-s':>9} {'steps':>7} "
          f"{'stopped':>8} {'best':>9}")  # fmt: skip
    for name, label in (("asha", "ASHA"), ("fifo", "full budget")):
        r = out[name]
        print(
            f"{label:>12} {r['wall_s']:8.1f} {3600 * r['trials'] / r['wall_s']:9.1f} "
            f"{r['trial_seconds']:9.1f} {r['trial_steps']:7d} {r['stopped_early']:8d} "
            f"{r['best'][search.metric]:9.4g}"
        )
    a, f = out["asha"], out["fifo"]
    print(
        f"ASHA / full budget: wall {a['wall_s'] / f['wall_s']:.2f}, "
        f"trial-seconds {a['trial_seconds'] / f['trial_seconds']:.2f}, "
        f"optimizer steps {a['trial_steps'] / f['trial_steps']:.2f}"
    )


if __name__ == "__main__":
    main()
