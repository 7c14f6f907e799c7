"""Hyperparameter search with Ray Tune over a training job of ``params.yaml``.

A search (``params.yaml: tune.<name>``, a :class:`SearchConfig`) names a job of ``train`` or
``train_paired`` and a search space over its settings, as dotted paths into the job's full
config (``model.optim_g.lr``, ``model.optim_g.betas.0``, ``run.batch_size``; unset keys of
the family's config are searchable too). Each trial is that job with the sampled values,
trained by the same loop as ``train`` (:func:`gm.train.ray_train.run_loop`) in the trial's own
process; it reports the job's evaluation metric (KID in the domain classifier's features,
a paired family's PSNR or L1, ...) every ``report_every`` steps, with a checkpoint.

- **Schedulers**: ASHA stops trials whose metric falls behind at its rungs; PBT (GANs, lr
  and betas) copies the best trials' checkpoints into the worst and perturbs their settings,
  its mutation log kept with the results; FIFO runs every trial to the budget.
- **Searchers**: Optuna's TPE (through Ray Tune) or random/grid sampling.
- **MLflow**: one parent run per search and a child run per trial (``mlflow.parentRunId``)
  with its params, metric curves and sample grids; the best trial is tagged
  ``gm.tune.best``, its values logged on the parent.
- **Results** (written atomically): ``best_params.yaml`` (the best values as params.yaml
  keys and as ``dvc exp run -S`` overrides), ``trials.csv`` (every trial), a JSON summary
  (DVC metrics) and a picture of every trial's metric curve.
- **Resume**: the Tune experiment lives under ``<runs>/tune/<name>-<hash>`` (kept across
  ``dvc repro``); the same command after an interrupted search restores it with
  ``Tuner.restore``: finished trials are kept, unfinished ones continue from their
  checkpoints. ``<runs>`` may be a URI (``s3://…``) shared by a Ray cluster. A trial keeps
  every checkpoint while the search runs (deleting one could race Tune's saved state) and
  only its latest once the search has ended.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gm.config import check, from_dict, to_dict
from gm.errors import ConfigError

STATE_FILE = "gm_tune.json"
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
# run keys a search sets itself (or the job fixes): neither searched nor held per trial
SEARCH_RUN_KEYS = ("steps", "checkpoint_every", "num_workers", "data")


@dataclass(frozen=True)
class SearchConfig:
    """A search of ``params.yaml: tune``."""

    # the config trials start from: its params key, SECTION.NAME (train.dcgan), in params.yaml
    # (where a tune stage depends on that key alone); elsewhere a bare job name also resolves
    job: str
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted key → {dist: args}
    metric: str = "kid"  # a metric the job reports at each checkpoint (history.csv columns)
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    search: Literal["optuna", "random"] = "optuna"
    num_samples: int = 8  # trials (with grid values: repetitions of the grid)
    max_concurrent_trials: int = 2  # 0: as many as the cluster's CPUs allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    steps: int = 0  # per-trial budget; 0: the job's run.steps
    report_every: int = 50  # steps between reports (and trial checkpoints)
    grace_steps: int = 100  # ASHA: steps before a trial can be stopped
    reduction_factor: float = 2.0  # ASHA: 1/rf of the trials go on at each rung
    perturbation_steps: int = 100  # PBT: steps between exploit/explore decisions
    seed: int = 0  # the searcher's seed
    # copy every trial's final checkpoint to OUT/checkpoints/<trial id>/ (with trial.json: its
    # values), e.g. the λ sweep of a learned codec that the rd stage scores
    keep_checkpoints: bool = False
    # OUT folder of an earlier search with kept checkpoints: each trial starts from the weights
    # of the kept trial with the same searched values (run.init_from); '' = random init
    warm_start: str = ""
    # the job's run keys as every trial has them, held, not searched (not in best_params.yaml):
    # e.g. {ema_beta: 0.0} where trials are too short for the job's EMA of G to warm up
    trial_run: dict[str, Any] = field(default_factory=dict)

    @property
    def job_name(self) -> str:
        """The job's name in its section: dcgan of train.dcgan (or of a bare dcgan)."""
        return self.job.rpartition(".")[2]

    def __post_init__(self):
        check(bool(self.space), "space", "declare at least one searched key")
        for name in ("num_samples", "report_every"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.steps >= 0, "steps", "must be >= 0 (0: the job's run.steps)")
        check(self.max_concurrent_trials >= 0, "max_concurrent_trials", "must be >= 0")
        check(self.cpus_per_trial > 0, "cpus_per_trial", "must be > 0")
        check(self.grace_steps >= 1, "grace_steps", "must be >= 1")
        check(self.reduction_factor > 1, "reduction_factor", "must be > 1")
        check(self.perturbation_steps >= 1, "perturbation_steps", "must be >= 1")
        for key, spec in self.space.items():
            _check_spec(f"space.{key}", spec)
            check(
                key.split(".")[0] in ("model", "run"),
                f"space.{key}",
                "searched keys start with model. or run.",
            )
            check(
                key.removeprefix("run.") not in SEARCH_RUN_KEYS,
                f"space.{key}",
                "set by the search itself (steps, report_every), not searchable",
            )
        for key in self.trial_run:
            check(
                key not in SEARCH_RUN_KEYS,
                f"trial_run.{key}",
                "set by the search itself (steps, report_every) or the job, not per trial",
            )
            check(f"run.{key}" not in self.space, f"trial_run.{key}", f"searched (space.run.{key})")
        grid = [k for k, s in self.space.items() if "grid" in s]
        check(
            not (grid and self.search == "optuna"),
            f"space.{grid[0] if grid else ''}",
            "grid values need search: random (Optuna samples, it does not enumerate)",
        )
        if self.scheduler == "pbt":
            check(self.search == "random", "search", "PBT explores itself: use search: random")
            for key in self.space:
                parts = key.split(".")
                check(
                    len(parts) >= 3 and parts[0] == "model" and parts[1].startswith("optim"),
                    f"space.{key}",
                    "PBT changes settings of a running trial: only optimizer settings "
                    "(model.optim_*.lr, betas, eps, weight_decay) can be mutated",
                )


