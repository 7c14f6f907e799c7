"""Training under Ray Train (V2): one TorchTrainer whose workers run :class:`Trainer` steps.

- Data (``run.data``): every worker asks :mod:`gm.data.rowstore` for the rows of its batch
  at step k: a per-epoch permutation seeded by (seed, epoch), cut across ranks. ``memory``
  reads the train split once per worker, ``stream`` reads a window of rows at a time (memory
  bounded by a window, for datasets larger than memory), ``auto`` picks by size. The batch of
  step k does not depend on the mode, so a resumed run sees exactly the batches it would have
  seen, in every mode.
- Checkpoints: every ``checkpoint_every`` steps all ranks call ``ray.train.report`` (a barrier);
  rank 0 attaches the full trainer state, the MLflow run id and the metric history. A restarted
  worker group (``FailureConfig``) and a relaunched driver (same ``RunConfig(name,
  storage_path)``) both continue from the latest one.
- Tracking: rank 0 alone logs per-step metrics (buffered, flushed at each checkpoint) and a
  sample grid per checkpoint into the run the driver opened (:mod:`gm.tracking`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from gm.augment import mirror, rot90
from gm.config import check
from gm.errors import DataError

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class RunSettings:
    """How a training run executes (the model's own hyperparameters live in its config)."""

    steps: int = 1000  # optimizer steps (each runs every due phase once)
    batch_size: int = 64  # per worker
    checkpoint_every: int = 100  # steps between checkpoints
    seed: int = 0
    ema_beta: float = 0.0  # EMA of the family's ema_modules; 0 = off
    amp: bool = True  # mixed precision with torch.amp (CUDA only)
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts before the run fails
    # how each worker reads its batches (gm.data.rowstore): memory = the train split read once;
    # stream = a window of rows at a time, memory bounded by a window; auto = stream a split
    # of more than 2 GiB of image bytes. The batches are the same in every mode.
    data: Literal["auto", "memory", "stream"] = "auto"
    # warm start: a checkpoint.pt of the same family and config whose weights (and EMA) a new
    # run starts from; optimizers, step and schedules start fresh ('' = random init)
    init_from: str = ""
    # steps between rows of history.csv (the loss curves of `dvc plots`: interval means, with
    # the checkpoint's KID / test-pair metrics on checkpoint rows); 0: steps / 50
    log_every: int = 0
    # dataset x-flip (Progressive GAN, StyleGAN): half of each batch flipped left-right, chosen
    # from (seed, rank, step), so a resumed run sees the same batches (gm.augment.mirror)
    mirror: bool = False
    # dataset 90-degree rotations: each image of a batch turned by 0, 90, 180 or 270 degrees,
    # chosen from (seed, rank, step) (gm.augment.rot90); with mirror, the square's 8 symmetries
    rot90: bool = False
    # samples (and as many validation images) of the in-training KID at each checkpoint, when
    # the stage has a domain classifier: its cost is this many samples (an unrolled sampler's
    # many network calls each); evaluate@ scores the final model on evaluate.num_samples.
    # 0: no in-training KID (a one-checkpoint run whose evaluate@ stage scores it anyway)
    kid_samples: int = 256
    # weights and batches in torch.channels_last (NHWC), the layout oneDNN (CPU) and cuDNN
    # convolve fastest: faster steps for most default jobs on 2 CPU cores (bench/bench_cpu.py,
    # docs/training.md); numerically a different summation order, not a different model
    channels_last: bool = True

    @property
    def curve_every(self) -> int:
        return self.log_every or max(1, self.steps // 50)

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "num_workers"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(0.0 <= self.ema_beta < 1.0, "ema_beta", "must be in [0, 1)")
        check(self.max_failures >= -1, "max_failures", "must be >= -1 (-1: unlimited)")
        check(self.log_every >= 0, "log_every", "must be >= 0 (0: steps / 50)")
        check(self.kid_samples == 0 or self.kid_samples >= 8, "kid_samples",
              "must be 0 (off) or >= 8 (KID needs subsets)")  # fmt: skip


def shard_indices(n: int, step: int, batch_size: int, rank: int, world: int, seed: int):
    """Positions of this rank's batch at ``step`` for ``n`` rows read as one window (a plain
    per-epoch shuffle): :func:`gm.data.rowstore.shard_positions` with ``window=n``."""
    from gm.data.rowstore import shard_positions

    return shard_positions(n, step, batch_size, rank, world, seed, window=max(1, n))


def _batches(config: dict[str, Any], run: RunSettings, info, rank: int, world: int, trainer):
    """Endless batches for this rank, starting at ``trainer.step``: at the resolution (and batch
    size) of a growing model's current phase, with the lower pyramid levels it asks for (the
    same rows of each level file). The batch of step k is a function of k alone, in memory and
    streamed (:mod:`gm.data.rowstore`); a growing model drops the levels it has left."""
    from gm.data.parquet import level_path
    from gm.data.readers import to_unit_range
    from gm.data.rowstore import RowStore, shard_positions, window_rows
    from gm.train.protocol import Batch

    model = trainer.model
    root = Path(config["dataset_dir"])
    src = model.pair_source()
    if src is not None:
        yield from _paired_batches(root, src, run, rank, world, trainer)
        return
    extra = model.pyramid_levels()
    top = max(int(p.name.split("x")[0]) for p in root.glob("*x*.parquet"))
    window = window_rows(top * top * info.channels)  # one permutation for every level
    stores: dict[int, RowStore] = {}
    reference: list[torch.Tensor] = []

    def level(resolution: int) -> RowStore:
        if resolution not in stores:
            store = RowStore(level_path(root, resolution), ("image",), mode=run.data,
                             window=window)  # fmt: skip
            if reference and not torch.equal(store.labels, reference[0]):
                raise DataError(
                    f"{root}: level {resolution} does not list the same images in the same "
                    "order as the other levels"
                )
            reference[:] = [store.labels]
            stores[resolution] = store
        return stores[resolution]

    while True:
        g = model.growth(trainer.images_seen)
        resolution = g.resolution if g else info.resolution
        batch_size = (g.batch_size if g else None) or run.batch_size
        for r in [r for r in stores if r != resolution and r not in extra]:
            del stores[r]  # a phase that has ended
        data = level(resolution)
        pos = shard_positions(len(data), trainer.step, batch_size, rank, world, run.seed, window)
        ahead = shard_positions(len(data), trainer.step + 1, batch_size, rank, world, run.seed,
                                window)  # fmt: skip
        for store in [data, *(level(r) for r in extra)]:
            store.prefetch(ahead)  # the next step's window, read while this step trains
        images, labels = data.take(pos)
        lower = {r: to_unit_range(level(r).take(pos)[0]["image"]) for r in extra}
        yield Batch(to_unit_range(images["image"]), labels, lower)


def _paired_batches(dataset_dir: Path, src, run: RunSettings, rank: int, world: int, trainer):
    """Endless paired batches: ``images`` the targets, ``inputs`` the sources, aligned rows of
    ``src.file``; or, for unpaired training, independent positions in the two domains of
    ``src.unpaired_file``. Positions follow from the step, as for pyramid levels."""
    from gm.data.readers import to_unit_range
    from gm.data.rowstore import RowStore, shard_positions
    from gm.train.protocol import Batch

    bs, step = run.batch_size, lambda: trainer.step
    if src.unpaired_file:
        path = dataset_dir / src.unpaired_file
        side_a = RowStore(path, ("image",), domain="A", mode=run.data)
        side_b = RowStore(path, ("image",), domain="B", mode=run.data, window=side_a.window)
        while True:
            ia = shard_positions(len(side_a), step(), bs, rank, world, run.seed, side_a.window)
            ib = shard_positions(len(side_b), step(), bs, rank, world, run.seed + 1, side_b.window)
            side_a.prefetch(shard_positions(len(side_a), step() + 1, bs, rank, world, run.seed,
                                            side_a.window))  # fmt: skip
            side_b.prefetch(shard_positions(len(side_b), step() + 1, bs, rank, world,
                                            run.seed + 1, side_b.window))  # fmt: skip
            images_b, labels_b = side_b.take(ib)
            yield Batch(
                to_unit_range(images_b["image"]),
                labels_b,
                inputs=to_unit_range(side_a.take(ia)[0]["image"]),
            )
    data = RowStore(dataset_dir / src.file, (src.inputs, src.targets), mode=run.data)
    while True:
        pos = shard_positions(len(data), step(), bs, rank, world, run.seed, data.window)
        data.prefetch(shard_positions(len(data), step() + 1, bs, rank, world, run.seed,
                                      data.window))  # fmt: skip
        cols, labels = data.take(pos)
        yield Batch(
            to_unit_range(cols[src.targets]), labels, inputs=to_unit_range(cols[src.inputs])
        )


class TrainHost:
    """The loop's host inside a Ray Train worker (DDP rank of a TorchTrainer)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt)

    def wait_reported(self) -> None:
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=60)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function. ``config`` holds plain values only (it crosses processes)."""
    import logging

    from ray.train.v2._internal.execution import context as _train_context

    # Ray Train logs every report at INFO (one long line per checkpoint): keep warnings only.
    logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    run_loop(config, TrainHost())


def run_loop(config: dict[str, Any], host) -> None:
    """The training loop of one rank. ``host`` is where it runs: a Ray Train worker
    (:class:`TrainHost`) or a single-process Ray Tune trial (``gm.tune.TrialHost``); it gives
    ``rank``, ``world``, ``device``, ``checkpoint()``, ``report(metrics, directory)`` and
    ``wait_reported()``.

    Extra keys a Tune trial sets: ``"own_run": True`` keeps the MLflow run given in
    ``tracking`` even when the checkpoint comes from another trial (PBT exploits), and
    ``"optim_from_config": True`` applies the config's optimizer settings (lr, betas, eps,
    weight decay) over a restored checkpoint's (PBT's mutated hyperparameters)."""
    from gm.config import from_dict
    from gm.registry import families
    from gm.train.checkpoint import load_checkpoint, save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo
    from gm.train.samples import sample_grid

    rank, world = host.rank, host.world
    run = from_dict(RunSettings, config["run"], "run")
    fam = families()[config["family"]]
    model_cfg = from_dict(fam.config, config["model"], config["family"])
    info = DataInfo(**config["data_info"])
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    model = fam.build(model_cfg, info)
    device = host.device
    trainer = Trainer(
        model,
        device=device,
        distributed=world > 1,
        amp=run.amp,
        ema_beta=run.ema_beta,
        world_size=world,
        total_steps=run.steps,
        channels_last=run.channels_last,
    )
    tracking = dict(config.get("tracking") or {})
    resumed_from, history, curve = 0, [], []
    checkpoint = host.checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            payload = load_checkpoint(Path(d) / CHECKPOINT_FILE, family=config["family"])
        trainer.load_state_dict(payload["trainer"])  # RNG: rank 0's saved state
        resumed_from = trainer.step
        history = list(payload["extra"].get("history", []))
        curve = list(payload["extra"].get("curve", []))
        if payload["extra"].get("mlflow_run_id") and not config.get("own_run"):
            tracking["run_id"] = payload["extra"]["mlflow_run_id"]
        if config.get("optim_from_config"):
            trainer.apply_optim_config()
    elif run.init_from:
        trainer.warm_start(load_checkpoint(run.init_from, family=config["family"]))
    if checkpoint is None or rank > 0:
        # Per-rank noise streams; rank 0 continues its saved stream exactly, other ranks
        # restart a stream determined by (seed, rank, step).
        torch.manual_seed(run.seed + 1 + rank + 7919 * trainer.step)

    logger = None
    if rank == 0 and tracking.get("run_id"):
        from gm.tracking import MetricBuffer

        logger = MetricBuffer(tracking["uri"], tracking["run_id"])
        logger.log(trainer.step, {"start_step": trainer.step})  # one per (re)start of the run
    progress = config.get("progress") if rank == 0 else None  # the driver's progress key
    kid_probe = paired_probe = None
    source = model.pair_source()
    if rank == 0 and source is not None:  # PSNR/SSIM ... on the test pairs at each checkpoint
        from gm.metrics.paired import PairedProbe

        paired_probe = PairedProbe(config["dataset_dir"], source)
    elif rank == 0 and config.get("classifier") and run.kid_samples:
        from gm.metrics.evaluate import KidProbe

        kid_probe = KidProbe(config["classifier"], config["dataset_dir"], info, n=run.kid_samples,
                             seed=run.seed)  # fmt: skip

    def preview():
        if paired_probe is not None:
            return paired_probe.grid(trainer)
        return sample_grid(trainer, info.num_classes, seed=run.seed)

    last_progress = 0.0

    # tests: {"step": k, "marker": path[, "action": "pause"]}: SIGKILL (or pause) at step k
    fault = config.get("fault_injection")
    sums: dict[str, float] = defaultdict(float)  # since the last checkpoint
    counts: dict[str, int] = defaultdict(int)
    curve_sums: dict[str, float] = defaultdict(float)  # since the last history.csv row
    curve_counts: dict[str, int] = defaultdict(int)
    batches = _batches(config, run, info, rank, world, trainer)
    tick = time.perf_counter()
    while trainer.step < run.steps:
        batch = next(batches)
        if run.mirror:
            batch = mirror(batch, run.seed, trainer.step, rank)
        if run.rot90:
            batch = rot90(batch, run.seed, trainer.step, rank)
        grow = trainer.model.growth(trainer.images_seen)  # the phase this step trains in
        metrics = trainer.train_step(batch)
        now = time.perf_counter()
        metrics["step_s"] = now - tick  # data + all phases (checkpoints: checkpoint_s)
        metrics["images_per_s"] = batch.images.shape[0] * world / max(now - tick, 1e-9)
        if grow is not None:
            metrics |= {"resolution": grow.resolution, "alpha": grow.alpha, "phase": grow.index}
            ended = trainer.model.growth(trainer.images_seen).index != grow.index
            if logger and (ended or trainer.step == run.steps):
                # a grid per phase, from the same latents: one sample growing
                stage = "fade" if grow.alpha < 1 else "stable"
                grid = preview()
                key = f"phase{grow.index:02d}_{grow.resolution}px_{stage}"
                logger.log_image(grid, key=key, step=trainer.step)
                now = time.perf_counter()  # the grid is not the next step's time
        tick = now
        for name, opt in trainer.optimizers.items():
            metrics[f"lr/{name}"] = opt.param_groups[0]["lr"]
        for k, v in metrics.items():
            sums[k] += v
            counts[k] += 1
            if rank == 0:  # rank 0 writes history.csv
                curve_sums[k] += v
                curve_counts[k] += 1
        at_checkpoint = trainer.step % run.checkpoint_every == 0 or trainer.step == run.steps
        if rank == 0 and (trainer.step % run.curve_every == 0 or at_checkpoint):
            curve.append({"step": trainer.step,
                          **{k: curve_sums[k] / curve_counts[k] for k in curve_sums}})  # fmt: skip
            curve_sums.clear()
            curve_counts.clear()
        if logger:
            logger.log(trainer.step, metrics)
        if progress is not None and (now - last_progress > 0.5 or trainer.step == run.steps):
            _post_progress(progress, trainer.step, metrics)
            last_progress = now
        if fault and fault.get("action") == "pause" and rank == 0 and trainer.step == fault["step"]:
            # tests: hold here until the test says go (it stops a server meanwhile)
            marker = Path(fault["marker"])
            marker.write_text("paused")
            while marker.read_text() != "go":
                time.sleep(0.05)
        elif fault and rank == world - 1 and trainer.step == fault["step"]:
            marker = Path(fault["marker"])
            if not marker.exists():
                # Wait until Ray Train has registered every report so far, so the test knows
                # which checkpoint the restart must find; then die without cleanup.
                host.wait_reported()
                marker.write_text("killed once")
                os.kill(os.getpid(), 9)
        if at_checkpoint:
            report_start = time.perf_counter()
            means = {k: sums[k] / counts[k] for k in sums}
            sums.clear()
            counts.clear()
            if rank == 0:
                if kid_probe is not None:  # in-training KID, at every checkpoint
                    t = time.perf_counter()
                    means["kid"] = kid_probe(trainer)
                    means["kid_s"] = time.perf_counter() - t
                    curve[-1] |= {"kid": means["kid"]}
                    if logger:
                        logger.log(trainer.step, {"kid": means["kid"], "kid_s": means["kid_s"]})
                if paired_probe is not None:  # test-pair metrics beside their baseline
                    t = time.perf_counter()
                    found = paired_probe(trainer)
                    found["eval_s"] = time.perf_counter() - t
                    means |= found
                    curve[-1] |= {k: v for k, v in found.items() if k != "eval_s"}
                    if logger:
                        logger.log(trainer.step, found)
                history.append({"step": trainer.step, **means})
            report = {
                "step": trainer.step,
                "images_seen": trainer.images_seen,
                "resumed_from": resumed_from,
                **means,  # rank 0: with the checkpoint's KID / test-pair metrics
            }
            if rank == 0:
                if logger:
                    logger.log_image(preview(), key="samples", step=trainer.step)
                    last = trainer.step == run.steps
                    # The server away: training goes on and the metrics stay buffered; the
                    # last flush waits for it (and fails before the last report if it must).
                    wait_s = float(tracking.get("wait_s", 600)) if last else 0.0
                    logger.flush(wait_s=wait_s)
                    if last and logger.offline_s:  # how long the store was away, in all
                        logger.log(trainer.step, {"mlflow_offline_s": logger.offline_s})
                        logger.flush(wait_s=wait_s)
                with tempfile.TemporaryDirectory() as d:
                    save_checkpoint(
                        Path(d) / CHECKPOINT_FILE,
                        config["family"],
                        model_cfg,
                        info,
                        trainer.state_dict(),
                        extra={
                            "resumed_from": resumed_from,
                            "mlflow_run_id": tracking.get("run_id", ""),
                            "images_seen_total": trainer.images_seen,
                            "history": history,  # a row per checkpoint (metrics.json)
                            "curve": curve,  # a row per log_every steps (history.csv)
                        },
                    )
                    host.report(report, d)
            else:
                host.report(report, None)
            tick = time.perf_counter()
            if logger:  # flushed with the next interval's metrics
                logger.log(trainer.step, {"checkpoint_s": tick - report_start})


# Rank 0 posts (step, metrics) under a key of Ray's key-value store (in the GCS, reachable from
# every node) and the driver draws the progress bar from it, so one bar shows on the terminal
# that launched the run, wherever rank 0 runs. (It was a zero-CPU actor: one more process
# to start per training, about 5 CPU-seconds on 2 cores.) ray.experimental.internal_kv is
# the store Ray's own libraries keep such state in.
PROGRESS_NAMESPACE = "gm-progress"


def _post_progress(key: str, step: int, metrics: dict[str, float]) -> None:
    import json

    from ray.experimental.internal_kv import _internal_kv_put

    value = json.dumps([step, {k: float(v) for k, v in metrics.items()}])
    _internal_kv_put(key, value, overwrite=True, namespace=PROGRESS_NAMESPACE)


def _read_progress(key: str) -> tuple[int, dict[str, float]] | None:
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(key, namespace=PROGRESS_NAMESPACE)
    return None if value is None else tuple(json.loads(value))


def _show_progress(key: str, total: int, desc: str, stop) -> None:
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True) as bar:
        while True:
            last = stop.wait(1.0)
            try:
                step, metrics = _read_progress(key) or (bar.n, {})
            except Exception:  # a slow or restarting cluster: try again
                step, metrics = bar.n, {}
            bar.update(step - bar.n)
            shown = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("loss/")}
            if "images_per_s" in metrics:
                shown["img/s"] = metrics["images_per_s"]
            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            if last:
                return


