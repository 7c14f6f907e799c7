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

import contextlib
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

from gm.config import yaml_load
from gm.errors import ConfigError, DataError, GmError

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
        changed = uncommitted_changes(root)
        tags |= {
            "git.commit": commit,
            "git.dirty": str(bool(changed)).lower(),
            "mlflow.source.git.commit": commit,  # shown by the MLflow UI
        }
        if changed:
            tags["git.dirty_files"] = " ".join(changed[:20])[:5000]
    data_dvc = root / "data.dvc"
    if data_dvc.is_file():
        outs = (yaml.safe_load(data_dvc.read_text()) or {}).get("outs") or [{}]
        if _dvc_hash(outs[0]):
            tags["dvc.data"] = _dvc_hash(outs[0])
    if stage:
        tags["dvc.stage"] = stage
        graph = _stage_graph(root.resolve(), stage)
        if graph is not None:
            deps, keys = graph
            tags |= {f"dvc.dep.{p}": h for p, h in stage_dep_hashes(root, stage, deps).items()}
            upstream = upstream_param_changes(root, stage, keys)
            if upstream:
                tags["dvc.upstream_params"] = json.dumps(upstream, sort_keys=True)[:5000]
    return tags


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A YAML tree's leaves by dotted key. Lists are leaves (DVC's -S replaces them whole), and
    so is a mapping with a dotted key of its own (a search space's ``model.lmbda``), which a
    dotted path could not address."""
    if not isinstance(tree, Mapping):
        return {prefix.removesuffix("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        nested = isinstance(v, Mapping) and v and not any("." in str(c) for c in v)
        out |= leaves(v, f"{prefix}{k}.") if nested else {f"{prefix}{k}": v}
    return out


def subtree(tree: Any, dotted: str) -> Any:
    """The value at a dotted key of a YAML tree, or ``KeyError``."""
    for part in dotted.split(".") if dotted else []:
        if not isinstance(tree, Mapping) or part not in tree:
            raise KeyError(dotted)
        tree = tree[part]
    return tree


def _stage_graph(root: Path, stage: str):
    """``stage``'s own dependencies other than params, as (path in dvc.yaml, path on disk),
    and the params.yaml keys the stages upstream of it depend on (an empty key: the whole
    file). None when ``stage`` is not a stage of the repository.

    DVC builds the graph (parsing dvc.yaml and dvc.lock: 1.4 s for the default pipeline on 2
    cores, in every training stage). One build answers for every stage, so it is kept in
    ``.dvc/tmp/gm-stage-graphs/``, keyed by the bytes of dvc.yaml and params.yaml, the files
    the answer depends on (dvc.lock, rewritten after each stage, does not change it)."""
    key = hashlib.sha256()
    for name in ("dvc.yaml", "params.yaml"):
        path = root / name
        key.update(path.read_bytes() if path.is_file() else b"-")
        key.update(b"\0")
    cache = root / ".dvc" / "tmp" / "gm-stage-graphs" / f"{key.hexdigest()[:32]}.json"
    graphs = None
    if cache.is_file():
        try:
            graphs = json.loads(cache.read_text())
        except (OSError, ValueError):
            graphs = None
    if graphs is None or stage not in graphs:
        graphs = _all_stage_graphs(root)
        if graphs is None:
            return None
        if cache.parent.parent.is_dir():  # a DVC repository's own tmp folder
            from gm.io import write_text

            cache.parent.mkdir(exist_ok=True)
            write_text(cache, json.dumps(graphs, sort_keys=True))
    if stage not in graphs:
        return None
    deps, keys = graphs[stage]
    return [(def_path, str(root / rel)) for def_path, rel in deps], set(keys)


def _all_stage_graphs(root: Path) -> dict[str, list] | None:
    """{named stage: [[(path in dvc.yaml, path on disk relative to root)...], [upstream
    params keys...]]} from DVC's own graph of the repository; None when DVC cannot build one."""
    import networkx as nx
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    params_file = root / "params.yaml"
    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
            stages = list(graph.nodes)
    except (DvcException, OSError):
        return None

    def param_keys(st) -> set[str]:
        return {
            key
            for d in st.deps
            if isinstance(d, ParamsDependency) and Path(d.fs_path) == params_file
            for key in (d.params or [""])
        }

    out = {}
    for st in stages:
        name = getattr(st, "name", None)  # a .dvc file's stage has no name
        if not name:
            continue
        # Params are recorded by value (the run's params), not as params.yaml's file hash,
        # which any other job's edit would change.
        deps = [(d.def_path, os.path.relpath(d.fs_path, root))
                for d in st.deps if not isinstance(d, ParamsDependency)]  # fmt: skip
        keys = set().union(*(param_keys(up) for up in nx.descendants(graph, st)))
        out[name] = [deps, sorted(keys)]
    return out


def upstream_param_changes(
    root: str | os.PathLike, stage: str, keys: set[str] | None = None
) -> dict[str, Any]:
    """The params.yaml values that the stages upstream of ``stage`` depend on (DVC's graph:
    e.g. the classifier a training reads) and that differ from HEAD's params.yaml, as made by
    ``dvc exp run -S``: ``{"set": {key: value}, "removed": [key]}``, empty when none differ.
    ``gm audit`` turns them into the overrides that reproduce the upstream outputs too.
    ``keys``: those upstream keys when the caller has them already (:func:`_stage_graph`)."""
    root = Path(root).resolve()
    head_text, path = _git(root, "show", "HEAD:params.yaml"), root / "params.yaml"
    if head_text is None or not path.is_file():
        return {}
    if keys is None:
        graph = _stage_graph(root, stage)
        if graph is None:
            return {}
        keys = graph[1]
    try:
        now, then = yaml_load(path.read_text()) or {}, yaml_load(head_text) or {}
    except yaml.YAMLError:
        return {}

    def at(tree: Any, key: str) -> dict[str, Any]:
        try:
            return leaves(subtree(tree, key), f"{key}." if key else "")
        except KeyError:
            return {}

    changed: dict[str, Any] = {"set": {}, "removed": []}
    for key in sorted(keys):
        a, b = at(now, key), at(then, key)
        changed["set"] |= {k: v for k, v in a.items() if k not in b or b[k] != v}
        changed["removed"] += [k for k in b if k not in a]
    changed["removed"] = sorted(set(changed["removed"]))
    return changed if changed["set"] or changed["removed"] else {}


def _load_lock(lock: Path) -> dict:
    """``dvc.lock`` parsed with libyaml's loader where PyYAML has it (0.03 s instead of 0.24 s
    for the default pipeline's lock file, read in every stage)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(lock.read_text(), Loader=loader)  # noqa: S506 - a safe loader


def uncommitted_changes(root: str | os.PathLike) -> list[str]:
    """Tracked files that differ from HEAD, leaving out what DVC itself writes while a
    pipeline runs: ``dvc.lock`` and the stage outputs git tracks (metrics with
    ``cache: false``). A `dvc repro` from a clean checkout is not a dirty run."""
    root = Path(root)
    paths = (_git(root, "diff", "--name-only", "HEAD") or "").splitlines()
    outs = {"dvc.lock"}
    lock = root / "dvc.lock"
    if lock.is_file():
        try:
            stages = (_load_lock(lock) or {}).get("stages", {})
        except yaml.YAMLError:
            stages = {}
        outs |= {o["path"].rstrip("/") for e in stages.values() for o in e.get("outs", [])}
    return [p for p in paths if not any(p == o or p.startswith(o + "/") for o in outs)]


def stage_dep_hashes(
    root: str | os.PathLike, stage: str, deps: list[tuple[str, str]] | None = None
) -> dict[str, str]:
    """DVC's own hashes of a stage's dependencies as they are now, computed with DVC's
    libraries (``dvc.lock`` is written only after the stage's command exits, so it cannot be
    read from inside the stage). Empty when ``stage`` is not a stage of the repository.
    ``deps``: the stage's (path in dvc.yaml, path on disk) when the caller has them already."""
    import tempfile

    from dvc.ignore import DvcIgnoreFilter
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    root = Path(root).resolve()
    if deps is None:
        graph = _stage_graph(root, stage)
        if graph is None:
            return {}
        deps = graph[0]
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
        for entry in (_load_lock(lock) or {}).get("stages", {}).values():
            for out in entry.get("outs", []):
                if out.get("path") == rel and _dvc_hash(out):
                    return _dvc_hash(out), "dvc"
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    if "content_hash" in manifest:  # a multi-resolution dataset
        return manifest["content_hash"], "content"
    # a paired dataset: its files' SHA-256, as listed in the manifest
    files = {name: f["sha256"] for name, f in sorted(manifest["files"].items())}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), "content"


