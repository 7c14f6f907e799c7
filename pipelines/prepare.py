"""DVC stage `prepare@<name>`: raw folder → multi-resolution Parquet dataset."""

from __future__ import annotations

import argparse

from gm import params
from gm.cli import WORKERS_HELP, exit_now, guarded
from gm.errors import ConfigError
from gm.forkserver import run_main


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.data.prepare import prepare_dataset  # here: the fork server client stays light

    ap = argparse.ArgumentParser(prog="pipelines.prepare", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--name", required=True, help="key under `datasets` in the params file")
    ap.add_argument(
        "--raw",
        required=True,
        help="raw folder (images, Parquet tables, zips or tars), an archive, or s3://bucket/prefix",
    )
    ap.add_argument("--out", required=True, help="output dataset folder (replaced atomically)")
    ap.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    args = ap.parse_args(argv)
    p = params.load(args.params)
    if args.name not in p.datasets:
        raise ConfigError(f"{args.params}: datasets.{args.name}: no such dataset")
    m = prepare_dataset(args.raw, args.out, p.datasets[args.name], name=args.name,
                       workers=args.workers)  # fmt: skip
    print(
        f"{args.name}: {m['num_images']} images, {len(m['classes'])} classes, "
        f"levels {m['resolutions']}, {len(m['skipped'])} inputs skipped → {args.out}"
    )
    return 0


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