def _check_spec(where: str, spec: Any) -> None:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
    ((dist, args),) = spec.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {dist!r} (known: {DISTRIBUTIONS})")
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{dist}: expected a non-empty list of values")
        return
    if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)):
        raise ConfigError(f"{where}.{dist}: expected [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}.{dist}: low {low} must be below high {high}")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {low}")
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}.randint: bounds must be integers, got {args!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _domain(spec: dict[str, Any]):
    from ray import tune

    ((dist, args),) = spec.items()
    if dist == "loguniform":
        return tune.loguniform(*args)
    if dist == "uniform":
        return tune.uniform(*args)
    if dist == "randint":
        return tune.randint(args[0], args[1] + 1)  # params.yaml bounds are inclusive
    if dist == "choice":
        return tune.choice(args)
    return tune.grid_search(args)


# -- configs of trials ------------------------------------------------------------------------


def base_config(job) -> dict[str, Any]:
    """The job's full config, family defaults included: what search keys address."""
    return {"model": to_dict(job.family_config()), "run": to_dict(job.run)}


def _set_path(tree: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: {'.'.join(parts[:i])} has no item {part}")
            idx: Any = int(part)
        elif isinstance(node, dict):
            if part not in node:
                known = ", ".join(sorted(node))
                raise ConfigError(
                    f"{where}: {'.'.join(parts[: i + 1])} is not a key of the job's config "
                    f"(there: {known})"
                )
            idx = part
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value, not a mapping")
        if last:
            node[idx] = value
        else:
            node = node[idx]


def trial_config(job, values: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(plain config, validated TrainConfig) of the job with ``values`` (dotted keys) set."""
    import copy

    from gm.train.job import TrainConfig

    tree = copy.deepcopy(base_config(job))
    for key, value in values.items():
        _set_path(tree, key, value, f"space.{key}")
    cfg = from_dict(
        TrainConfig,
        {"family": job.family, "dataset": job.dataset, "pairs": job.pairs,
         "resolution": job.resolution, "model": tree["model"], "run": tree["run"]},
        "trial",
    )  # fmt: skip
    cfg.family_config("trial")
    return tree, cfg


def check_search(search: SearchConfig, job, where: str) -> dict[str, Any]:
    """Every searched key exists in the job's config and every bound gives a valid config;
    returns the validated ``trial_run`` values (:func:`held_run`). Raises ConfigError naming
    ``<where>.<key>`` and the value."""
    for key, spec in search.space.items():
        ((_, values),) = spec.items()  # choices, or the two bounds
        for v in values:
            _checked_trial(job, key, v, f"{where}.space.{key}")
    held = held_run(search, job, where)
    if job.run.num_workers != 1:
        raise ConfigError(
            f"{where}.job: trials train in one process each; {search.job} has "
            f"run.num_workers {job.run.num_workers}: search with 1 worker per trial"
        )
    if search.metric == "kid" and not job.run.kid_samples:
        raise ConfigError(f"{where}.metric: kid, but {search.job} has run.kid_samples 0 (no KID)")
    return held


def held_run(search: SearchConfig, job, where: str) -> dict[str, Any]:
    """``search.trial_run`` validated against the job's run config; a ConfigError names
    ``<where>.trial_run.<key>`` and the value when the job refuses it."""
    held = {}
    for key, value in search.trial_run.items():
        cfg = _checked_trial(job, f"run.{key}", value, f"{where}.trial_run.{key}")
        held[key] = getattr(cfg.run, key)
    return held


def _checked_trial(job, key: str, value: Any, where: str):
    """The job's validated TrainConfig with dotted ``key`` set to ``value``; a ConfigError
    names ``where`` and the value, then the job's own message."""
    try:
        return trial_config(job, {key: value})[1]
    except ConfigError as e:
        msg = str(e).removeprefix(f"space.{key}: ").removeprefix(f"trial.{key}: ")
        raise ConfigError(f"{where}: value {value!r}: {msg}") from None


def overrides(section: str, job_name: str, values: dict[str, Any], job) -> dict[str, Any]:
    """The best values as ``params.yaml`` keys: list items are set through their whole list
    (``model.optim_g.betas.0`` → ``…betas: [0.3, 0.999]``), the form ``dvc exp run -S`` and
    Hydra accept whether the key is already in params.yaml or not."""
    tree, _ = trial_config(job, values)
    out = {}
    for key in values:
        parts, node = key.split("."), tree
        head = []
        for part in parts:
            if isinstance(node, list):
                break
            head.append(part)
            node = node[part]
        out[".".join([section, job_name, *head])] = node
    return out


def set_arguments(flat: dict[str, Any]) -> list[str]:
    """``dvc exp run -S`` arguments (Hydra's add-or-override ``++key=value``)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        return str(v)

    return [f"++{k}={fmt(v)}" for k, v in flat.items()]


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *heads, last = key.split(".")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = value
    return out


# -- the trial --------------------------------------------------------------------------------


class TrialHost:
    """The loop's host inside a Ray Tune function trial: one process, rank 0 of 1."""

    rank, world = 0, 1

    def __init__(self, use_gpu: bool):
        import torch

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(directory) if directory else None
        tune.report(metrics, checkpoint=ckpt)

    def wait_reported(self) -> None:
        pass


def _child_run(base: dict[str, Any], values: dict[str, Any], trial_id: str, trial_name: str):
    """The trial's MLflow child run: found again by its trial id (a restored trial keeps its
    run), else created under the search's parent run."""
    from mlflow import MlflowClient

    from gm import tracking

    client = MlflowClient(base["uri"])
    parent = client.get_run(base["parent_run_id"])
    exp = parent.info.experiment_id
    found = tracking.retry(
        client.search_runs,
        [exp],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
            f"and tags.`gm.tune.trial_id` = '{trial_id}'"
        ),
    )
    if found:
        return found[0].info.run_id
    from mlflow.entities import Param

    tags = {
        "mlflow.parentRunId": parent.info.run_id,
        "gm.tune": base["name"],
        "gm.tune.trial_id": trial_id,
        "gm.job": base["job"],
        **{k: v for k, v in parent.data.tags.items() if k.startswith(("git.", "dvc.data"))},
    }
    run = tracking.retry(client.create_run, exp, run_name=trial_name, tags=tags)
    params = tracking.flatten(
        {"family": base["family"], "dataset": base["data_name"], **base["trial_tree"]}
    )
    params |= {f"search.{k}": str(v) for k, v in values.items()}
    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        tracking.retry(client.log_batch, run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def kept_trials(folder: str | os.PathLike) -> list[tuple[dict[str, Any], Path]]:
    """(trial.json, checkpoint path) of every trial a ``keep_checkpoints`` search kept in
    ``folder`` (its OUT folder), in trial-id order."""
    metas = sorted(Path(folder).glob("checkpoints/*/trial.json"))
    return [(json.loads(m.read_text()), (m.parent / "checkpoint.pt").resolve()) for m in metas]


def kept_checkpoints(folder: str | os.PathLike) -> list[tuple[dict[str, Any], str]]:
    """(searched values, checkpoint path) of every kept trial in ``folder``."""
    return [(doc["values"], str(path)) for doc, path in kept_trials(folder)]


def _same_values(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def eq(x, y):
        if isinstance(x, int | float) and isinstance(y, int | float):
            return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
        return x == y

    return set(a) == set(b) and all(eq(a[k], b[k]) for k in a)


def _warm_start_for(values: dict[str, Any], kept: list) -> str:
    for kept_values, path in kept:
        if _same_values(values, kept_values):
            return path
    raise ConfigError(
        f"warm_start: no kept checkpoint has the values {values} (kept: {[v for v, _ in kept]})"
    )


def _trial(values: dict[str, Any], base: dict[str, Any]) -> None:
    """A Tune function trainable: the job with ``values`` set, trained in this process."""
    import torch
    from ray import tune

    from gm.config import from_dict
    from gm.train.job import TrainConfig
    from gm.train.ray_train import run_loop

    job = from_dict(TrainConfig, base["job_config"], "job")
    tree, cfg = trial_config(job, values)
    if base.get("warm_start"):
        tree["run"]["init_from"] = _warm_start_for(values, base["warm_start"])
    torch.set_num_threads(max(1, int(base["cpus_per_trial"])))
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    base = base | {"trial_tree": tree}
    run_id = _child_run(base, values, trial_id, ctx.get_trial_name())
    config = {
        "family": cfg.family,
        "name": f"{base['name']}-{trial_id}",
        "model": tree["model"],
        "run": tree["run"],
        "dataset_dir": base["dataset_dir"],
        "data_info": base["data_info"],
        "fault_injection": None,
        "tracking": {"uri": base["uri"], "run_id": run_id},
        "progress": None,
        "classifier": base["classifier"],
        "own_run": True,  # a PBT exploit restores another trial's checkpoint, not its run
        "optim_from_config": base["scheduler"] == "pbt",
    }
    from mlflow import MlflowClient

    from gm import tracking

    client = MlflowClient(base["uri"])
    # A trial the scheduler stops is ended by Ray (SystemExit in tune.report): the driver
    # sets the final status of every child run once the search is over.
    try:
        run_loop(config, TrialHost(base["gpus_per_trial"] > 0))
    except Exception:
        tracking.retry(client.set_terminated, run_id, status="FAILED")
        raise


# -- the search -------------------------------------------------------------------------------


def search_key(name: str, search: SearchConfig, job, info: dict, digest: str) -> str:
    from gm.train.job import source_hash

    ident = {
        "search": to_dict(search),
        "job": to_dict(job),
        "data_info": info,
        "dataset": digest,
        "gm": source_hash(),
    }
    h = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    return f"{name}-{h[:12]}"


def _storage(runs: str | os.PathLike) -> str:
    runs = str(runs)
    if "://" in runs:  # s3://, gs://, ... : a cluster's shared storage
        return runs.rstrip("/") + "/tune"
    return str(Path(runs).resolve() / "tune")


def _read_state(storage: str, key: str) -> dict:
    if "://" in storage:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(f"{storage}/{key}/{STATE_FILE}")
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except (OSError, FileNotFoundError):
            return {}
    p = Path(storage) / key / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_state(storage: str, key: str, state: dict) -> None:
    data = json.dumps(state).encode()
    if "://" in storage:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(f"{storage}/{key}/{STATE_FILE}")
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    from gm.io import write_json

    p = Path(storage) / key / STATE_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json(p, state)


def search_paths(
    p,
    name: str,
    datasets: str | os.PathLike = "datasets",
    classifiers: str | os.PathLike = "models/classifiers",
) -> dict[str, Any]:
    """Section, job and the default folders of search ``name`` of params ``p``: the job's
    prepared (or paired) dataset, and its domain classifier when the job has one."""
    if name not in p.tune:
        raise ConfigError(f"tune.{name}: no such search ({', '.join(p.tune) or 'none'})")
    search = p.tune[name]
    section, job = p.job(search.job)
    kind, data = ("pairs", job.pairs) if job.pairs else ("pyramid", job.dataset)
    clf = Path(classifiers) / job.dataset / "classifier.pt" if job.dataset else None
    return {"search": search, "section": section, "job": job,
            "dataset_dir": Path(datasets) / kind / data, "classifier": clf}  # fmt: skip


def run_search(
    name: str,
    search: SearchConfig,
    section: str,
    job,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    report_json: str | os.PathLike,
    report_png: str | os.PathLike,
    root: str | os.PathLike,
    runs: str | os.PathLike = "runs",
    classifier: str | os.PathLike | None = None,
    stage: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) search ``name``; write its results; returns the summary."""
    from gm import tracking
    from gm.train.job import data_info, init_ray

    root = Path(root).resolve()
    dataset_dir, out_dir = Path(dataset_dir).resolve(), Path(out_dir).resolve()
    where = f"tune.{name}"
    held = check_search(search, job, where)
    steps = search.steps or job.run.steps
    job = _with_run(job, steps=steps, checkpoint_every=search.report_every, **held)
    info = data_info(dataset_dir, job.resolution)
    if search.metric == "kid" and not classifier:
        raise ConfigError(
            f"{where}.metric: kid needs the dataset's domain classifier (--classifier), "
            "from the DVC stage classifier@<dataset>"
        )
    if classifier and not Path(classifier).is_file():
        raise ConfigError(f"{where}: classifier {classifier}: no such file")
    digest, _ = tracking.dataset_digest(root, dataset_dir)
    kept = []
    if search.warm_start:
        from gm.io import sha256_file

        kept = kept_checkpoints(search.warm_start)
        if not kept:
            raise ConfigError(f"{where}.warm_start: {search.warm_start}: no kept checkpoints "
                              "(checkpoints/*/trial.json) there")  # fmt: skip
        digest += "".join(sha256_file(p)[:16] for _, p in kept)  # the weights, not the path
    key = search_key(name, search, job, info, digest)
    storage = _storage(runs)
    state = _read_state(storage, key)

    uri = tracking.tracking_uri(root)
    params = tracking.flatten({"search": to_dict(search), "job": name, "section": section})
    params |= {f"search.space.{k}": json.dumps(v) for k, v in search.space.items()}
    tags = tracking.lineage_tags(root, stage) | {"gm.tune": name, "gm.tune.key": key}
    run_id = state.get("parent_run_id") if state.get("uri") == uri else None
    # The search key is its identity: a resumed search records what changed, refusing nothing.
    parent = tracking.RunHandle.open(root, f"tune-{name}", run_id, params, tags, may_change=("",))
    _write_state(storage, key, {"uri": uri, "parent_run_id": parent.run_id})
    parent.log_dataset(job.data_name, str(dataset_dir), digest)

    init_ray(job.run)
    import ray
    from ray import tune

    base = {
        "name": name,
        "job": search.job_name,
        "job_config": to_dict(job),
        "family": job.family,
        "data_name": job.data_name,
        "dataset_dir": str(dataset_dir),
        "data_info": info,
        "classifier": str(Path(classifier).resolve()) if classifier else None,
        "uri": uri,
        "parent_run_id": parent.run_id,
        "scheduler": search.scheduler,
        "cpus_per_trial": search.cpus_per_trial,
        "gpus_per_trial": search.gpus_per_trial,
        "warm_start": kept,
    }
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base),
        {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial},
    )
    path = f"{storage}/{key}"
    start = time.time()
    try:
        if tune.Tuner.can_restore(path):
            print(f"{where}: resuming the search in {path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = _new_tuner(search, trainable, steps, storage, key)
        results = tuner.fit()
    except BaseException:
        parent.finish("FAILED")  # the Tune experiment stays: the same command resumes it
        raise
    summary = _write_results(
        name, search, section, job, results, out_dir, report_json, report_png, parent, path,
        wall_s=time.time() - start, cluster=ray.cluster_resources(),
    )  # fmt: skip
    _prune_checkpoints(results)
    return summary


def _with_run(job, **changes):
    from dataclasses import replace

    return replace(job, run=replace(job.run, **changes))


def _new_tuner(search: SearchConfig, trainable, steps: int, storage: str, key: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    space = {k: _domain(v) for k, v in search.space.items()}
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=steps,
            grace_period=min(search.grace_steps, steps),
            reduction_factor=search.reduction_factor,
        )
    elif search.scheduler == "pbt":
        scheduler = PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=search.perturbation_steps,
            hyperparam_mutations=space,
            log_config=True,
            synch=False,
        )
    else:
        scheduler = FIFOScheduler()
    searcher = None
    if search.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=search.seed)
    elif search.scheduler != "pbt":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        searcher = BasicVariantGenerator(random_state=search.seed)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            scheduler=scheduler,
            search_alg=searcher,
            num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent_trials or None,
        ),
        run_config=tune.RunConfig(
            name=key,
            storage_path=storage,
            # Every checkpoint is kept while the search runs; _prune_checkpoints keeps each
            # trial's latest once it has ended. Tune's num_to_keep deletes a checkpoint before
            # the experiment state that names it is replaced on storage, so a driver killed in
            # between left a state that resumes a trial from a deleted checkpoint (the trial
            # then ends in error). PBT also clones trials from each other's checkpoints.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=1,
        ),
    )


def _prune_checkpoints(results) -> None:
    """Delete every trial checkpoint but the trial's latest.

    Only safe once ``Tuner.fit`` has returned: Tune has then saved (and waited for) the final
    experiment state, which names each trial's latest checkpoint, the one a later restore of
    an errored trial starts from. Works on any ``pyarrow.fs`` storage (local, ``s3://``).
    """
    import pyarrow.fs as pafs

    for r in results:
        if r.checkpoint is None:  # nothing to continue from: keep what is there
            continue
        keep = r.checkpoint.path.rstrip("/")
        for info in r.filesystem.get_file_info(pafs.FileSelector(r.path, allow_not_found=True)):
            path = info.path.rstrip("/")
            stale = path != keep and path.rsplit("/", 1)[-1].startswith("checkpoint_")
            if stale and info.type == pafs.FileType.Directory:
                r.filesystem.delete_dir(path)


def _keep_checkpoints(results, rows: list[dict], search: SearchConfig, dest: Path) -> None:
    """Each finished trial's latest checkpoint and its values, for later stages."""
    from gm.io import write_json
    from gm.train.ray_train import CHECKPOINT_FILE

    for r, row in zip(results, rows, strict=True):
        if r.error or r.checkpoint is None:
            continue
        d = dest / row["trial_id"]
        d.mkdir(parents=True)
        with r.checkpoint.as_directory() as src:
            shutil.copyfile(Path(src) / CHECKPOINT_FILE, d / CHECKPOINT_FILE)
        write_json(d / "trial.json", {"trial_id": row["trial_id"], "steps": row["steps"],
                                      "status": row["status"],
                                      "mlflow_run_id": row["mlflow_run_id"],
                                      "values": {k: row[k] for k in search.space}})  # fmt: skip


def _write_results(
    name, search, section, job, results, out_dir, report_json, report_png, parent, path,
    wall_s: float, cluster: dict,
) -> dict[str, Any]:  # fmt: skip
    import yaml

    from gm import tracking
    from gm.io import atomic_dir, write_json

    steps = job.run.steps
    rows, curves = [], {}
    client = parent.client
    children = {
        r.data.tags.get("gm.tune.trial_id"): r.info.run_id
        for r in client.search_runs(
            [client.get_run(parent.run_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
            max_results=10000,
        )
    }
    for r in results:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or (r.config or {}).get("trial_id", "") or Path(r.path).name
        df = r.metrics_dataframe
        if df is not None and search.metric in df and "step" in df:
            curves[trial_id] = (df["step"].tolist(), df[search.metric].tolist())
        last_step = int(m.get("step", 0) or 0)
        status = "error" if r.error else ("full" if last_step >= steps else "stopped")
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "steps": last_step,
                search.metric: m.get(search.metric, math.nan),
                "time_s": round(float(m.get("time_total_s", 0.0) or 0.0), 2),
                "mlflow_run_id": children.get(trial_id, ""),
                **{f"{k}": r.config.get(k) for k in search.space},
            }
        )
    done = [row for row in rows if row["status"] != "error" and _finite(row[search.metric])]
    if not done:
        raise ConfigError(f"tune.{name}: no trial reported {search.metric}; see {path}")
    full = [row for row in done if row["status"] == "full"] or done
    sign = 1 if search.mode == "min" else -1
    best = min(full, key=lambda row: sign * row[search.metric])
    values = {k: best[k] for k in search.space}
    flat = overrides(section, search.job_name, values, job)
    summary = {
        "best": {search.metric: best[search.metric], "trial_id": best["trial_id"],
                 "steps": best["steps"], "mlflow_run_id": best["mlflow_run_id"]},
        "trials": len(rows),
        "stopped_early": sum(row["status"] == "stopped" for row in rows),
        "errored": sum(row["status"] == "error" for row in rows),
        "trial_steps": sum(row["steps"] for row in rows),
        "full_budget_steps": len(rows) * steps,
        "trial_seconds": round(sum(row["time_s"] for row in rows), 1),
        "wall_s": round(wall_s, 1),
        "cluster_cpus": cluster.get("CPU", 0),
        "mlflow_parent_run_id": parent.run_id,
        "experiment_path": path,
    }  # fmt: skip
    best_doc = {
        "search": name,
        "job": f"{section}.{search.job_name}",
        "metric": {"name": search.metric, "mode": search.mode, "value": best[search.metric],
                   "steps": best["steps"]},
        "trial": {"id": best["trial_id"], "mlflow_run_id": best["mlflow_run_id"]},
        "params": nested(flat),
        "set": set_arguments(flat),
    }  # fmt: skip
    header = (
        f"# Best trial of tune.{name}: {search.metric} {best[search.metric]:.6g} "
        f"({search.mode}) after {best['steps']} steps.\n"
        "# Train with it: dvc exp run " + " ".join(f"-S '{s}'" for s in best_doc["set"]) + "\n"
    )
    png = _plot(curves, search, best["trial_id"], name)
    with atomic_dir(out_dir) as tmp:
        (tmp / "best_params.yaml").write_text(header + yaml.safe_dump(best_doc, sort_keys=False))
        with open(tmp / "trials.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(sorted(rows, key=lambda row: row["trial_id"]))
        if search.keep_checkpoints:
            _keep_checkpoints(results, rows, search, tmp / "checkpoints")
        pbt = _pbt_logs(path)
        if pbt:
            (tmp / "pbt").mkdir()
            for fname, text in pbt.items():
                (tmp / "pbt" / fname).write_text(text)
    write_json(Path(report_json), summary)
    tmp_png = Path(report_png).with_suffix(".tmp.png")
    Path(report_png).parent.mkdir(parents=True, exist_ok=True)
    png.save(tmp_png)
    os.replace(tmp_png, report_png)

    # MLflow: the best trial tagged, the parent run gets the results.
    status = {"full": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    for row in rows:
        if row["mlflow_run_id"]:
            tracking.retry(client.set_tag, row["mlflow_run_id"], "gm.tune.status", row["status"])
            tracking.retry(client.set_terminated, row["mlflow_run_id"], status[row["status"]])
    if best["mlflow_run_id"]:
        tracking.retry(client.set_tag, best["mlflow_run_id"], "gm.tune.best", "true")
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric(f"best_{search.metric}", float(best[search.metric]), now, 0)]
    counts = ("trials", "stopped_early", "errored", "trial_steps", "trial_seconds", "wall_s")
    metrics += [Metric(k, float(summary[k]), now, 0) for k in counts]
    existing = client.get_run(parent.run_id).data.params
    params = [Param(f"best.{k}", str(v)) for k, v in values.items()
              if f"best.{k}" not in existing]  # fmt: skip
    tracking.retry(client.log_batch, parent.run_id, metrics=metrics, params=params)
    parent.set_tags({"gm.tune.best_trial": best["trial_id"]})
    for f in ("best_params.yaml", "trials.csv"):
        client.log_artifact(parent.run_id, str(out_dir / f), artifact_path="tune")
    client.log_artifact(parent.run_id, str(report_png), artifact_path="tune")
    parent.finish()
    return summary


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _pbt_logs(path: str) -> dict[str, str]:
    """PBT's mutation log (``pbt_global.txt``: one JSON line per exploit with the old and new
    configs; ``pbt_policy_<trial>.txt``: each trial's schedule, replayable with Ray's
    ``PopulationBasedTrainingReplay``) from the experiment folder."""
    if "://" in path:
        return {}
    return {p.name: p.read_text() for p in sorted(Path(path).glob("pbt_*.txt"))}


def _plot(curves: dict, search: SearchConfig, best: str, name: str):
    """Every trial's metric against steps (the best one bold), as a PIL image."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for trial_id, (x, y) in sorted(curves.items()):
        is_best = trial_id == best
        ax.plot(x, y, lw=2.4 if is_best else 1.0, alpha=1.0 if is_best else 0.6,
                label=f"{trial_id} (best)" if is_best else None, marker="o", ms=2.5)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(f"{search.metric} ({'lower' if search.mode == 'min' else 'higher'} is better)")
    ax.set_title(f"tune.{name}: {len(curves)} trials, {search.scheduler}, {search.search}")
    ax.grid(alpha=0.3)
    if best in curves:
        ax.legend(loc="best", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
