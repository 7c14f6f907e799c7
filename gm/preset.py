"""Run a preset: a YAML file of params.yaml entries to add or change, as one DVC experiment of
the root pipeline (``dvc exp run -S …``), e.g. ``presets/long/params.yaml`` (``make
repro-long``).

A preset declares no stages of its own: its entries extend the root pipeline's ``foreach``
stages (a ``tune.<name>`` entry is the stage ``tune@<name>``), so the main branch declares no
output that only the preset makes. A fresh clone's ``dvc metrics show`` and ``dvc plots show``
warn of nothing absent, and ``dvc status`` after ``make repro`` says the pipeline is up to date.
The experiment reruns only what the preset changes; its params, ``dvc.lock`` and metrics are
kept as a DVC experiment (``dvc exp show``, ``dvc exp diff``, ``dvc exp apply <name>``).

A preset may also hold an ``ablation`` section, expanded into ``train`` jobs (:func:`expand`)::

    ablation:
      key: model.augment            # the dotted job key the ablation varies
      values: [none, ada, diffaug]
      seeds: [0, 1, 2]              # run.seed of each copy
      jobs: {cgan_ab: {family: cgan, dataset: digits, ...}}   # full train jobs

gives ``train.cgan_ab_none_s0`` … ``train.cgan_ab_diffaug_s2``: 9 jobs that differ only in
``model.augment`` and ``run.seed``, which the summary stage averages (gm.metrics.ablation).

A preset's ``keep`` section names what the experiment wrote that is to be copied into a
folder after it succeeds (:func:`kept`, :func:`keep`), replacing the folder whole, so that its
results can be committed beside the default pipeline's (``make repro-quality``:
reports/quality/)::

    keep:
      into: reports/quality
      paths: [reports/summary.md, reports/eval]   # files or folders, copied as they are
      samples: true   # also models/<job>/samples.png of every job of the preset's train
                      # section, and of each ablation job and value at its first seed

``--keep PATH … --into DIR`` on the command line replaces the section. The folder also gets
``jobs.json``: every job the preset trains as it trained (:func:`job_records`: the family's
full config with its defaults filled in, the run settings, the data), with the git commit the
experiment ran from, so a committed report says what made it and a test can tell when the
preset no longer makes it (``tests/test_preset.py``).

A ``train`` job of a preset (or of its ablation section) may be derived from another with
``from:`` (:func:`derive`): the job as the preset leaves it, with only the keys written beside
``from`` changed, so a copy of a pipeline job on other data does not repeat its model::

    train:
      progan_digits: {from: progan, dataset: digits, resolution: 16, run: {steps: 4320}}

Usage: ``python -m gm.preset PRESET.yaml [--name NAME] [--params params.yaml] [--dry]
[--keep PATH ... --into DIR]`` (``--dry`` prints the command and what would be kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gm.config import yaml_load
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


def expand(preset: dict[str, Any], where: str = "preset") -> dict[str, Any]:
    """``preset``'s params.yaml entries: its ``ablation`` section (see the module docstring)
    turned into ``train`` entries ``<job>_<value>_s<seed>``, its ``keep`` section (no params
    entry; :func:`kept`) left out. ``ConfigError`` naming the key when the ablation section is
    malformed or a generated name is already a ``train`` entry of the preset."""
    preset = copy.deepcopy({k: v for k, v in preset.items() if k != "keep"})
    ab = preset.pop("ablation", None)
    if ab is None:
        return preset
    w = f"{where}: ablation"
    if not isinstance(ab, dict) or set(ab) != {"key", "values", "seeds", "jobs"}:
        raise ConfigError(f"{w}: expected exactly the keys key, values, seeds, jobs")
    key, values, seeds, jobs = ab["key"], ab["values"], ab["seeds"], ab["jobs"]
    if not isinstance(key, str) or not key or key == "run.seed":
        raise ConfigError(f"{w}.key: {key!r}: a dotted job key other than run.seed")
    for name, lst in (("values", values), ("seeds", seeds)):
        if not isinstance(lst, list) or len(lst) < 1 or len(set(map(repr, lst))) != len(lst):
            raise ConfigError(f"{w}.{name}: {lst!r}: a list of distinct values")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ConfigError(f"{w}.seeds: {seeds!r}: seeds are integers >= 0")
    if not isinstance(jobs, dict) or not jobs:
        raise ConfigError(f"{w}.jobs: a mapping of train jobs")
    train = preset.setdefault("train", {})
    for job, spec in jobs.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{w}.jobs.{job}: a train job (a mapping)")
        for value in values:
            for seed in seeds:
                name = ablation_name(job, value, seed)
                if name in train:
                    raise ConfigError(f"{w}: {name} is also a train entry of the preset")
                entry = copy.deepcopy(spec)
                _set(entry, key, value)
                _set(entry, "run.seed", seed)
                train[name] = entry
    return preset


def derive(base: dict[str, Any], preset: dict[str, Any], where: str = "preset") -> dict[str, Any]:
    """``preset``'s params.yaml entries (:func:`expand`, which it calls first, so that ablation
    jobs derive too) with each ``train`` job that names ``from: <job>`` written out in full:
    ``train.<job>`` as the preset leaves it (the root's job with the preset's changes), with
    the derived job's other keys merged over it (:func:`merge`). A derived job is thus spelled
    out key by key in the ``dvc exp run -S`` overrides and in the experiment's params, as if
    written by hand. ``ConfigError`` naming the key when the source is not a ``train`` job, is
    itself derived, or ``from`` is not a job name, and when the derived job's name is a job of
    ``base`` (its keys would be merged over that job's, not replace them)."""
    preset = expand(preset, where)
    train = preset.get("train") or {}
    derived = {n: j for n, j in train.items() if isinstance(j, dict) and "from" in j}
    if not derived:
        return preset
    plain = {n: j for n, j in train.items() if n not in derived}
    jobs = merge(base.get("train") or {}, plain)  # the jobs as the preset leaves them
    out = preset  # expand's own copy
    for name, job in derived.items():
        src, rest = job["from"], {k: v for k, v in job.items() if k != "from"}
        w = f"{where}: train.{name}.from"
        if name in (base.get("train") or {}):
            raise ConfigError(f"{where}: train.{name}: a derived job needs a name of its own "
                              f"({name!r} is a job of the root params)")  # fmt: skip
        if not isinstance(src, str) or not src:
            raise ConfigError(f"{w}: {src!r}: the name of a train job")
        if src in derived:
            raise ConfigError(f"{w}: {src!r} is itself derived (from {derived[src]['from']!r})")
        if not isinstance(jobs.get(src), dict):
            raise ConfigError(f"{w}: {src!r}: no such train job")
        out["train"][name] = merge(jobs[src], rest)
    return out


def ablation_name(job: str, value: Any, seed: int) -> str:
    """The ``train`` entry that :func:`expand` makes of ablation job ``job`` at one value."""
    return f"{job}_{value}_s{seed}"


def job_records(params: Any, names: Any) -> dict[str, dict[str, Any]]:
    """The train jobs ``names`` of parsed ``params`` (:class:`gm.params.Params`) as they train,
    as JSON values: ``family``, ``dataset``, ``resolution``, ``model`` (the family's config
    dataclass with every default filled in, so a changed default shows) and ``run`` (every run
    setting). Written beside a preset's kept reports as ``jobs.json``; two records are equal
    exactly when the jobs are configured alike. ``ConfigError`` naming the job when one is
    not a train job or its model config is invalid."""
    from gm.config import to_dict

    out = {}
    for name in names:
        job = params.train.get(name)
        if job is None:
            raise ConfigError(f"train.{name}: not a train job")
        out[name] = {
            "family": job.family,
            "dataset": job.data_name,
            "resolution": job.resolution,
            "model": to_dict(job.family_config(f"train.{name}")),
            "run": to_dict(job.run),
        }
    return json.loads(json.dumps(out))  # JSON's own values: string keys, lists for tuples


def kept(preset: dict[str, Any], where: str = "preset") -> tuple[list[str], str] | None:
    """The paths and the folder of ``preset``'s ``keep`` section (module docstring), or None
    when it has none. With ``samples: true`` the sample grids of the jobs the preset trains are
    derived from its ``train`` and ``ablation`` sections, so a job added to the preset is kept
    without another list to edit. ``ConfigError`` naming the key when the section, or the
    ablation section it reads, is malformed."""
    spec = preset.get("keep")
    if spec is None:
        return None
    w = f"{where}: keep"
    if not isinstance(spec, dict) or "into" not in spec or set(spec) - {"into", "paths", "samples"}:
        raise ConfigError(f"{w}: expected the key into, and optionally paths and samples")
    into, paths, samples = spec["into"], spec.get("paths", []), spec.get("samples", False)
    if not isinstance(into, str) or not into:
        raise ConfigError(f"{w}.into: {into!r}: a folder")
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"{w}.paths: {paths!r}: a list of files or folders")
    if not isinstance(samples, bool):
        raise ConfigError(f"{w}.samples: {samples!r}: true or false")
    out = list(paths)
    if samples:
        expand(preset, where)  # the ablation section checked before it is read
        ab = preset.get("ablation") or {}
        jobs = list(preset.get("train") or {}) + [
            ablation_name(job, value, ab["seeds"][0]) for job in ab.get("jobs", {})
            for value in ab["values"]
        ]  # fmt: skip
        out += [f"models/{job}/samples.png" for job in jobs]
    if not out:
        raise ConfigError(f"{w}: keeps nothing (no paths, samples false)")
    return out, into


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for part in head:
        tree = tree.setdefault(part, {})
    tree[last] = value


