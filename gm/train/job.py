"""One training job, as the DVC ``train`` stage and ``gm train`` run it.

``params.yaml: train.<name>`` (a :class:`TrainConfig`) names a model family, a prepared
dataset and a resolution of its pyramid, the family's hyperparameters and the run settings.
:func:`run_job` opens (or finds again) the job's MLflow run, trains under Ray Train, and writes
the job's outputs atomically: ``checkpoint.pt``, ``samples.png``, ``metrics.json`` and
``history.csv`` (for ``dvc plots``).

Ray's own run folder lives under ``runs/`` (never a DVC output, which ``dvc repro`` deletes),
named by the job and a hash of everything that determines its result but the step budget: the
same command after a crash continues the run, a changed config, dataset or gm source starts a
new one, and a larger ``run.steps`` continues a finished run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gm.config import check, from_dict, to_dict
from gm.errors import ConfigError, DataError
from gm.io import atomic_files, sha256_file, write_json
from gm.plots import write_curves
from gm.train.ray_train import CHECKPOINT_FILE, RunSettings

RUN_STATE = "gm_run.json"


@dataclass(frozen=True)
class TrainConfig:
    """A job of ``params.yaml: train`` (``dataset``: a multi-resolution dataset) or of
    ``train_paired`` (``pairs``: a paired dataset, for SRGAN, pix2pix, CycleGAN)."""

    family: str  # a registered model family (`gm models`)
    dataset: str = ""  # a key of params.yaml: datasets (section train)
    pairs: str = ""  # a key of params.yaml: pairs (section train_paired)
    resolution: int = 0  # pyramid level to train on; 0 = the dataset's top resolution
    model: dict[str, Any] = field(default_factory=dict)  # the family's config (its dataclass)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self):
        r = self.resolution
        check(r == 0 or (r >= 4 and r & (r - 1) == 0), "resolution", f"{r} is not 0 or 4, 8, 16…")
        check(not (self.dataset and self.pairs), "pairs", "set dataset or pairs, not both")
        check(not (self.pairs and r), "resolution", "a paired job trains at its pairs' resolution")

    @property
    def data_name(self) -> str:
        """The dataset or paired dataset this job trains on."""
        return self.pairs or self.dataset

    @property
    def section(self) -> str:
        """The params.yaml section such a job lives in (error messages name it)."""
        if self.pairs:
            return "train_paired"
        return "train_codec" if self.family == "codec" else "train"

    def family_config(self, where: str = ""):
        """The family's config dataclass, validated; errors name ``<where>.family`` or
        ``<where>.model.<key>``."""
        from gm.registry import families

        fams = families()
        prefix = f"{where}." if where else ""
        if self.family not in fams:
            raise ConfigError(
                f"{prefix}family: unknown model family {self.family!r} (known: {', '.join(fams)})"
            )
        return from_dict(fams[self.family].config, self.model, f"{prefix}model")


def read_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """A prepared or paired dataset's ``manifest.json``; DataError naming it if unreadable."""
    path = Path(dataset_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the dataset manifest ({e})") from None


def data_info(dataset_dir: str | os.PathLike, resolution: int) -> dict[str, int]:
    """DataInfo of a prepared dataset (from its manifest) at ``resolution`` (0 = top); of a
    paired dataset: its target resolution, channels and classes."""
    path = Path(dataset_dir) / "manifest.json"
    m = read_manifest(dataset_dir)
    if "resolutions" not in m and "files" in m:  # a paired dataset (gm.data.pairs)
        import pyarrow.parquet as pq

        from gm.data.parquet import read_metadata

        first = Path(dataset_dir) / next(iter(m["files"]))
        read_metadata(first)  # a missing or foreign file is named
        shapes = [json.loads(f.metadata[b"shape"]) for f in pq.read_schema(first)
                  if f.metadata and b"shape" in f.metadata]  # fmt: skip
        return {"resolution": m["resolution"], "channels": shapes[0][-1],
                "num_classes": len(m["classes"])}  # fmt: skip
    resolution = resolution or max(m["resolutions"])
    if resolution not in m["resolutions"]:
        raise DataError(f"{path}: no {resolution}x{resolution} level (has {m['resolutions']})")
    if not m["counts"]["train"] or not sum(m["counts"]["train"].values()):
        raise DataError(f"{path}: the train split is empty")
    return {
        "resolution": resolution,
        "channels": m["channels"],
        "num_classes": len(m["classes"]),
    }


def source_hash() -> str:
    """SHA-256 of gm's Python sources: a code change starts a new Ray run, not a resumed one."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[1]
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# The params a continued run may change (the budget; run_key leaves them out of its identity).
# A phase schedule's last phase runs until run.steps, so its description changes with it.
BUDGET_PARAMS = ("run.steps", "run.max_failures", "run.init_from", "run.log_every", "run.data",
                 "run.kid_samples", "schedule.")  # fmt: skip


def run_key(
    name: str, cfg: TrainConfig, info: dict, dataset_digest: str, files: dict[str, str]
) -> str:
    """``files``: SHA-256 of the local files the job reads (VGG weights, ``run.init_from``):
    their content, not their path, is part of the identity."""
    run = to_dict(cfg.run)
    for not_identity in ("steps", "max_failures", "init_from", "log_every", "data", "kid_samples"):
        run.pop(not_identity)
    ident = {
        "files": files,
        "family": cfg.family,
        "model": to_dict(cfg.family_config()),
        "run": run,
        "data_info": info,
        "dataset": dataset_digest,
        "gm": source_hash(),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"{name}-{digest[:12]}"


def tracking_wait_s() -> float:
    """How long the end of a training waits for an MLflow server that went away
    (``GM_MLFLOW_WAIT_S``, default 600 s)."""
    text = os.environ.get("GM_MLFLOW_WAIT_S", "600")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"GM_MLFLOW_WAIT_S={text}: expected seconds >= 0")
    return value


def init_ray(cfg: RunSettings) -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start a local Ray sized for the job's workers
    (:func:`gm.cluster.init_ray`)."""
    from gm.cluster import init_ray as _init

    _init(cfg.num_workers * cfg.cpus_per_worker)


def _write_outputs(
    out_dir: Path, payload_path: Path, payload: dict, metrics: dict, dataset_dir: Path
):
    import numpy as np
    from PIL import Image

    from gm.train.checkpoint import trainer_from_checkpoint
    from gm.train.samples import preview_grid

    trainer, info = trainer_from_checkpoint(payload)
    grid = preview_grid(trainer, info.num_classes, dataset_dir, seed=0)
    curve = payload["extra"].get("curve") or payload["extra"].get("history", [])
    with atomic_files(out_dir) as tmp:  # not the folder: DVC keeps a .gitignore there
        shutil.copyfile(payload_path, tmp / CHECKPOINT_FILE)
        Image.fromarray(np.ascontiguousarray(grid)).save(tmp / "samples.png")
        write_json(tmp / "metrics.json", metrics)
        columns = sorted({k for row in curve for k in row} - {"step"})
        with open(tmp / "history.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", *columns])
            for row in curve:
                w.writerow([row["step"], *(f"{row[c]:.6g}" if c in row else "" for c in columns)])
        write_curves(curve, tmp / "plots")
    return trainer


