"""Run a preset: a YAML file of params.yaml entries to add or change, as one DVC experiment of
the root pipeline (``dvc exp run -S …``), e.g. ``presets/long/params.yaml`` (``make
repro-long``).

A preset declares no stages of its own: its entries extend the root pipeline's ``foreach``
stages (a ``tune.<name>`` entry is the stage ``tune@<name>``), so the main branch declares no
output that only the preset makes. A fresh clone's ``dvc metrics show`` and ``dvc plots show``
warn of nothing absent, and ``dvc status`` after ``make repro`` says the pipeline is up to date.
The experiment reruns only what the preset changes; its params, ``dvc.lock`` and metrics are
kept as a DVC experiment (``dvc exp show``, ``dvc exp diff``, ``dvc exp apply <name>``).

Usage: ``python -m gm.preset PRESET.yaml [--name NAME] [--params params.yaml] [--dry]``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gm.errors import ConfigError


def merge(base: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``preset``'s entries set, key by key (lists replaced whole, as DVC's -S)."""
    out = copy.deepcopy(base)
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def overrides(base: dict[str, Any], preset: dict[str, Any]) -> list[str]:
    """The ``dvc exp run -S`` overrides that turn ``base`` into ``merge(base, preset)``: one per
    leaf of the preset, ``++`` where ``base`` lacks the key (DVC refuses a plain ``key=``)."""
    from gm.audit import _flow, dvc_override
    from gm.tracking import leaves

    return [dvc_override(base, k, _flow(v)) for k, v in leaves(preset).items()]


def main(argv: list[str] | None = None) -> int:
    from gm import params
    from gm.cli import guarded

    ap = argparse.ArgumentParser(prog="python -m gm.preset", description=__doc__.split("\n")[0])
    ap.add_argument("preset", help="a YAML file of params.yaml entries")
    ap.add_argument("--name", help="the experiment's name (default: the preset's folder)")
    ap.add_argument("--params", default="params.yaml", help="the root params file")
    ap.add_argument("--dry", action="store_true", help="print the command, run nothing")
    args = ap.parse_args(argv)

    @guarded
    def run() -> int:
        path, root = Path(args.preset), Path(args.params)
        try:
            preset = yaml.safe_load(path.read_text()) or {}
            base = yaml.safe_load(root.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{getattr(e, 'filename', None) or path}: {e}") from None
        if not isinstance(preset, dict):
            raise ConfigError(f"{path}: expected a mapping of params.yaml entries")
        params.parse(merge(base, preset), f"{root} with {path}")  # bad keys named, before DVC
        name = args.name or path.parent.name
        cmd = ["dvc", "exp", "run", "--name", name]
        for o in overrides(base, preset):
            cmd += ["-S", o]
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
        return 0 if args.dry else subprocess.run(cmd).returncode

    return run()


if __name__ == "__main__":
    sys.exit(main())
