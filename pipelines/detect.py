"""DVC stage `detect@<name>`: a real-vs-generated detector of a dataset, trained against the
samples of every model of that dataset, and each model's detectability (gm.detect): ROC-AUC,
average precision, calibrated accuracy; after JPEG and a resize; leave-one-family-out."""

from __future__ import annotations

import argparse
from pathlib import Path

from gm import params
from gm.cli import exit_now, guarded
from gm.errors import ConfigError
from gm.forkserver import run_main


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.detect import log_to_mlflow, plot_roc, run_detection, save_detector
    from gm.io import atomic_files, atomic_path, sha256_file, write_json
    from gm.tracking import repo_root

    ap = argparse.ArgumentParser(prog="pipelines.detect", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--name", required=True, help="key under `detect` in the params file")
    ap.add_argument("--dataset", required=True, help="prepared dataset folder (real images)")
    ap.add_argument("--samples", required=True, help="folder of <job>.parquet sample files")
    ap.add_argument("--out", required=True, help="folder for detector.pt (replaced atomically)")
    ap.add_argument("--report", required=True, help="report path without suffix: .json, .png")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    p = params.load(args.params)
    if args.name not in p.detect:
        raise ConfigError(f"{args.params}: detect.{args.name}: no such detection stage")
    cfg = p.detect[args.name]
    jobs = p.jobs_of(cfg.dataset)
    files = {job: Path(args.samples) / f"{job}.parquet" for job in jobs}
    resolution = min(p.datasets[cfg.dataset].top_resolution, p.evaluate.max_resolution)
    net, report, curves = run_detection(args.dataset, files, resolution, cfg, not args.quiet)
    channels = p.datasets[cfg.dataset].channels
    info = {"dataset": cfg.dataset, "resolution": report["resolution"], "channels": channels,
            "threshold": report["threshold"], "models": jobs}  # fmt: skip
    with atomic_files(Path(args.out)) as tmp:  # DVC's .gitignore there stays
        save_detector(tmp / "detector.pt", net, cfg, info)
    sha = sha256_file(Path(args.out) / "detector.pt")
    report = {"name": args.name, "dataset": cfg.dataset, "detector_sha256": sha, **report}
    image = plot_roc(curves, f"{cfg.dataset}: real vs generated, per model (ROC)")
    with atomic_path(f"{args.report}.png") as tmp:
        image.save(tmp, format="PNG")
    write_json(f"{args.report}.json", report)
    logged = log_to_mlflow(repo_root(), report, sha)
    print(render(report))
    print(f"→ {args.out}/detector.pt, {args.report}.json/.png; {logged} MLflow run(s) updated")
    return 0


def render(report: dict) -> str:
    """The report as an aligned text table."""
    conds = [c for c in report["conditions"] if c != "clean"]
    keys = {c: ("auc_loo" if c == "leave-one-family-out" else f"auc_{c}") for c in conds}
    head = f"{'model':<10} {'family':<9} {'AUC':>22} {'AP':>6} {'acc.':>22}"
    head += "".join(f" {('AUC ' + c[:9]):>14}" for c in conds)
    lines = [f"{report['dataset']}: detector at {report['resolution']}x{report['resolution']}, "
             f"threshold {report['threshold']:.3g}", head]  # fmt: skip
    for job, r in report["models"].items():
        if "unavailable" in r:
            lines.append(f"{job:<10} {r['family']:<9} unavailable: {r['unavailable']}")
            continue
        auc = f"{r['auc']:.3f} [{r.get('auc_ci_low', r['auc']):.3f}, {r.get('auc_ci_high', r['auc']):.3f}]"  # noqa: E501
        acc = (f"{r['accuracy']:.3f} [{r.get('accuracy_ci_low', r['accuracy']):.3f}, "
               f"{r.get('accuracy_ci_high', r['accuracy']):.3f}]")  # fmt: skip
        row = f"{job:<10} {r['family']:<9} {auc:>22} {r['ap']:>6.3f} {acc:>22}"
        row += "".join(f" {r[k]:>14.3f}" if k in r else f" {'–':>14}" for k in keys.values())
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