def check_local_files(model_cfg, where: str) -> dict[str, str]:
    """The local files a family's config names (``local_files()``: VGG19 weights ...) exist:
    their SHA-256 by key, for the run's tags. A missing one is an error before any compute."""

    files = getattr(model_cfg, "local_files", dict)()
    for key, path in files.items():
        if not Path(path).is_file():
            raise ConfigError(f"{where}.{key}: {path}: no such file on this machine")
    return {key: sha256_file(path) for key, path in files.items()}


def check_pair_source(cfg: TrainConfig, model_cfg, info: dict, dataset_dir: Path, where: str):
    """The paired dataset has the files the family trains on (e.g. x4.parquet for scale 4)."""
    from gm.registry import families
    from gm.train.protocol import DataInfo

    model = families()[cfg.family].build(model_cfg, DataInfo(**info))
    src = model.pair_source()
    have = json.loads((dataset_dir / "manifest.json").read_text())["files"]
    for f in (src.file, src.unpaired_file):
        if f and f not in have:
            raise ConfigError(
                f"{where}: {cfg.family} reads {f}, which {dataset_dir} does not have "
                f"({', '.join(have)}); check the model's settings against pairs.{cfg.pairs}"
            )


def schedule_params(cfg: TrainConfig, model_cfg, info: dict) -> dict[str, str]:
    """A growing model's phase schedule as MLflow params ``schedule.phaseNN``."""
    from gm.registry import families
    from gm.train.protocol import DataInfo

    if not hasattr(model_cfg, "growth"):
        return {}
    model = families()[cfg.family].build(model_cfg, DataInfo(**info))
    out, start = {}, 0
    for g, images in model.phases_:
        stage = "fade-in" if g.alpha < 1 else "stable"
        out[f"schedule.phase{g.index:02d}"] = (
            f"{g.resolution}x{g.resolution} {stage} from image {start}: {images} images, "
            f"batch {g.batch_size or cfg.run.batch_size}/worker, lr {g.lr or 'family default'}"
        )
        start += images
    return out