# The MLflow UI (3.x) opens an experiment on its GenAI "Traces" page unless this tag says the
# experiment trains models; gm's open on their runs.
KIND = {"mlflow.experimentKind": "custom_model_development"}


def effective_params(run) -> dict[str, str]:
    """A run's params as its latest launch ran them: MLflow params are immutable, so a launch
    that continued the run with another budget (``run.steps``) records the new value as the tag
    ``gm.param.<key>`` (see :meth:`RunHandle.open`)."""
    p = dict(run.data.params)
    p |= {k.removeprefix("gm.param."): v for k, v in run.data.tags.items()
          if k.startswith("gm.param.")}  # fmt: skip
    return p


def _launch_record(tags: Mapping[str, str], changed: Mapping[str, str]) -> str:
    """One launch of a run, as JSON for its ``gm.launch.<n>`` tag."""
    keep = ("git.commit", "git.dirty", "gm.version", "dvc.data")
    record = {k: tags[k] for k in keep if k in tags}
    record |= {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "params": dict(changed)}
    return json.dumps(record, sort_keys=True)


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
        may_change: tuple[str, ...] = (),
        where: str = "",
    ) -> RunHandle:
        """Continue ``run_id`` if given (a relaunched driver, or a larger budget), else create
        a new run.

        Every launch is recorded: the tag ``gm.launch.<n>`` holds its time, git commit, dirty
        flag, data hash and the params it changed, and ``gm.launches`` counts them. A launch
        that continues a run sets the run's lineage tags (``tags``) to its own, and records a
        param that differs from the run's logged one as the tag ``gm.param.<key>`` (MLflow
        params are immutable), so ``gm audit`` reproduces the final state. Only params
        starting with one of ``may_change`` (the budget) may differ; any other difference is a
        ConfigError naming the keys (``where``: the job's params section), before the run
        changes."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = tracking_uri(root)
        check_store(uri)
        client = MlflowClient(uri)
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                raise TrackingError(f"{uri}: run {run_id} to continue not found ({e})") from None
            before = effective_params(run)
            changed = {k: v for k, v in params.items() if before.get(k) != v}
            fixed = sorted(k for k in changed if not k.startswith(may_change))
            if fixed:
                shown = ", ".join(f"{k} {before.get(k)!r} -> {params[k]!r}" for k in fixed[:6])
                raise ConfigError(
                    f"{where or run_name}: the run {run_id} this launch would continue was made "
                    f"with other values of {shown}; only {', '.join(may_change)} may change "
                    "when a run continues (delete its folder under runs/ to train anew)"
                )
            n = int(run.data.tags.get("gm.launches", "0"))
            new = {k: v for k, v in tags.items() if run.data.tags.get(k) != v}
            if n == 0:  # a run from before launches were recorded: its tags are launch 1
                new["gm.launch.1"] = _launch_record(run.data.tags, {})
                n = 1
            logged = run.data.params
            new |= {f"gm.param.{k}": v for k, v in params.items()
                    if k in logged and logged[k] != v}  # fmt: skip
            new |= {"gm.launches": str(n + 1), f"gm.launch.{n + 1}": _launch_record(tags, changed)}
            from mlflow.entities import RunTag

            client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in new.items()])
            stale = [f"gm.param.{k}" for k in params if logged.get(k) == params[k]]  # set back
            stale += [k for k in ("dvc.upstream_params", "git.dirty_files") if k not in tags]
            for k in stale:
                if k in run.data.tags:
                    client.delete_tag(run_id, k)
            client.update_run(run_id, status="RUNNING")
            return cls(uri, run_id)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
                location = (Path(root).resolve() / "mlartifacts").as_uri()
            exp_id = client.create_experiment(name, artifact_location=location, tags=KIND)
        else:
            exp_id = exp.experiment_id
            if KIND.keys() - exp.tags.keys():  # made by an older gm or by MLflow itself
                client.set_experiment_tag(exp_id, *next(iter(KIND.items())))
        launch = {"gm.launches": "1", "gm.launch.1": _launch_record(tags, {})}
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags) | launch)
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
    transaction per step would cost more than a small model's step).

    **A tracking server that goes away mid-run does not stop training.** A flush that cannot
    reach it keeps everything buffered (metrics and sample grids), warns once, and returns; the
    next flush writes it all when the server is back. The last flush of a training
    (``wait_s`` > 0) waits up to that long for the server; if it is still away, the run fails
    with a TrackingError *before* its final checkpoint is reported, so the checkpoint before it
    stays the latest and rerunning the command retrains (and logs) only the last interval.
    MLflow's own HTTP retries (7, about four minutes per request) are cut to one here, so an
    outage costs seconds per checkpoint, not minutes.
    """

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        if uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        self.client = MlflowClient(uri)
        self.uri, self.run_id = uri, run_id
        self.pending: list = []
        self.images: list[tuple[Any, str, int]] = []
        self.offline_since: float | None = None
        self.offline_s = 0.0  # total time the store was unreachable

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def log_image(self, image, key: str, step: int) -> None:
        """Buffered like the metrics: written by the next flush."""
        self.images.append((image, key, step))

    def _write(self) -> None:
        while self.pending:
            chunk = self.pending[:1000]  # MLflow's per-request limit
            retry(self.client.log_batch, self.run_id, metrics=chunk, attempts=3)
            del self.pending[: len(chunk)]
        while self.images:
            image, key, step = self.images[0]
            retry(self.client.log_image, self.run_id, image, key=key, step=step, attempts=3)
            del self.images[0]

    def flush(self, wait_s: float = 0.0) -> bool:
        """Write what is buffered; False (and everything kept) when the store is unreachable.
        With ``wait_s`` > 0, keep trying that long, then raise TrackingError."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._write()
            except Exception as e:
                if not is_transient(e):
                    raise
                if self.offline_since is None:
                    self.offline_since = time.monotonic()
                    print(
                        f"warning: MLflow store {self.uri} unreachable ({_short(e)}); training "
                        "goes on, metrics are kept and written when it is back",
                        flush=True,
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    if wait_s > 0:
                        raise TrackingError(
                            f"{self.uri}: the MLflow server did not come back within {wait_s:.0f}"
                            f" s; {len(self.pending)} metric values of run {self.run_id} are "
                            "not logged. The previous checkpoint is intact: rerun the same "
                            "command when the server is up to retrain and log the last interval"
                        ) from None
                    return False
                time.sleep(min(2.0, left))
                continue
            if self.offline_since is not None:
                gap = time.monotonic() - self.offline_since
                self.offline_s += gap
                self.offline_since = None
                print(f"MLflow store {self.uri} is back after {gap:.0f} s; buffered metrics "
                      "written", flush=True)  # fmt: skip
            return True


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def is_transient(e: Exception) -> bool:
    """An error a later attempt may not meet: a busy SQLite file, a server away or overloaded."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, OSError):
        return True
    if not isinstance(e, MlflowException):
        return False
    text = str(e).lower()
    return any(
        s in text
        for s in ("locked", "busy", "connection", "timed out", "503", "502", "max retries")
    )


