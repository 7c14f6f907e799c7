"""DVC stage `evaluate@<name>`: a trained model's metrics beside their real-data baselines,
written as a DVC metrics file and logged to the model's own MLflow run."""

from __future__ import annotations

import argparse
import sys

from gm import params
from gm.cli import exit_now, guarded
from gm.errors import ConfigError
from gm.forkserver import run_main


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.io import write_json
    from gm.metrics.evaluate import evaluate_checkpoint, log_to_mlflow, unavailable_warning
    from gm.tracking import register_champion, repo_root

    ap = argparse.ArgumentParser(prog="pipelines.evaluate", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--name", required=True, help="key under `train` in the params file")
    ap.add_argument("--checkpoint", required=True, help="the model's checkpoint.pt")
    ap.add_argument("--classifier", required=True, help="the dataset's classifier.pt")
    ap.add_argument("--dataset", required=True, help="prepared dataset folder")
    ap.add_argument("--out", required=True, help="metrics JSON to write (atomically)")
    ap.add_argument("--samples", help="also write the generated images here (Parquet, for the "
                    "detect stage)")  # fmt: skip
    args = ap.parse_args(argv)
    p = params.load(args.params)
    if args.name not in p.train:
        raise ConfigError(f"{args.params}: train.{args.name}: no such training job")
    results = evaluate_checkpoint(
        args.checkpoint, args.classifier, args.dataset, p.evaluate, samples_path=args.samples
    )
    results = {"name": args.name, "dataset": p.train[args.name].dataset, **results}
    write_json(args.out, results)
    log_to_mlflow(repo_root(), results)
    warning = unavailable_warning(results)
    if warning:
        print(warning, file=sys.stderr)
    champ = None  # a withheld metric is no key of results: register_champion moves nothing
    if p.evaluate.champion_metric:
        champ = register_champion(repo_root(), args.name, results, p.evaluate.champion_metric)
    shown = ", ".join(
        f"{k} {results[k]:.4g} (real {results[k + '_baseline']:.4g})"
        for k in ("fid", "kid")
        if k in results
    )
    print(f"{args.name}: {shown} → {args.out}")
    if champ:
        state = (
            f"is the champion (before: v{champ['previous']}, {champ['previous_value']:.4g})"
            if champ["champion"] and champ["previous"] not in (None, champ["version"])
            else "is the champion" if champ["champion"]
            else f"stays behind champion v{champ['previous']} ({champ['previous_value']:.4g})"
        )  # fmt: skip
        print(f"  models:/{champ['model']}/{champ['version']} ({champ['metric']} "
              f"{champ['value']:.4g}) {state}")  # fmt: skip
    return 0


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