def run_job(
    name: str,
    cfg: TrainConfig,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    root: str | os.PathLike,
    runs_dir: str | os.PathLike | None = None,
    stage: str | None = None,
    progress: bool = True,
    fault_injection: dict | None = None,
    classifier: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train job ``name`` (continuing its Ray run if one exists); returns its metrics.
    With a domain ``classifier`` (gm.metrics.classifier), KID is tracked at every checkpoint."""
    from gm import tracking

    root = Path(root).resolve()
    dataset_dir, out_dir = Path(dataset_dir).resolve(), Path(out_dir).resolve()
    runs_dir = Path(runs_dir or root / "runs").resolve()
    where = f"{cfg.section}.{name}"
    model_cfg = cfg.family_config(where)
    info = data_info(dataset_dir, cfg.resolution)
    files = check_local_files(model_cfg, f"{where}.model")
    if cfg.run.init_from:
        from dataclasses import replace

        init = Path(cfg.run.init_from)
        if not init.is_file():
            raise ConfigError(f"{where}.run.init_from: {init}: no such checkpoint")
        cfg = replace(cfg, run=replace(cfg.run, init_from=str(init.resolve())))
        files["init_from"] = sha256_file(init)
    if cfg.pairs:
        check_pair_source(cfg, model_cfg, info, dataset_dir, where)
    digest, digest_kind = tracking.dataset_digest(root, dataset_dir)
    key = run_key(name, cfg, info, digest, files)
    state_file = runs_dir / key / RUN_STATE

    # The MLflow run: fail fast on an unreachable server, before Ray or any compute starts.
    uri = tracking.tracking_uri(root)
    run_id = None
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        run_id = state["run_id"] if state.get("uri") == uri else None
        if state.get("step", 0) > cfg.run.steps:
            raise ConfigError(
                f"{where}.run.steps: {cfg.run.steps} is below the {state['step']} steps "
                f"the run in {state_file.parent} already made; raise it, or delete that folder "
                "to train from scratch"
            )
    params = tracking.flatten(
        {
            "family": cfg.family,
            "dataset": cfg.data_name,
            "model": to_dict(model_cfg),
            "run": to_dict(cfg.run),
            "data": info,
        }
    )
    params |= schedule_params(cfg, model_cfg, info)
    tags = tracking.lineage_tags(root, stage)
    tags |= {"gm.job": name, "gm.section": cfg.section, "gm.ray_run": key}
    if out_dir.is_relative_to(root):  # where the checkpoint goes (`gm audit` checks it)
        tags["gm.out"] = out_dir.relative_to(root).as_posix()
    tags |= {f"file.{k}.sha256": sha for k, sha in files.items()}
    handle = tracking.RunHandle.open(root, name, run_id, params, tags, may_change=BUDGET_PARAMS,
                                     where=where)  # fmt: skip
    state_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(state_file, {"uri": uri, "run_id": handle.run_id})
    handle.log_dataset(cfg.data_name, str(dataset_dir), digest)

    init_ray(cfg.run)
    import ray

    from gm.train.checkpoint import load_checkpoint
    from gm.train.ray_train import fit

    resources = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
    handle.set_tags({"ray.cluster_resources": json.dumps(resources, sort_keys=True)})
    start = time.time()
    try:
        result = fit(
            cfg.family,
            to_dict(model_cfg),
            cfg.run,
            dataset_dir,
            info,
            runs_dir,
            key,
            fault_injection=fault_injection,
            tracking={"uri": uri, "run_id": handle.run_id, "wait_s": tracking_wait_s()},
            progress=progress,
            classifier=classifier,
        )
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise DataError(f"{runs_dir / key}: the run ended without a checkpoint")
    except BaseException:
        handle.finish("FAILED")  # the Ray run keeps its checkpoints: rerunning continues it
        raise

    with result.checkpoint.as_directory() as d:
        ckpt = Path(d) / CHECKPOINT_FILE
        payload = load_checkpoint(ckpt, family=cfg.family)
        history = payload["extra"].get("history", [])
        metrics = {
            "step": payload["trainer"]["step"],
            "images_seen": payload["extra"].get("images_seen_total", 0),
            "resumed_from": payload["extra"].get("resumed_from", 0),
            "mlflow_run_id": handle.run_id,
            "dataset_digest": f"{digest_kind}:{digest}",
            **{k: v for k, v in (history[-1] if history else {}).items() if k != "step"},
        }
        trainer = _write_outputs(out_dir, ckpt, payload, metrics, dataset_dir)
    write_json(state_file, {"uri": uri, "run_id": handle.run_id, "step": metrics["step"]})
    handle.set_tags({"gm.checkpoint.sha256": sha256_file(out_dir / CHECKPOINT_FILE)})
    _log_final(handle, out_dir, trainer, info)
    handle.client.log_metric(handle.run_id, "driver_seconds", time.time() - start)
    handle.finish()
    return metrics


def _log_final(handle, out_dir: Path, trainer, info: dict) -> None:
    """Final checkpoint, sample grid and metrics as artifacts; the generator as an MLflow
    model in PyTorch's exported-graph format (``pt2``: loading it runs no pickled code). Paired
    families log each translator (``generator``; CycleGAN ``generator_ab``, ``generator_ba``)
    with an image-to-image signature of any size, and its receptive field in the metadata."""
    for f in (CHECKPOINT_FILE, "samples.png", "metrics.json", "history.csv"):
        handle.client.log_artifact(handle.run_id, str(out_dir / f), artifact_path="final")
    handle.client.log_artifacts(handle.run_id, str(out_dir / "plots"), artifact_path="final/plots")
    log_models(handle, trainer, info)


def log_models(handle, trainer, info: dict) -> None:
    """The trainer's generator (or translators) as MLflow models of the run (see _log_final):
    the exported graph gm loads, and a python_function flavor (gm.serving) to serve."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = trainer.model.cpu().eval()
    nets = trainer.sampling_nets()
    res, ch = info["resolution"], info["channels"]
    f32 = np.dtype(np.float32)
    images = Schema([TensorSpec(f32, (-1, ch, res, res), "images")])
    family = handle.client.get_run(handle.run_id).data.params.get("family", "")
    meta = {"data_info": info, "family": family, "conditional": bool(model.conditional)}
    g = torch.Generator().manual_seed(0)
    models = []  # (name, module, signature, input example, metadata)
    src = model.pair_source()
    if src is not None:
        side = res // src.scale
        # Height and width are dynamic where torch.export can keep them so (SRGAN, CycleGAN);
        # a network that specializes to its size (pix2pix's U-Net to 1x1) still runs at it.
        any_size = Schema([TensorSpec(f32, (-1, ch, -1, -1), "images")])
        signature = ModelSignature(inputs=any_size, outputs=any_size)
        example = (torch.rand(2, ch, side, side, generator=g) * 2 - 1).numpy()
        extra = {"scale": src.scale, "input_resolution": side}
        from gm.apply import tiling

        for name, module in model.translators(nets).items():
            align, radius = tiling(module.eval(), ch, src.scale, side)  # for exact tiles
            field = {"alignment": align, "receptive_radius": -1 if radius is None else radius}
            models.append((name, module, signature, example, meta | extra | field))
    else:
        latent = model.latent_shape()
        signature = ModelSignature(
            inputs=Schema(
                [
                    TensorSpec(f32, (-1, *latent), "z"),
                    TensorSpec(np.dtype(np.int64), (-1,), "labels"),
                ]
            ),
            outputs=images,
        )
        n = max(info["num_classes"], 2)
        example = (
            torch.randn(n, *latent, generator=g).numpy(),
            np.arange(n, dtype=np.int64) % max(info["num_classes"], 1),
        )
        models.append(("generator", model.generator(nets).eval(), signature, example, meta))
    from gm.tracking import using_uri

    with using_uri(handle.uri):  # the fluent API (log_model) needs a global tracking URI
        for entry in models:
            _log_model(handle, *entry)


def _log_model(handle, name: str, module, signature, example, metadata: dict) -> None:
    import mlflow
    import torch
    from mlflow.models import Model

    from gm import serving

    with mlflow.start_run(run_id=handle.run_id):
        # mlflow.pytorch's exported graph plus a python_function flavor (gm.serving), so that
        # `mlflow models serve` and mlflow.pyfunc.load_model run it too.
        Model.log(
            artifact_path=None,
            name=name,
            flavor=serving,
            pytorch_model=module,
            signature=signature,
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata=metadata,
            # MLflow would load the saved graph back and run the example, and only warn if
            # that fails: 10 to 18 s for the unrolled samplers (ebm, ddpm, sde), no gate.
            # tests/test_models_contract.py and test_audit.py run the logged models instead.
            validate_serving_input=False,
        )