def retry(fn, *args, attempts: int = 6, first_wait: float = 0.25, **kwargs):
    """Call ``fn``, retrying with exponential back-off (0.25 s … 8 s) on a store that is
    briefly busy: SQLite's "database is locked" when several trials write one ``mlflow.db``,
    a server that drops a connection. The last failure is raised."""
    wait = first_wait
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or attempt == attempts - 1:
                raise
            time.sleep(wait)
            wait *= 2


# The MLflow UI (3.17) opens every experiment on its GenAI pages (traces, token usage) unless
# the link asks for model training, whatever the experiment's kind tag says (seen in headless
# Chromium: the runs of an experiment appear only with this parameter).
UI_WORKFLOW = "workflowType=machine_learning"


def run_url(root: str | os.PathLike, run_id: str) -> str:
    """The MLflow UI page of a run, opened on model training: on the tracking server, or on
    ``mlflow ui``'s default address for the SQLite store (README: MLflow section)."""
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    exp = MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{exp}/runs/{run_id}?{UI_WORKFLOW}"


def is_model_uri(ref: str) -> bool:
    """An MLflow model URI (``runs:/…``, ``models:/…``, any ``scheme://``), not a file path."""
    return "://" in ref or ref.startswith(("runs:/", "models:/"))


def model_info(uri: str):
    """MLflow's ModelInfo of ``uri`` (metadata, signature) without loading the model; an
    unknown run, model, alias or store is a DataError carrying MLflow's own message."""
    import mlflow.models

    try:
        return mlflow.models.get_model_info(uri)
    except Exception as e:
        raise DataError(f"{uri}: cannot read the MLflow model ({e})") from None


