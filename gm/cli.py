"""The ``gm`` command. Every subcommand has ``--help``; errors name the file, key or value."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from gm.errors import GmError

EXIT_USER_ERROR = 2


WORKERS_HELP = (
    "Ray Data tasks that decode and build the pyramid: 0 = in this process, N = at most N "
    "at a time on the local Ray or RAY_ADDRESS's cluster (default: one per CPU of the cluster "
    "from 8,192 inputs or with RAY_ADDRESS set, else 0); the bytes written do not depend on it"
)


def guarded(fn: Callable[..., int]) -> Callable[..., int]:
    """Run a command: a GmError prints ``error: <message>`` and exits 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except GmError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            # Ray's driver forwards worker output from a thread: stop it first, so that a
            # worker line logged before the interrupt does not print after this one
            try:
                _stop_ray()
            except KeyboardInterrupt:  # a second Ctrl-C: leave the rest to the exit
                pass
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def _stop_ray() -> None:
    """Shut down this process's Ray connection (and the local Ray it started), if it has one;
    the driver's forwarding of worker output ends with it."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def exit_now(code: int) -> None:
    """End a pipeline stage's process with ``code`` as soon as its work is done: stdout,
    stderr and logging flushed, this process's Ray connection shut down (and the local Ray
    it started, if any), then ``os._exit``. It skips the interpreter's teardown of torch,
    torchvision, torchmetrics and MLflow modules, which takes 1.5 to 2 s per process on
    2 cores and runs nothing a stage needs (its outputs are written and closed)."""
    import logging
    import os

    _stop_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _cmd_data_materialize(args) -> int:
    from gm.data.sources import materialize

    written = materialize(
        args.out, only=args.only or None, force=args.force, progress=not args.quiet
    )
    for name, n in written.items():
        state = "kept (exists; --force rebuilds)" if n is None else f"{n} images"
        print(f"{Path(args.out) / name}: {state}")
    return 0


def _cmd_data_verify(args) -> int:
    from gm.data.track import verify_tracked

    state = verify_tracked(args.dvc_file)
    print(f"{args.dvc_file}: {state}")
    return 0


def _cmd_data_inspect(args) -> int:
    from gm.data.prepare import scan
    from gm.data.remote import is_uri

    path = args.path if is_uri(args.path) else Path(args.path)
    manifest = Path(args.path) / "manifest.json"
    if not is_uri(args.path) and manifest.is_file():
        m = json.loads(manifest.read_text())
        if "counts" in m and "resolutions" in m:
            print(
                f"{path}: dataset {m['dataset']!r}, {m['num_images']} images, "
                f"{m['channels']} channel(s), levels {m['resolutions']}"
            )
            width = max(len(c) for c in m["classes"])
            print(f"  {'class':<{width}}  {'train':>6} {'val':>6} {'test':>6}")
            for c in m["classes"]:
                row = " ".join(f"{m['counts'][s][c]:>6}" for s in ("train", "val", "test"))
                print(f"  {c:<{width}}  {row}")
            print(f"  mean {m['mean']}  std {m['std']}  content {m['content_hash'][:16]}")
        else:
            print(
                f"{path}: paired dataset {m.get('name')!r} ({m.get('kind')}) from "
                f"{m.get('dataset')!r}"
            )
            for f, info in m.get("files", {}).items():
                print(f"  {f}: {info['rows']} rows {info.get('counts')}")
        for s in m.get("skipped", [])[: args.limit]:
            print(f"  skipped {s['path']}: {s['reason']}")
        return 0
    items, classes, skipped = scan(path)
    print(f"{path}: raw folder, {len(items)} image files in {len(classes)} classes")
    for c in classes:
        print(f"  {c}: {sum(1 for it in items if it.class_name == c)}")
    for s in skipped[: args.limit]:
        print(f"  skipped {s['path']}: {s['reason']}")
    return 0


def _cmd_prepare(args) -> int:
    from gm import params
    from gm.data.pairs import build_pairs
    from gm.data.prepare import prepare_dataset
    from gm.data.remote import is_uri
    from gm.errors import ConfigError

    p = params.load(args.params)
    wanted = set(args.names)
    unknown = wanted - set(p.datasets) - set(p.pairs)
    if unknown:
        raise ConfigError(f"{args.params}: no dataset or pairs entry named {sorted(unknown)[0]!r}")
    out = Path(args.out)
    for name, cfg in p.datasets.items():
        if not wanted or name in wanted:
            m = prepare_dataset(
                f"{args.data.rstrip('/')}/{name}" if is_uri(args.data) else Path(args.data) / name,
                out / "pyramid" / name,
                cfg,
                name=name,
                progress=not args.quiet,
                workers=args.workers,
            )
            print(f"{out / 'pyramid' / name}: {m['num_images']} images, levels {m['resolutions']}")
    for name, cfg in p.pairs.items():
        if not wanted or name in wanted:
            m = build_pairs(out / "pyramid" / cfg.dataset, out / "pairs" / name, cfg, name=name)
            print(f"{out / 'pairs' / name}: {m['kind']}, files {', '.join(m['files'])}")
    return 0


def _cmd_with_ray(args) -> int:
    from gm.cluster import params_cpus, run_with_ray

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run_with_ray(cmd, params_cpus(args.params))


def _cmd_models(args) -> int:
    from gm.registry import families

    fams = families()
    if not fams:
        print("no model families registered yet")
        return 0
    width = max(len(n) for n in fams)
    for name, fam in fams.items():
        print(f"{name:<{width}}  {fam.paper}")
    return 0


def _parse_override(text: str) -> tuple[list[str], object]:
    import yaml

    from gm.config import yaml_load
    from gm.errors import ConfigError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. run.steps=200")
    try:
        parsed = yaml_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def _cmd_train(args) -> int:
    from gm import params
    from gm.config import from_dict, to_dict
    from gm.errors import ConfigError
    from gm.registry import families
    from gm.tracking import repo_root
    from gm.train.job import TrainConfig, run_job

    p = params.load(args.params)
    try:
        entry = to_dict(p.job(args.model)[1])
    except KeyError:
        if args.model not in families():
            raise ConfigError(
                f"{args.model}: not a job of {args.params}: train, train_paired or train_codec "
                f"({', '.join([*p.train, *p.train_paired, *p.train_codec]) or 'none'}) nor a "
                f"model family ({', '.join(families())})"
            ) from None
        entry = {"family": args.model}
    for text in args.set or []:
        path, value = _parse_override(text)
        node = entry
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {part} is not a section")
        node[path[-1]] = value
    paired = families().get(entry.get("family", ""))
    if paired is not None and paired.pairs:
        if not entry.get("pairs"):
            raise ConfigError(f"{args.model}: no paired dataset; add --set pairs=NAME "
                              f"({', '.join(p.pairs)})")  # fmt: skip
    elif not entry.get("dataset"):
        raise ConfigError(
            f"{args.model}: no dataset; add --set dataset=NAME ({', '.join(p.datasets)})"
        )
    cfg = from_dict(TrainConfig, entry, f"train.{args.model}")
    where = f"{cfg.section}.{args.model}"
    cfg.family_config(where)
    root = repo_root()
    classifier = Path(args.classifiers) / cfg.dataset / "classifier.pt"
    kind, name = ("pairs", cfg.pairs) if cfg.pairs else ("pyramid", cfg.dataset)
    m = run_job(
        args.model,
        cfg,
        Path(args.datasets) / kind / name,
        Path(args.out) / args.model,
        root=root,
        runs_dir=args.runs,
        progress=not args.quiet,
        classifier=classifier if cfg.dataset and classifier.is_file() else None,
    )
    print(json.dumps(m, indent=2))
    from gm.tracking import run_url

    print(f"MLflow: {run_url(root, m['mlflow_run_id'])}", file=sys.stderr)
    return 0


def _cmd_tune(args) -> int:
    from pipelines.tune import main as tune_main

    argv = ["--name", args.name, "--params", args.params, "--runs", args.runs]
    for flag in ("out", "report", "datasets", "classifiers"):
        if getattr(args, flag):
            argv += [f"--{flag}", str(getattr(args, flag))]
    return tune_main(argv)


def _cmd_compress(args) -> int:
    from gm.compress import main_compress

    return main_compress(args)


def _cmd_decompress(args) -> int:
    from gm.compress import main_decompress

    return main_decompress(args)


def _cmd_upscale(args) -> int:
    from gm.apply import main_for

    return main_for("super_resolution", args)


def _cmd_translate(args) -> int:
    from gm.apply import main_for

    return main_for("translation", args)


def _cmd_runs(args) -> int:
    from gm.audit import compare_runs, list_runs, render_runs
    from gm.tracking import repo_root

    if args.compare:
        print(compare_runs(repo_root(), args.compare))
        return 0
    rows = list_runs(repo_root(), args.experiment, args.filter or "", args.max)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_runs(rows))
    return 0


def _cmd_audit(args) -> int:
    from gm.audit import audit_run, render_audit
    from gm.tracking import repo_root

    a = audit_run(repo_root(), args.run_id)
    print(render_audit(a))
    return 0 if a.matches or not args.check else 1


def _cmd_evaluate(args) -> int:
    import json
    import tempfile

    from gm import params
    from gm.errors import ConfigError, DataError
    from gm.io import write_json
    from gm.metrics.evaluate import (
        EvalConfig,
        evaluate_checkpoint,
        log_to_mlflow,
        render_results,
        resolve_model,
        unavailable_warning,
    )
    from gm.tracking import repo_root

    root = repo_root()
    cfg = params.load(args.params).evaluate if Path(args.params).is_file() else EvalConfig()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, run = resolve_model(args.model, root, tmp)
        name = run.data.params.get("dataset") if run is not None else None
        if args.dataset is None and name is None:
            raise ConfigError(f"{args.model}: which dataset? (--dataset datasets/pyramid/NAME)")
        dataset = Path(args.dataset or root / "datasets/pyramid" / name)
        classifier = Path(args.classifier or root / "models/classifiers" / dataset.name /
                          "classifier.pt")  # fmt: skip
        if not (dataset / "manifest.json").is_file():
            raise DataError(f"{dataset}: not a prepared dataset (dvc repro prepare@NAME)")
        if not classifier.is_file():
            raise DataError(f"{classifier}: no classifier (dvc repro classifier@{dataset.name}, "
                            "or --classifier PATH)")  # fmt: skip
        results = evaluate_checkpoint(checkpoint, classifier, dataset, cfg)
    results = {"name": args.model, "dataset": dataset.name, **results}
    if args.out:
        write_json(args.out, results)
    log_to_mlflow(root, results)  # on the model's own run, as evaluate@ does
    warning = unavailable_warning(results)
    if warning:
        print(warning, file=sys.stderr)
    print(json.dumps(results, indent=2) if args.json else render_results(results))
    return 0


def _cmd_sample(args) -> int:
    from gm.sample import main_sample

    return main_sample(args)


def _cmd_project(args) -> int:
    from gm.project import main_project

    return main_project(args)


def _cmd_detect(args) -> int:
    from gm.detect import main_detect

    return main_detect(args)


def _apply_parser(sub, name: str, help_: str, description: str, example: str):
    cmd = sub.add_parser(
        name,
        help=help_,
        description=description + " Images of any size are processed in overlapping windows "
        "whose margin is the network's receptive field (computed from it), so the output "
        "equals one whole-image pass. A file that cannot be read is listed (exit status 2) "
        "and the others are still processed; outputs are PNG, written atomically.",
        epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("input", help="an image file or a folder of images (searched recursively)")
    cmd.add_argument(
        "-o", "--out", required=True, help="output file, or folder (same relative paths, .png)"
    )
    cmd.add_argument(
        "--model",
        required=True,
        help="a gm checkpoint (models/NAME/checkpoint.pt) or an MLflow model URI "
        "(runs:/RUN_ID/generator, models:/NAME/VERSION)",
    )
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    return cmd


def build_parser() -> argparse.ArgumentParser:
    import gm

    ap = argparse.ArgumentParser(
        prog="gm",
        description="Reproducible training of generative image models "
        "(DVC datasets, Ray Train/Tune, MLflow).",
    )
    ap.add_argument("--version", action="version", version=f"gm {gm.__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser(
        "data",
        help="materialize or inspect raw data",
        description="Materialize the default raw data or inspect a folder.",
    )
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    mat = dsub.add_parser(
        "materialize",
        help="write the default raw datasets (emoji, digits, photos)",
        description="Write the default raw datasets from files shipped in installed packages "
        "(byte-identical on every machine; nothing is downloaded).",
    )
    mat.add_argument("--out", default="data", help="raw data folder (default: %(default)s)")
    mat.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="only this dataset (repeatable): emoji, digits, photos",
    )
    mat.add_argument("--force", action="store_true", help="rebuild datasets that exist")
    mat.add_argument("--quiet", action="store_true", help="no progress bars")
    mat.set_defaults(func=_cmd_data_materialize)
    ver = dsub.add_parser(
        "verify",
        help="check data/ against its .dvc file and add it to the DVC cache",
        description="Check that the raw data matches the hash recorded in its .dvc file (the "
        "default data is byte-identical on every machine); if it does, store it in the local "
        "DVC cache. Exits 2 naming the difference otherwise.",
    )
    ver.add_argument("--dvc-file", default="data.dvc", help="default: %(default)s")
    ver.set_defaults(func=_cmd_data_verify)
    ins = dsub.add_parser(
        "inspect",
        help="summarize a raw folder or a prepared dataset",
        description="Summarize a raw image folder (classes, counts, non-images) or a prepared "
        "dataset or paired dataset (from its manifest).",
    )
    ins.add_argument("path", help="raw folder, e.g. data/emoji, or datasets/pyramid/emoji")
    ins.add_argument("--limit", type=int, default=20, help="skipped inputs to list")
    ins.set_defaults(func=_cmd_data_inspect)

    prep = sub.add_parser(
        "prepare",
        help="build datasets outside DVC",
        description="Build the multi-resolution and paired datasets of a params file, the same "
        "as `dvc repro` does, without DVC (e.g. for a quick look at a new folder).",
    )
    prep.add_argument("names", nargs="*", help="datasets/pairs entries to build (default: all)")
    prep.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    prep.add_argument("--data", default="data", help="raw data folder, or an object-storage "
                      "prefix s3://bucket/prefix (default: %(default)s)")  # fmt: skip
    prep.add_argument("--out", default="datasets", help="output folder (default: %(default)s)")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    prep.set_defaults(func=_cmd_prepare)

    train = sub.add_parser(
        "train",
        help="train a model outside DVC",
        description="Train a job of params.yaml's `train` section (or a model family by name) "
        "with the same Ray Train trainer and MLflow tracking as `dvc repro`. Running the same "
        "command again after a crash continues the run from its latest checkpoint.",
        epilog="examples: gm train dcgan --set run.steps=200 --set model.ngf=32\n"
        "          gm train cvae --set dataset=emoji --set run.num_workers=2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "model",
        help="a key of params.yaml: train, train_paired or train_codec, or a family (`gm models`)",
    )
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the job (dotted, YAML value): run.steps=200, model.z_dim=64, "
        "dataset=digits, resolution=16, pairs=photos_sr (repeatable)",
    )
    train.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    train.add_argument(
        "--datasets", default="datasets", help="prepared datasets (default: %(default)s)"
    )
    train.add_argument(
        "--out", default="models/cli", help="outputs go to OUT/MODEL (default: %(default)s)"
    )
    train.add_argument("--runs", default="runs", help="Ray run storage (default: %(default)s)")
    train.add_argument(
        "--classifiers",
        default="models/classifiers",
        help="domain classifiers; with DATASET/classifier.pt there, KID is tracked during "
        "training (default: %(default)s)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    tune = sub.add_parser(
        "tune",
        help="search hyperparameters with Ray Tune",
        description="Run search NAME of params.yaml's `tune` section: trials of its training "
        "job with sampled settings (Optuna TPE or random), stopped early by ASHA or evolved by "
        "PBT, each an MLflow child run of the search's run. Writes OUT/best_params.yaml (with "
        "the `dvc exp run -S` arguments that train with it), OUT/trials.csv and a summary. On "
        "a Ray cluster: set RAY_ADDRESS (and MLFLOW_TRACKING_URI, --runs s3://...). Running "
        "the same command after an interruption resumes the search.",
        epilog="examples: gm tune dcgan\n"
        "          RAY_ADDRESS=auto gm tune dcgan --runs s3://bucket/gm-runs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument("name", help="a key of params.yaml: tune")
    tune.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    tune.add_argument("--runs", default="runs", help="Tune storage: a folder or a URI "
                      "(default: %(default)s)")  # fmt: skip
    tune.add_argument("--out", help="results folder (default: tune/NAME)")
    tune.add_argument("--report", help="summary REPORT.json/.png (default: reports/tune/NAME)")
    tune.add_argument("--datasets", help="prepared datasets (default: datasets)")
    tune.add_argument("--classifiers", help="domain classifiers (default: models/classifiers)")
    tune.set_defaults(func=_cmd_tune)

    up = _apply_parser(
        sub,
        "upscale",
        "super-resolve images with a trained SRGAN/SRResNet",
        "Upscale images by the model's factor (×2, ×4 ...) with a trained super-resolution model.",
        "example: gm upscale photo.jpg -o photo_x4.png --model models/srgan/checkpoint.pt",
    )
    up.set_defaults(func=_cmd_upscale)
    tr = _apply_parser(
        sub,
        "translate",
        "translate images with a trained pix2pix/CycleGAN",
        "Translate images from domain A to domain B (e.g. line-art to colour) with a trained "
        "pix2pix or CycleGAN model.",
        "examples: gm translate sketches/ -o coloured/ --model models/pix2pix/checkpoint.pt\n"
        "          gm translate coloured/ -o sketches/ --model models/cyclegan/checkpoint.pt "
        "--reverse",
    )
    tr.add_argument(
        "--reverse", action="store_true", help="B → A with a two-way model (CycleGAN's F)"
    )
    tr.set_defaults(func=_cmd_translate)

    comp = sub.add_parser(
        "compress",
        help="compress an image with a trained learned codec",
        description="Code an image into a .gmc file with a trained `codec` model (Ballé et al. "
        "2018): real ANS bitstreams, a header with the model's id, any image size.",
        epilog="example: gm compress photo.png -o photo.gmc --model models/codec/checkpoint.pt",
    )
    comp.add_argument("input", help="an image file")
    comp.add_argument("-o", "--output", required=True, help="the .gmc file to write")
    comp.add_argument("--model", required=True, help="a codec checkpoint")
    comp.set_defaults(func=_cmd_compress)
    dec = sub.add_parser(
        "decompress",
        help="decode a .gmc file back to an image",
        description="Decode a .gmc file with the codec that made it (a file of another model, "
        "or a truncated or corrupted one, is refused).",
        epilog="example: gm decompress photo.gmc -o back.png --model models/codec/checkpoint.pt",
    )
    dec.add_argument("input", help="a .gmc file")
    dec.add_argument("-o", "--output", required=True, help="the PNG to write")
    dec.add_argument("--model", required=True, help="the codec checkpoint that made it")
    dec.set_defaults(func=_cmd_decompress)

    runs = sub.add_parser(
        "runs",
        help="list and compare MLflow runs",
        description="List the runs of the MLflow store (MLFLOW_TRACKING_URI, or the project's "
        "mlflow.db) as a table: model, git commit, dataset hash, key params and metrics. "
        "--compare shows the params and metrics that differ between runs.",
        epilog="examples: gm runs\n"
        "          gm runs --filter \"params.family = 'dcgan'\" --max 10\n"
        "          gm runs --compare 3f2a9c 81bd07",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    runs.add_argument("--experiment", default="gm", help="experiment (default: %(default)s)")
    runs.add_argument("--filter", help='an MLflow search filter, e.g. "metrics.`eval/fid` < 50"')
    runs.add_argument("--max", type=int, default=50, help="rows (default: %(default)s)")
    runs.add_argument("--json", action="store_true", help="rows as JSON")
    runs.add_argument("--compare", nargs="+", metavar="RUN_ID",
                      help="runs to compare (ids, or unique prefixes of them)")  # fmt: skip
    runs.set_defaults(func=_cmd_runs)

    aud = sub.add_parser(
        "audit",
        help="a run's lineage, checked against the workspace, and how to reproduce it",
        description="Show a run's git commit, DVC data and dependency hashes, params, metrics "
        "and artifacts; check each recorded hash against the workspace (which differ), and "
        "print the commands that reproduce the run (git checkout, dvc checkout, dvc repro or "
        "dvc exp run -S with the params that differ from the commit's params.yaml, upstream "
        "stages' params included). A run continued with a larger budget is shown and "
        "reproduced as its latest launch ran it.",
        epilog="examples: gm audit 3f2a9c0d5e8b4a1f9c7d6e5b4a3f2e1d --check\n"
        "          gm audit 3f2a9c0d5e8b     (any unique prefix, as gm runs prints)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    aud.add_argument("run_id", help="an MLflow run id or a unique prefix (gm runs lists them)")
    aud.add_argument("--check", action="store_true",
                     help="exit 1 when the workspace does not match the run")  # fmt: skip
    aud.set_defaults(func=_cmd_audit)

    smp = sub.add_parser(
        "sample",
        help="a grid of samples from a trained generator",
        description="Sample a PNG grid from a gm checkpoint or an MLflow model: a run's "
        "(runs:/RUN_ID/generator) or a registered one (models:/gm-NAME@champion, "
        "models:/gm-NAME/VERSION). Conditional models cycle through the classes unless "
        "--label picks one.",
        epilog="examples: gm sample models:/gm-dcgan@champion --n 64 --out grid.png\n"
        "          gm sample models/stylegan/checkpoint.pt --truncation 0.7 --out s.png\n"
        "          gm sample models/cgan/checkpoint.pt --n 10 --interpolate 8 --out strips.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    smp.add_argument("model", help="a checkpoint.pt or an MLflow model URI")
    smp.add_argument("--n", type=int, default=64, help="samples (default: %(default)s)")
    smp.add_argument("--label", type=int, help="class index for every sample")
    smp.add_argument(
        "--truncation",
        type=float,
        default=1.0,
        help="ψ in [0, 1]: StyleGAN checkpoints truncate w (w̄ + ψ(w − w̄)), other models "
        "sample z at temperature ψ (default: 1, none)",
    )
    smp.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    smp.add_argument("--nrow", type=int, help="images per row (default: √n)")
    smp.add_argument(
        "--interpolate",
        type=int,
        metavar="STEPS",
        help="latent interpolation strips instead: --n rows of STEPS images each, spherical "
        "interpolation between two latents per row, one class per row",
    )
    smp.add_argument("--out", required=True, help="the PNG grid to write")
    smp.set_defaults(func=_cmd_sample)

    prj = sub.add_parser(
        "project",
        help="find an image's latent in a trained StyleGAN (projection into W)",
        description="Optimize one w (and the noise inputs) so that a StyleGAN checkpoint draws "
        "IMAGE, after StyleGAN2's projector (Karras et al. 2020: w noise and learning-rate "
        "ramps, noise regularization; pixel MSE instead of LPIPS, whose VGG weights are not "
        "here). Writes target | reconstruction as a PNG and prints the distance: a "
        "generator's own samples project closely, other images less.",
        epilog="example: gm project face.png --model models/stylegan/checkpoint.pt --out proj.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prj.add_argument("image", help="the image to project (resized to the generator's size)")
    prj.add_argument("--model", required=True, help="a StyleGAN checkpoint.pt")
    prj.add_argument("--out", required=True, help="the PNG to write: target | reconstruction")
    prj.add_argument("--steps", type=int, default=1000, help="default: %(default)s (paper)")
    prj.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    prj.add_argument("--json", action="store_true", help="one JSON line instead of text")
    prj.set_defaults(func=_cmd_project)

    det = sub.add_parser(
        "detect",
        help="score images with a real-vs-generated detector (deep-fake detection)",
        description="The probability that each image was generated, from a detector trained by "
        "the detect@<dataset> stage (models/detectors/<dataset>/detector.pt): a table of file, "
        "P(generated) and the verdict at the detector's calibrated threshold, or --json. "
        "Folders are searched for image files; images are resized to the detector's "
        "resolution. Unreadable files are listed on stderr with the reason and the rest are "
        "scored; the exit status is 1 when no file could be scored. The detector knows only "
        "the models it was trained against (docs/evaluation.md).",
        epilog="example: gm detect samples.png photos/ --model models/detectors/emoji/detector.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    det.add_argument("images", nargs="+", help="image files or folders of them")
    det.add_argument("--model", required=True, help="a detector.pt of the detect stage")
    det.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    det.set_defaults(func=_cmd_detect)

    ev = sub.add_parser(
        "evaluate",
        help="score a trained model: FID, KID, precision/recall ... beside real-data baselines",
        description="Score a model trained by `gm train` or the pipeline with the metrics, "
        "baselines and settings of the evaluate@ stage (params.yaml's evaluate section), print "
        "the table and log eval/* metrics to the model's own MLflow run. MODEL is a "
        "checkpoint, a run id (or unique prefix), runs:/RUN_ID/..., or models:/NAME/VERSION "
        "or models:/NAME@ALIAS (the run's final/checkpoint.pt is used). The dataset and its "
        "domain classifier default to the run's dataset under datasets/pyramid/ and "
        "models/classifiers/.",
        epilog="examples: gm evaluate models:/gm-cgan@champion\n"
        "          gm evaluate models/cli/cgan/checkpoint.pt --dataset datasets/pyramid/digits\n"
        "          gm evaluate 3f2a9c0d5e8b --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("model", help="checkpoint.pt, run id, runs:/… or models:/…")
    ev.add_argument("--dataset", help="prepared dataset folder (default: the run's dataset)")
    ev.add_argument("--classifier", help="domain classifier.pt (default: the dataset's)")
    ev.add_argument("--params", default="params.yaml", help="evaluate settings from here")
    ev.add_argument("--out", help="also write the results as JSON here (atomically)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.set_defaults(func=_cmd_evaluate)

    models = sub.add_parser(
        "models",
        help="list registered model families",
        description="List the registered model families and their papers.",
    )
    models.set_defaults(func=_cmd_models)

    wr = sub.add_parser(
        "with-ray",
        help="run a command (dvc repro) with one local Ray that all its stages attach to",
        description="Start a local Ray, run COMMAND with RAY_ADDRESS pointing to it, and stop "
        "it when COMMAND ends: each Ray stage of `dvc repro` attaches instead of starting and "
        "stopping its own (about 11 s saved per stage on 2 cores). The Ray has the machine's "
        "CPUs, or more where a job of --params asks for more. With RAY_ADDRESS already set, "
        "COMMAND runs on that cluster unchanged. Either way COMMAND also gets a fork server "
        "(GM_FORKSERVER): each pipeline stage runs as a fork of one process that has already "
        "imported torch, Ray and MLflow, instead of importing them itself; GM_FORKSERVER=0 "
        "turns it off. Exits with COMMAND's status.",
        epilog="example:\n  gm with-ray -- dvc repro          (what `make repro` runs)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wr.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    wr.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command")
    wr.set_defaults(func=_cmd_with_ray)
    return ap


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