@contextlib.contextmanager
def interrupt_as_keyboard_interrupt():
    """Ctrl-C during ``TorchTrainer.fit`` ends in KeyboardInterrupt (gm exits 130).

    Ray Train installs its own SIGINT handler inside ``fit`` (it aborts the run gracefully,
    then surfaces as an actor error or ``sys.exit(0)``, and the process exited 1). Any SIGINT
    handler installed meanwhile is chained with a flag; when it was set, whatever ``fit``
    returned or raised becomes KeyboardInterrupt. Python's own handler is restored after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # Ray installs no handler there either (a Tune trial's thread)
        return
    interrupted = threading.Event()
    install = signal.signal

    def chained(signum, handler):
        if signum != signal.SIGINT or not callable(handler):
            return install(signum, handler)

        def flagged(sig, frame):
            interrupted.set()
            handler(sig, frame)

        return install(signum, flagged)

    before = signal.getsignal(signal.SIGINT)
    signal.signal = chained
    try:
        yield
    except (Exception, SystemExit):
        if interrupted.is_set():
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal = install
        install(signal.SIGINT, before)
    if interrupted.is_set():
        raise KeyboardInterrupt


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's
# default: 2 s) and waits out the interval at each step of a run's life (workers starting, each
# state change, the end). gm polls 4 times a second unless the variable is set: a 6-step toy
# training stage took 31 s instead of 41 s on 2 cores (measured twice). A poll is one small
# remote call per worker; a worker is still declared failed only after Ray's health-check
# timeout (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S), not after a slow poll.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.25"
# Ray Train starts a PreemptionWatcher actor per worker group, which polls the cluster for
# nodes being drained (spot instances, autoscaler scale-down). A local Ray (gm's own, or `gm
# with-ray`'s) has one node that nobody drains: there the actor is only a process to start,
# about 4 CPU-seconds per training. On a cluster (RAY_ADDRESS of the user's) it stays on.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def ray_train_env() -> None:
    """Set gm's defaults for Ray Train's environment variables in this (driver) process,
    where the user has not set them; Ray Train passes them on to its controller and workers."""
    from gm.cluster import on_cluster

    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S)
    if not on_cluster():
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def fit(
    family: str,
    model_config: dict[str, Any],
    run: RunSettings,
    dataset_dir: str | os.PathLike,
    data_info: dict[str, int],
    storage_path: str | os.PathLike,
    name: str,
    fault_injection: dict | None = None,
    tracking: dict[str, str] | None = None,
    progress: bool = False,
    classifier: str | os.PathLike | None = None,
):
    """Run (or continue) a training under Ray Train; returns the Ray ``Result``.

    ``name`` and ``storage_path`` identify the run: launching again with the same pair continues
    from its latest checkpoint. Paths are made absolute here (workers chdir elsewhere).
    ``tracking`` is ``{"uri": ..., "run_id": ...}`` of the MLflow run rank 0 logs into.
    ``classifier``: a domain classifier; rank 0 then logs KID at every checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from gm.config import to_dict

    config = {
        "family": family,
        "name": name,
        "model": model_config,
        "run": to_dict(run),
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "data_info": dict(data_info),
        "fault_injection": fault_injection,
        "tracking": tracking,
        "progress": None,
        "classifier": str(Path(classifier).resolve()) if classifier else None,
    }
    ray_train_env()
    key = None
    if progress:
        import uuid

        key = config["progress"] = f"{name}/{uuid.uuid4().hex}"

    trainer = _torch_trainer()(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    if key is None:
        with interrupt_as_keyboard_interrupt():
            return trainer.fit()
    import threading

    from ray.experimental.internal_kv import _internal_kv_del

    stop = threading.Event()
    thread = threading.Thread(target=_show_progress, args=(key, run.steps, name, stop), daemon=True)
    thread.start()
    try:
        with interrupt_as_keyboard_interrupt():
            return trainer.fit()
    finally:
        stop.set()
        thread.join(timeout=15)
        _internal_kv_del(key, namespace=PROGRESS_NAMESPACE)


def _torch_trainer():
    """Ray Train's TorchTrainer without its DatasetsCallback when no Ray Dataset is passed:
    gm's workers read their batches themselves (gm.data.rowstore), and the callback would start
    a DatasetManager actor per training all the same, one more process (about 4 CPU-seconds on
    2 cores) that serves no dataset. With ``datasets`` it is kept."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer
