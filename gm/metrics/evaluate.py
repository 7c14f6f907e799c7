"""Evaluate a trained model against its dataset's test split (the DVC `evaluate` stage).

Real images come from the pyramid level the model was trained at; real and generated images
are resized the same way to the domain classifier's resolution when they differ (bilinear,
antialiased), and the extractor, its weights' hash and the resize mode are reported with the
numbers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gm.config import check
from gm.metrics.classifier import ClassifierConfig
from gm.metrics.quality import METRICS, EvalSets, get, unavailable

DEFAULT_METRICS = tuple(METRICS)


@dataclass(frozen=True)
class EvalConfig:
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    max_resolution: int = 32  # classifiers (and metrics) at min(top resolution, this)
    num_samples: int = 1000  # generated samples (and train images of the baseline)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    seed: int = 0
    # torchvision inception_v3 state dict on this machine: Inception features for FID, KID,
    # precision/recall and the Inception Score ('' = the domain classifier's features)
    inception_weights: str = ""
    # The evaluate stage registers each model's generator in the MLflow model registry
    # (gm-<job>) and moves the `champion` alias to the version with the best value of this
    # metric (lower wins for fid, kid, bits_per_dim; higher for the others); '' = no registry.
    champion_metric: str = "fid"
    # FID, KID, precision/recall and IS need this many images in every set (real test, real
    # train subset, generated), else they are reported unavailable (gm.metrics.quality)
    min_images: int = 50
    # bootstrap resamples for 95 % intervals of FID, precision and recall (conditional
    # accuracy: Wilson; KID: its subsets' spread); the summary ranks and the champion alias
    # moves only where intervals separate. 0: no intervals
    bootstrap: int = 200
    # bits/dim on at most this many test images (a seeded subset; 0: the whole split): the
    # score SDE's exact likelihood integrates an ODE per image, ~0.25 s each on 2 cores
    likelihood_images: int = 0

    def __post_init__(self):
        r = self.max_resolution
        check(r >= 4 and r & (r - 1) == 0, "max_resolution", f"{r} is not a power of two >= 4")
        check(self.num_samples >= 10, "num_samples", "must be >= 10")
        check(self.min_images >= 2, "min_images", "must be >= 2 (k-NN and covariances need 2)")
        check(self.bootstrap == 0 or self.bootstrap >= 20, "bootstrap", "must be 0 or >= 20")
        check(self.likelihood_images >= 0, "likelihood_images", "must be >= 0 (0: all)")
        for name in self.metrics:
            get(name)  # an unknown name lists the known ones
        known = ("fid", "kid", "bits_per_dim", "precision", "recall", "conditional_accuracy",
                 "inception_score")  # fmt: skip
        check(
            self.champion_metric in ("", *known),
            "champion_metric",
            f"{self.champion_metric!r} is not one of {', '.join(known)} (or '' for none)",
        )


@torch.no_grad()
def embed(clf, images: torch.Tensor, size: int | None, batch: int = 500):
    """(features (N, F), logits (N, K)) of ``images`` (N, C, H, W) in [-1, 1] through a
    feature network (the domain classifier, or Inception), ``batch`` images at a time.

    ``size``: the side the images are resized to first (:func:`gm.metrics.classifier.present`);
    None when the network resizes itself."""
    from gm.metrics.classifier import present

    feats, logits = [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].float()
        x = x if size is None else present(x, size)
        f = clf.features(x)
        feats.append(f)
        logits.append(clf.head(f))
    return torch.cat(feats), torch.cat(logits)


def ood_energies(model, test, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An energy-based model's energies (marginal over classes) of the test split and of two
    out-of-distribution sets of the same size: uniform noise, and the test images with their
    pixels shuffled (the same histogram, no structure). Read 500 rows at a time."""
    from gm.data.readers import to_unit_range

    g = torch.Generator().manual_seed(seed)
    inside, noise, shuffled = [], [], []
    model.eval()
    with torch.no_grad():
        for pixels, _ in test.batches(None, 500):
            x = to_unit_range(pixels)
            inside.append(model.energy(x))
            noise.append(model.energy(torch.rand(x.shape, generator=g) * 2 - 1))
            flat = x.flatten(1)
            perm = torch.argsort(torch.rand(flat.shape, generator=g), dim=1)
            shuffled.append(model.energy(flat.gather(1, perm).reshape(x.shape)))
    inside_e = torch.cat(inside)
    return {"noise": (inside_e, torch.cat(noise)), "shuffled": (inside_e, torch.cat(shuffled))}