def keep(paths: list[str], into: str | Path, files: dict[str, str] | None = None) -> None:
    """Copy ``paths`` (relative files or folders) into the folder ``into``, each without its
    first component (``reports/eval`` → ``into/eval``, ``models/cgan/samples.png`` →
    ``into/cgan/samples.png``), and write ``files`` (name → text) there. ``into`` is replaced
    whole: everything is copied to a temporary sibling first, then renamed into place.
    ``ConfigError`` for a missing path or two paths (or a path and a file) with the same
    destination, before anything is copied."""
    import shutil

    into = Path(into)
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ConfigError(f"--keep: {', '.join(missing)}: no such file or folder")
    dest = {p: Path(*Path(p).parts[1:]) if len(Path(p).parts) > 1 else Path(p) for p in paths}
    files = files or {}
    targets = list(dest.values()) + [Path(f) for f in files]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"--keep: {', '.join([*paths, *files])}: two paths have the same "
                          "destination")  # fmt: skip
    tmp = into.with_name(f".{into.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p, d in dest.items():
        (tmp / d).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if Path(p).is_dir() else shutil.copy2)(p, tmp / d)
    for name, text in files.items():
        (tmp / name).write_text(text)
    old = into.with_name(f".{into.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if into.exists():
        into.rename(old)
    tmp.rename(into)
    shutil.rmtree(old, ignore_errors=True)


def overrides(base: dict[str, Any], preset: dict[str, Any]) -> list[str]:
    """The ``dvc exp run -S`` overrides that turn ``base`` into ``merge(base, preset)``: one per
    leaf of the preset, ``++`` where ``base`` lacks the key (DVC refuses a plain ``key=``)."""
    from gm.audit import _flow, dvc_override
    from gm.tracking import leaves

    return [dvc_override(base, k, _flow(v)) for k, v in leaves(preset).items()]


def main(argv: list[str] | None = None) -> int:
    from gm import params
    from gm.cli import guarded
    from gm.tracking import lineage_tags

    ap = argparse.ArgumentParser(prog="python -m gm.preset", description=__doc__.split("\n")[0])
    ap.add_argument("preset", help="a YAML file of params.yaml entries")
    ap.add_argument("--name", help="the experiment's name (default: the preset's folder)")
    ap.add_argument("--params", default="params.yaml", help="the root params file")
    ap.add_argument("--dry", action="store_true", help="print the command, run nothing")
    ap.add_argument("--keep", nargs="+", default=[], metavar="PATH",
                    help="after a successful run, copy these outputs into --into "
                         "(replaces the preset's keep section)")  # fmt: skip
    ap.add_argument("--into", help="the folder --keep copies into (replaced whole)")
    args = ap.parse_args(argv)
    if bool(args.keep) != bool(args.into):
        ap.error("--keep and --into go together")

    @guarded
    def run() -> int:
        path, root = Path(args.preset), Path(args.params)
        try:
            preset = yaml_load(path.read_text()) or {}
            base = yaml_load(root.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{getattr(e, 'filename', None) or path}: {e}") from None
        if not isinstance(preset, dict):
            raise ConfigError(f"{path}: expected a mapping of params.yaml entries")
        raw, preset = preset, derive(base, preset, str(path))
        keeps = (args.keep, args.into) if args.keep else kept(raw, str(path))
        parsed = params.parse(merge(base, preset), f"{root} with {path}")  # bad keys named
        name = args.name or path.parent.name
        cmd = ["dvc", "exp", "run", "--name", name]
        for o in overrides(base, preset):
            cmd += ["-S", o]
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
        if keeps:
            print(f"then keeps in {keeps[1]}: {' '.join(keeps[0])}", flush=True)
        if args.dry:
            return 0
        # the commit the experiment starts from, read before it changes the workspace
        tags = lineage_tags(root.resolve().parent) if keeps else {}
        rc = subprocess.run(cmd).returncode
        if rc == 0 and keeps:
            lineage = {k: tags.get(f"git.{k}") for k in ("commit", "dirty")}
            records = job_records(parsed, preset.get("train") or {})
            doc = {"preset": str(path), "params": str(root), **lineage, "jobs": records}
            keep(*keeps, files={"jobs.json": json.dumps(doc, indent=1, sort_keys=True) + "\n"})
            print(f"kept {len(keeps[0])} paths in {keeps[1]}", flush=True)
        return rc

    return run()


if __name__ == "__main__":
    sys.exit(main())
