"""DVC stage `pairs@<name>`: prepared pyramid → paired dataset (SR, translation, conditional)."""

from __future__ import annotations

import argparse

from gm import params
from gm.cli import exit_now, guarded
from gm.errors import ConfigError
from gm.forkserver import run_main


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.data.pairs import build_pairs  # here: the fork server client stays light

    ap = argparse.ArgumentParser(prog="pipelines.pairs", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--name", required=True, help="key under `pairs` in the params file")
    ap.add_argument("--pyramid", required=True, help="prepared dataset folder it reads")
    ap.add_argument("--out", required=True, help="output folder (replaced atomically)")
    args = ap.parse_args(argv)
    p = params.load(args.params)
    if args.name not in p.pairs:
        raise ConfigError(f"{args.params}: pairs.{args.name}: no such paired dataset")
    m = build_pairs(args.pyramid, args.out, p.pairs[args.name], name=args.name)
    files = ", ".join(f"{k} ({v['rows']} rows)" for k, v in m["files"].items())
    print(f"{args.name}: {m['kind']} from {m['dataset']} → {args.out}: {files}")
    return 0


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