def embed_rows(clf, store, positions, size: int | None, batch: int = 500):
    """:func:`embed` of a RowStore's rows ``positions`` (all: None), read ``batch`` at a time:
    memory holds the features, never the images."""
    from gm.data.readers import to_unit_range

    feats, logits = [], []
    for pixels, _ in store.batches(positions, batch):
        f, lg = embed(clf, to_unit_range(pixels), size, batch)
        feats.append(f)
        logits.append(lg)
    return torch.cat(feats), torch.cat(logits)


def split_store(dataset_dir, resolution: int, split: str | None):
    """A pyramid dataset's level ``resolution`` as a RowStore of its ``image`` column, rows of
    ``split`` (train, val, test; None: every row), read in batches (:class:`RowStore`).

    Raises:
        DataError: naming the file, when the level or the split is missing.
    """
    from gm.data.parquet import level_path
    from gm.data.rowstore import RowStore

    return RowStore(level_path(dataset_dir, resolution), ("image",), split=split, mode="auto")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    classifier: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    cfg: EvalConfig,
    samples_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The model's metrics (``cfg.metrics``) beside their real baselines, with the extractor
    and resize used. ``samples_path``: also write the generated images there (8-bit Parquet,
    :func:`gm.detect.write_samples`), for the detect stage."""
    from gm.data.readers import to_unit_range
    from gm.metrics.classifier import load_classifier
    from gm.train.checkpoint import load_checkpoint, trainer_from_checkpoint
    from gm.train.protocol import Batch

    payload = load_checkpoint(checkpoint)
    trainer, info = trainer_from_checkpoint(payload)
    model = trainer.model
    if model.pair_source() is not None:
        from gm.errors import DataError

        raise DataError(
            f"{checkpoint}: a {payload['family']} model translates images; it is scored on its "
            "test pairs during training (metrics.json, gm.metrics.paired), not by sampling"
        )
    clf, extractor = load_classifier(classifier)
    size = extractor["resolution"]
    if extractor["channels"] != info.channels or extractor["num_classes"] != info.num_classes:
        from gm.errors import DataError

        raise DataError(
            f"{classifier}: classifier of {extractor['channels']} channel(s) and "
            f"{extractor['num_classes']} classes, model has {info.channels} and {info.num_classes}"
        )

    resize = "none" if size == info.resolution else f"bilinear-antialias {info.resolution}->{size}"
    # how the domain classifier sees this model's images: at its own resolution, at a lower
    # level it learned (evaluate.classifier.levels), or upsampled from a level it never saw
    learned = extractor.get("test_accuracy_by_level") or {str(size): None}
    presentation = (
        f"{info.resolution}x{info.resolution}: the classifier's resolution"
        if size == info.resolution
        else f"{info.resolution}x{info.resolution} resized to {size}x{size}, "
        + ("a level the classifier learned" if str(info.resolution) in learned
           else "a level the classifier never saw (add it to evaluate.classifier.levels)")
    )  # fmt: skip
    net, net_size = clf, size  # the feature network of FID, KID, precision/recall and IS
    if cfg.inception_weights:  # loaded (and checked) before any sampling
        from gm.metrics.inception import load_inception

        net, extractor = load_inception(cfg.inception_weights)
        net_size, resize = None, extractor.pop("resize")

    # real images are read in batches and only their features kept (memory: features)
    test = split_store(dataset_dir, info.resolution, "test")
    train = split_store(dataset_dir, info.resolution, "train")
    n = min(cfg.num_samples, len(train))
    g = torch.Generator().manual_seed(cfg.seed)
    # sorted: each read batch then falls in one or two windows of a streamed split
    pick = torch.randperm(len(train), generator=g)[:n].sort().values

    labels = torch.arange(n) % info.num_classes if model.conditional else None
    fakes = []
    for i, start in enumerate(range(0, n, 250)):
        lab = labels[start : start + 250] if labels is not None else None
        count = min(250, n - start)
        fakes.append(trainer.sample(count, lab, seed=cfg.seed * 100_003 + i))
    fake_x = torch.cat(fakes)
    if samples_path is not None:
        from gm.detect import write_samples

        meta = {"family": payload["family"], "step": payload["trainer"]["step"],
                "mlflow_run_id": payload["extra"].get("mlflow_run_id", ""),
                "seed": cfg.seed}  # fmt: skip
        write_samples(samples_path, fake_x, labels, meta)
    _, label_logits = embed(clf, fake_x, size)  # conditional accuracy: the domain classifier
    real_f, real_logits = embed_rows(net, test, None, net_size, batch=100)
    real_label_logits = None
    if model.conditional and "conditional_accuracy" in cfg.metrics:  # its real baseline
        real_label_logits = real_logits if net is clf else embed_rows(clf, test, None, size)[1]
    base_f, base_logits = embed_rows(net, train, pick, net_size, batch=100)
    fake_f, fake_logits = embed(net, fake_x, net_size, batch=100)

    bpd, bpd_images = None, 0
    if "bits_per_dim" in cfg.metrics:
        model.eval()
        torch.manual_seed(cfg.seed)
        values = []
        rows = None  # the whole split, or a seeded subset in file order
        if 0 < cfg.likelihood_images < len(test):
            gl = torch.Generator().manual_seed(cfg.seed)
            rows = torch.randperm(len(test), generator=gl)[: cfg.likelihood_images].sort().values
        with torch.no_grad():
            for pixels, lab in test.batches(rows, 500):
                v = model.bits_per_dim(Batch(to_unit_range(pixels), lab))
                if v is None:
                    break
                values.append(v)
        bpd = float(torch.cat(values).mean()) if values else None
        bpd_images = len(test) if rows is None else len(rows)

    ood = None
    if "ood_auc" in cfg.metrics and hasattr(model, "energy"):
        ood = ood_energies(model, test, cfg.seed)
    sets = EvalSets(
        real_f,
        base_f,
        fake_f,
        fake_logits,
        labels,
        base_logits,
        bpd,
        label_logits=label_logits,
        real_label_logits=real_label_logits,
        real_labels=test.labels if real_label_logits is not None else None,
        ood_energies=ood,
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
    )
    counts = {"real test": len(test), "real train": n, "generated": len(fake_x)}
    missing = unavailable(cfg.metrics, counts, Path(dataset_dir).name, cfg.min_images)
    results: dict[str, Any] = {}
    for name in cfg.metrics:
        if name not in missing:
            results |= get(name)(sets)
    if "bits_per_dim" in results:
        results["bits_per_dim_images"] = bpd_images  # the test images it averages
    if missing:  # only then: the default pipeline's metrics files keep their keys
        results["unavailable"] = missing
    results |= {
        "num_samples": n,
        "num_real": len(test),
        "step": payload["trainer"]["step"],
        "family": payload["family"],
        "mlflow_run_id": payload["extra"].get("mlflow_run_id", ""),
        "extractor": {**extractor, "resize": resize},
        "conditional_presentation": presentation,
    }
    return results


def unavailable_warning(results: dict[str, Any]) -> str | None:
    """The warning ``evaluate`` prints when metrics were withheld for too few images: the
    dataset, the metrics and the counts; None when every metric was computed."""
    missing = results.get("unavailable") or {}
    if not missing:
        return None
    reason = next(iter(missing.values()))
    return (f"warning: {results.get('dataset', '?')}: {', '.join(missing)} not computed "
            f"({reason}); no champion alias moves on them")  # fmt: skip


def log_to_mlflow(root, results: dict[str, Any]) -> None:
    """Evaluation metrics (``eval/<name>``) and extractor tags on the model's training run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from gm.tracking import check_store, tracking_uri

    run_id = results.get("mlflow_run_id")
    if not run_id:
        return
    uri = tracking_uri(root)
    check_store(uri)
    client = MlflowClient(uri)
    step = int(results["step"])
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"eval/{k}", float(v), now, step)
        for k, v in results.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
    ]
    ex = results["extractor"]
    tags = [
        RunTag("eval.extractor", ex["kind"]),
        RunTag("eval.extractor_sha256", ex["sha256"]),
        RunTag("eval.resize", ex["resize"]),
        *([RunTag("eval.conditional_presentation", results["conditional_presentation"])]
          if "conditional_presentation" in results else []),
        *(RunTag(f"eval.{k}", f"unavailable: {why}")
          for k, why in (results.get("unavailable") or {}).items()),
    ]  # fmt: skip
    client.log_batch(run_id, metrics=metrics, tags=tags)


