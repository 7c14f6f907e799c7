"""MLflow tracking: where runs go, what lineage they carry, and a buffered metric logger.

- **Store.** ``MLFLOW_TRACKING_URI`` when set (a shared ``mlflow server``), else
  ``sqlite:///<repository root>/mlflow.db`` with artifacts under ``<root>/mlartifacts``: no
  server to start on one machine. An ``http(s)`` store is checked before any compute is spent.
- **One run per training.** The driver creates the run (or finds it again when a run is
  relaunched) and passes its id to the workers; only rank 0 logs metrics and sample grids.
- **Lineage.** Tags for the git commit and dirty flag, the ``data.dvc`` hash, the hashes
  ``dvc.lock`` records for the stage's dependencies, the gm version and the Ray resources, so
  a run in the UI says which code and data made it.

Only the driver and rank 0 import MLflow; a worker that does not log never connects.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gm.errors import GmError

EXPERIMENT = "gm"


class TrackingError(GmError):
    """The MLflow store cannot be used (unreachable server, unknown run)."""


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The project root: ``$DVC_ROOT`` inside a DVC stage, else the enclosing git/DVC repo."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / ".dvc").is_dir() or (d / ".git").exists():
            return d
    return here


def tracking_uri(root: str | os.PathLike) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve()}/mlflow.db"


def check_store(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer ``/health``."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http(s) only)
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise TrackingError(
        f"MLFLOW_TRACKING_URI={uri}: the MLflow server does not answer {url} ({problem}); "
        "start it, or unset MLFLOW_TRACKING_URI to log to the local mlflow.db"
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"run": {"steps": 10}}`` → ``{"run.steps": "10"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(list(value))
        else:
            out[name] = str(value)
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip()


def _dvc_hash(entry: Mapping[str, Any]) -> str | None:
    return entry.get("md5") or entry.get("etag") or entry.get("checksum")


def lineage_tags(root: str | os.PathLike, stage: str | None = None) -> dict[str, str]:
    """Tags naming the code and data behind a run (git, data.dvc, the stage's dvc.lock deps)."""
    import gm

    root = Path(root)
    tags = {"gm.version": gm.__version__}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        status = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
        tags |= {
            "git.commit": commit,
            "git.dirty": str(bool(status)).lower(),
            "mlflow.source.git.commit": commit,  # shown by the MLflow UI
        }
    data_dvc = root / "data.dvc"
    if data_dvc.is_file():
        outs = (yaml.safe_load(data_dvc.read_text()) or {}).get("outs") or [{}]
        if _dvc_hash(outs[0]):
            tags["dvc.data"] = _dvc_hash(outs[0])
    if stage:
        tags["dvc.stage"] = stage
        tags |= {f"dvc.dep.{path}": h for path, h in stage_dep_hashes(root, stage).items()}
    return tags


def stage_dep_hashes(root: str | os.PathLike, stage: str) -> dict[str, str]:
    """DVC's own hashes of a stage's dependencies as they are now, computed with DVC's
    libraries (``dvc.lock`` is written only after the stage's command exits, so it cannot be
    read from inside the stage). Empty when ``stage`` is not a stage of the repository."""
    import tempfile

    from dvc.exceptions import DvcException
    from dvc.ignore import DvcIgnoreFilter
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    root = Path(root).resolve()
    try:
        with Repo(str(root)) as repo:
            target = f"{root / 'dvc.yaml'}:{stage}"  # a bare name resolves against the cwd
            deps = [(d.def_path, d.fs_path) for d in repo.stage.collect(target)[0].deps]
    except (DvcException, IndexError, OSError):
        return {}
    fs = LocalFileSystem()
    ignore = DvcIgnoreFilter(fs, str(root))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        odb = LocalHashFileDB(fs, tmp)
        for def_path, fs_path in deps:
            if os.path.exists(fs_path):
                _, _, obj = build(odb, fs_path, fs, "md5", dry_run=True, ignore=ignore)
                out[def_path] = obj.hash_info.value
    return out


def dataset_digest(root: str | os.PathLike, dataset_dir: str | os.PathLike) -> tuple[str, str]:
    """(digest, kind) of a prepared dataset: its DVC hash from dvc.lock when it is a stage
    output there, else the content hash of its manifest."""
    root, dataset_dir = Path(root).resolve(), Path(dataset_dir).resolve()
    lock = root / "dvc.lock"
    if lock.is_file() and dataset_dir.is_relative_to(root):
        rel = dataset_dir.relative_to(root).as_posix()
        for entry in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            for out in entry.get("outs", []):
                if out.get("path") == rel and _dvc_hash(out):
                    return _dvc_hash(out), "dvc"
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    if "content_hash" in manifest:  # a multi-resolution dataset
        return manifest["content_hash"], "content"
    # a paired dataset: its files' SHA-256, as listed in the manifest
    files = {name: f["sha256"] for name, f in sorted(manifest["files"].items())}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), "content"


class RunHandle:
    """The driver's side of a training's single MLflow run."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        run_name: str,
        run_id: str | None,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        experiment: str | None = None,
    ) -> RunHandle:
        """Continue ``run_id`` if given (a relaunched driver), else create a new run."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = tracking_uri(root)
        check_store(uri)
        client = MlflowClient(uri)
        if run_id:
            try:
                client.get_run(run_id)
            except MlflowException as e:
                raise TrackingError(f"{uri}: run {run_id} to continue not found ({e})") from None
            client.update_run(run_id, status="RUNNING")
            return cls(uri, run_id)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
                location = (Path(root).resolve() / "mlartifacts").as_uri()
            exp_id = client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i : i + 100])
        return cls(uri, run.info.run_id)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(self, name: str, path: str, digest: str, context: str = "train") -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        ds = MetaDataset(LocalArtifactDatasetSource(path), name=name, digest=digest[:36])
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(), [tag])])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class MetricBuffer:
    """Rank 0's metric logger: per-step values are buffered and written in batches.

    One ``log_batch`` per flush keeps the per-step cost off the training loop (a SQLite
    transaction per step would cost more than a small model's step). A failed flush keeps the
    buffer for the next one.
    """

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.pending: list = []

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        while self.pending:
            chunk = self.pending[:1000]  # MLflow's per-request limit
            retry(self.client.log_batch, self.run_id, metrics=chunk)
            del self.pending[: len(chunk)]

    def log_image(self, image, key: str, step: int) -> None:
        retry(self.client.log_image, self.run_id, image, key=key, step=step)


def retry(fn, *args, attempts: int = 6, first_wait: float = 0.25, **kwargs):
    """Call ``fn``, retrying with exponential back-off (0.25 s … 8 s) on a store that is
    briefly busy: SQLite's "database is locked" when several trials write one ``mlflow.db``,
    a server that drops a connection. The last failure is raised."""
    from mlflow.exceptions import MlflowException

    wait = first_wait
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as e:
            text = str(e).lower()
            transient = isinstance(e, OSError) or any(
                s in text for s in ("locked", "busy", "connection", "timed out", "503", "502")
            )
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(wait)
            wait *= 2