@contextlib.contextmanager
def using_uri(uri: str):
    """MLflow's fluent API (``log_model``, ``register_model``) pointed at ``uri`` for a block.
    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to child processes: both
    are restored afterwards."""
    import mlflow

    previous_uri, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


# The evaluate stage's champion rule: lower is better for these metrics, higher for the others.
LOWER_IS_BETTER = frozenset({"fid", "kid", "bits_per_dim"})
CHAMPION = "champion"
MODEL_PREFIX = "gm-"


def register_champion(
    root: str | os.PathLike, job: str, results: Mapping[str, Any], metric: str = "fid"
) -> dict[str, Any] | None:
    """Register a run's exported generator as a version of the registered model ``gm-<job>``
    (once per run: a rerun of the evaluation finds its version again) and move the
    ``champion`` alias to it when its ``metric`` beats the current champion's, or when there
    is none. Where ``results`` has the metric's 95 % interval (``<metric>_ci_low``/``_high``),
    the whole interval must beat it. Returns what was done, or None when the run has no
    generator or no ``metric``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = results.get("mlflow_run_id")
    if not run_id or metric not in results:
        return None
    uri = tracking_uri(root)
    check_store(uri)
    client = MlflowClient(uri)
    # MLflow 3 keeps logged models apart from the run's artifacts: find the run's generator.
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"source_run_id = '{run_id}' AND name = 'generator'",
    )
    if not logged:
        return None
    name = f"{MODEL_PREFIX}{job}"
    value = float(results[metric])
    lower = metric in LOWER_IS_BETTER
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:  # evaluated again: the version keeps the latest value
        version = found[0]
        client.set_model_version_tag(name, version.version, f"eval.{metric}", repr(value))
    else:
        tags = {f"eval.{metric}": repr(value), "gm.job": job, "eval.step": str(results["step"])}
        with using_uri(uri):
            import mlflow

            version = mlflow.register_model(f"models:/{logged[0].model_id}", name, tags=tags)
        client.update_registered_model(
            name, description=f"gm job {job!r}: generators registered by the evaluate stage; "
            f"alias {CHAMPION!r} = the best {metric} ({'lower' if lower else 'higher'} wins)",
        )  # fmt: skip
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        best = float(current.tags.get(f"eval.{metric}", "nan"))
    except MlflowException:
        current, best = None, float("nan")
    # With an interval (the evaluation's bootstrap), the whole interval must beat the
    # champion's value: a difference the sampling noise could undo moves nothing.
    edge = results.get(f"{metric}_ci_high" if lower else f"{metric}_ci_low", value)
    wins = (
        current is None
        or best != best  # the champion has no value of this metric
        or (value < best and edge < best if lower else value > best and edge > best)
    )
    if current is not None and current.version == version.version:
        wins = True  # already the champion
    if wins:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {
        "model": name,
        "version": int(version.version),
        "metric": metric,
        "value": value,
        "champion": wins,
        "previous": None if current is None else int(current.version),
        "previous_value": None if current is None else best,
    }