class KidProbe:
    """A cheap in-training metric: KID of ``n`` seeded samples against ``n`` fixed validation
    images in the domain classifier's feature space (real features computed once). A
    validation split of fewer than 8 images (toy datasets) is replaced by the whole dataset."""

    def __init__(self, classifier, dataset_dir, info, n: int = 256, seed: int = 0):
        from gm.errors import DataError
        from gm.metrics.classifier import load_classifier

        self.clf, desc = load_classifier(classifier)
        self.size, self.seed = desc["resolution"], seed
        try:
            real = split_store(dataset_dir, info.resolution, "val")
        except DataError:  # no validation image at all
            real = None
        if real is None or len(real) < 8:
            real = split_store(dataset_dir, info.resolution, None)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(real), generator=g)[: min(n, len(real))].sort().values
        self.real, _ = embed_rows(self.clf, real, idx, self.size)
        self.n, self.num_classes = len(idx), info.num_classes

    def __call__(self, trainer) -> float:
        from gm.metrics.quality import kid

        labels = None
        if trainer.model.conditional:
            labels = torch.arange(self.n) % self.num_classes
        fake = trainer.sample(self.n, labels, seed=self.seed + 1)
        feats, _ = embed(self.clf, fake, self.size)
        return kid(self.real, feats, subsets=20, seed=self.seed)[0]


def resolve_model(ref: str, root: str | os.PathLike, dest: str | os.PathLike):
    """``gm evaluate``'s MODEL → (checkpoint path, its MLflow run or None). ``ref`` is a
    checkpoint file; a run id (or a unique prefix of one); ``runs:/<run id>/…``; or a
    registered model ``models:/<name>/<version>`` or ``models:/<name>@<alias>``. A run's
    checkpoint is the ``final/checkpoint.pt`` artifact every training logs, downloaded into
    ``dest``. Raises GmError naming ``ref`` when it is none of these."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from gm.audit import _get_run
    from gm.errors import DataError, GmError
    from gm.tracking import check_store, tracking_uri

    path = Path(ref)
    if path.is_file():
        return path, None
    if path.suffix == ".pt" or "/" in ref and not ref.startswith(("runs:/", "models:/")):
        raise DataError(f"{ref}: no such checkpoint file")
    uri = tracking_uri(root)
    check_store(uri)
    client = MlflowClient(uri)
    try:
        if ref.startswith("models:/"):
            name = ref.removeprefix("models:/")
            if "@" in name:
                model, alias = name.split("@", 1)
                version = client.get_model_version_by_alias(model, alias)
            else:
                model, _, number = name.partition("/")
                version = client.get_model_version(model, number)
            run_id = version.run_id
        else:
            run_id = ref.removeprefix("runs:/").split("/")[0]
    except MlflowException as e:
        raise GmError(f"{ref}: not found in {uri} ({e.message})") from None
    run = _get_run(client, run_id)
    try:
        local = client.download_artifacts(run.info.run_id, "final/checkpoint.pt", str(dest))
    except (MlflowException, OSError) as e:
        raise GmError(f"{ref}: run {run.info.run_id} has no final/checkpoint.pt ({e})") from None
    return Path(local), run


def render_results(results: dict[str, Any]) -> str:
    """The metrics of :func:`evaluate_checkpoint` as a table, each beside its real baseline."""
    rows = [("metric", "model", "real data")]
    for k, v in results.items():
        if isinstance(v, float) and not k.endswith("_baseline"):
            base = results.get(f"{k}_baseline")
            rows.append((k, f"{v:.4g}", f"{base:.4g}" if isinstance(base, float) else "-"))
    for k in results.get("unavailable") or {}:
        rows.append((k, "unavailable", "-"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip() for r in rows]
    ex = results["extractor"]
    lines.append(f"({results['num_samples']} samples, {results['num_real']} real test images; "
                 f"features: {ex['kind']}, resize {ex['resize']})")  # fmt: skip
    lines += [f"{k} unavailable: {why}" for k, why in (results.get("unavailable") or {}).items()]
    return "\n".join(lines)
