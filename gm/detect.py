"""Detecting generated images: a real-vs-generated classifier per dataset (the ``detect`` stage).

gm knows exactly which images are real and which each of its models drew, so it measures how
detectable every model's images are. The detector is a small CNN (the domain classifier's
architecture, :class:`gm.metrics.classifier.DomainClassifier`, with one logit: "generated")
trained on the dataset's real train images against the samples every model of that dataset
drew in its evaluation (``samples/<dataset>/<job>.parquet``, written by the evaluate stage,
quantized to 8 bits as any image file is, so the detector cannot tell them apart by their
unquantized values). A sample file's rows are split by a fixed permutation: 6 in 10 train the
detector, 2 in 10 calibrate its threshold, 2 in 10 are held out.

Each model is scored on its held-out samples against the real test split at the model's own
resolution (a 16x16 model against the real images' 16x16 level, both shown to the detector the
same way, :func:`gm.metrics.classifier.present`), with:

- ROC-AUC and average precision (the positive class is "generated"; AP depends on the two
  sets' sizes, reported with them);
- accuracy at the threshold calibrated on validation data (the one threshold, over every
  model's validation samples, that maximizes balanced accuracy): balanced, so it is the
  two-sample classifier test statistic of Lopez-Paz & Oquab (ICLR 2017), 0.5 meaning the
  detector cannot tell the model's images from real ones;
- the same after JPEG compression (quality 75 by default) and after a 0.5x resize (bilinear,
  antialiased, requantized), applied to real and generated test images alike: the
  perturbations images meet when shared (Wang et al., CVPR 2020, "CNN-generated images are
  surprisingly easy to spot... for now", train on one generator and test on others under
  them);
- leave-one-family-out: a detector trained without any sample of the model's family, scored
  on that family's held-out samples: does detection generalize to an unseen generator?

AUC and accuracy carry 95 % bootstrap intervals over the held-out images (the spread of
retraining the detector is not in them).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gm.config import check
from gm.errors import DataError

KIND = "gm-detector"
# sample rows, by their place in a fixed permutation modulo 10: below TRAIN_TENTHS train, then
# VAL_TENTHS val, the rest test
TRAIN_TENTHS, VAL_TENTHS = 6, 2


@dataclass(frozen=True)
class DetectConfig:
    dataset: str = ""  # a key of datasets: its real images and its models' samples
    width: int = 8  # the CNN's first conv width (doubled per downsampling)
    features: int = 64
    steps: int = 100
    batch_size: int = 32  # real and generated images each, per step
    lr: float = 2e-3
    weight_decay: float = 1e-4
    jpeg_quality: int = 75  # the JPEG perturbation (Pillow/libjpeg quality)
    resize: float = 0.5  # the resize perturbation: this factor, then shown at full size again
    leave_one_out: bool = True  # a detector per family trained without it
    bootstrap: int = 200  # resamples for the 95 % intervals of AUC and accuracy (0: none)
    # a model with fewer held-out samples (or a dataset with fewer real test images) than
    # this is reported unavailable, not as a number
    min_images: int = 20
    seed: int = 0

    def __post_init__(self):
        for name in ("width", "features", "steps", "batch_size"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(1 <= self.jpeg_quality <= 95, "jpeg_quality", f"{self.jpeg_quality} not in [1, 95]")
        check(0 < self.resize < 1, "resize", f"{self.resize} not in (0, 1)")
        check(self.bootstrap == 0 or self.bootstrap >= 20, "bootstrap", "must be 0 or >= 20")
        check(self.min_images >= 2, "min_images", "must be >= 2")


# ---------------------------------------------------------------------------------------------
# sample files (written by the evaluate stage)


def sample_splits(n: int) -> np.ndarray:
    """The split of each of ``n`` sample rows: a fixed permutation of the positions taken
    modulo 10 (:data:`TRAIN_TENTHS` train, :data:`VAL_TENTHS` val, the rest test), so that 6, 2 and
    2 in 10 rows go to each and the classes asked for in turn (``i % num_classes``) mix."""
    pos = np.random.default_rng(0).permutation(n) % 10
    val = TRAIN_TENTHS + VAL_TENTHS
    return np.where(pos < TRAIN_TENTHS, "train", np.where(pos < val, "val", "test"))


def write_samples(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor | None,
                  meta: dict[str, Any]) -> None:  # fmt: skip
    """Write generated ``images`` (N, C, H, W) in [-1, 1] as a gm Parquet file (atomically):
    8-bit (H, W, C) ``image`` column, ``label`` (the class asked for; -1 unconditional) and
    ``split`` (:func:`sample_splits`). ``meta``
    (job, family, resolution, step, mlflow_run_id ...) goes into the file's gm metadata."""
    import pyarrow as pa

    from gm.data.parquet import image_array, image_field, write_table

    u8 = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    hwc = u8.permute(0, 2, 3, 1).contiguous().numpy()
    n = len(hwc)
    split = sample_splits(n)
    lab = labels.numpy().astype(np.int64) if labels is not None else np.full(n, -1, np.int64)
    field = image_field("image", hwc.shape[1:], np.uint8)
    schema = pa.schema([field, pa.field("label", pa.int64()), pa.field("split", pa.string())])
    table = pa.table([image_array(hwc), pa.array(lab), pa.array(split)], schema=schema)
    write_table(path, table, {"kind": "gm-samples", **meta})


@dataclass
class SampleSet:
    """One model's samples: their file's metadata and a RowStore per split."""

    path: Path
    meta: dict[str, Any]
    splits: dict[str, Any]  # split → gm.data.rowstore.RowStore

    @property
    def resolution(self) -> int:
        return int(self.splits["train"].shape("image")[0])


def open_samples(path: str | os.PathLike) -> SampleSet:
    """A sample file written by :func:`write_samples`; DataError naming it otherwise."""
    from gm.data.parquet import read_metadata
    from gm.data.rowstore import RowStore

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such sample file (run the model's evaluate stage first)")
    try:
        meta = read_metadata(path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if meta.get("kind") != "gm-samples":
        raise DataError(f"{path}: not a gm sample file (written by the evaluate stage)")
    splits = {s: RowStore(path, ("image",), split=s, mode="auto") for s in ("train", "val", "test")}
    return SampleSet(path, meta, splits)


# ---------------------------------------------------------------------------------------------
# perturbations, on 8-bit (B, H, W, C) tensors: what an image meets when it is shared


def jpeg(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image through a JPEG file of ``quality`` (torchvision's libjpeg), decoded again."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    chw = [p.permute(2, 0, 1).contiguous() for p in pixels]
    data = encode_jpeg(chw, quality=quality)
    out = decode_jpeg(data, mode=ImageReadMode.UNCHANGED)
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()


def downscale(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """Resized by ``factor`` (bilinear, antialiased) and requantized to 8 bits."""
    side = max(1, round(pixels.shape[1] * factor))
    x = pixels.permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def perturbations(cfg: DetectConfig) -> dict[str, Any]:
    """Condition name → perturbation (None: the images as they are)."""
    return {
        "clean": None,
        f"jpeg{cfg.jpeg_quality}": lambda p: jpeg(p, cfg.jpeg_quality),
        f"resize{cfg.resize:g}": lambda p: downscale(p, cfg.resize),
    }


# ---------------------------------------------------------------------------------------------
# the detector


def _network(cfg: DetectConfig, resolution: int, channels: int):
    from gm.metrics.classifier import ClassifierConfig, DomainClassifier

    arch = ClassifierConfig(width=cfg.width, features=cfg.features)
    return DomainClassifier(arch, resolution, channels, 1)


def _show(pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """8-bit (B, h, w, C) → (B, C, R, R) in [-1, 1] as the detector sees them."""
    from gm.data.readers import to_unit_range
    from gm.metrics.classifier import present

    return present(to_unit_range(pixels), resolution)


def train_detector(
    real: dict[int, Any],
    fakes: list[SampleSet],
    resolution: int,
    cfg: DetectConfig,
    progress: bool = True,
    desc: str = "detector",
):
    """Train on ``real`` (resolution → RowStore of the real train split) against the train
    rows of ``fakes``. Each step draws ``batch_size`` generated images (model uniformly, then
    a row) and as many real ones, each real image at the resolution of the generated image it
    is paired with, all shown at ``resolution``. Returns the network in eval mode."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    channels = fakes[0].splits["train"].shape("image")[-1]
    net = _network(cfg, resolution, channels)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    b = cfg.batch_size
    y = torch.cat([torch.zeros(b), torch.ones(b)])
    net.train()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)  # fmt: skip
    for _ in bar:
        which = torch.randint(len(fakes), (b,), generator=g)
        xs_real, xs_fake = [], []
        for k in which.unique().tolist():
            m = int((which == k).sum())
            store = fakes[k].splits["train"]
            cols, _ = store.take(torch.randint(len(store), (m,), generator=g))
            xs_fake.append(_show(cols["image"], resolution))
            rstore = real[fakes[k].resolution]
            cols, _ = rstore.take(torch.randint(len(rstore), (m,), generator=g))
            xs_real.append(_show(cols["image"], resolution))
        x = torch.cat(xs_real + xs_fake)
        loss = F.binary_cross_entropy_with_logits(net(x).squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


@torch.no_grad()
def scores(net, batches, resolution: int, perturb=None) -> torch.Tensor:
    """P(generated) of every image of ``batches`` (an iterable of 8-bit (B, H, W, C)
    tensors), after ``perturb`` when given."""
    out = []
    for pixels in batches:
        if perturb is not None:
            pixels = perturb(pixels)
        out.append(torch.sigmoid(net(_show(pixels, resolution)).squeeze(1)))
    return torch.cat(out) if out else torch.empty(0)


def _store_scores(net, store, resolution: int, perturb=None) -> torch.Tensor:
    return scores(net, (p for p, _ in store.batches(None, 500)), resolution, perturb)


def calibrate(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The threshold t (P(generated) >= t: generated) maximizing balanced accuracy between
    ``real`` and ``fake`` scores; the midpoint between neighbouring scores."""
    s = torch.cat([real, fake]).unique()  # sorted
    cand = torch.cat([s[:1] - 1e-6, (s[1:] + s[:-1]) / 2, s[-1:] + 1e-6])
    r, f = real.sort().values, fake.sort().values
    tnr = torch.searchsorted(r, cand, side="left").double() / len(r)
    tpr = 1 - torch.searchsorted(f, cand, side="left").double() / len(f)
    best = int(torch.argmax(tnr + tpr))
    return float(cand[best])


def balanced_accuracy(real: torch.Tensor, fake: torch.Tensor, t: float) -> float:
    return 0.5 * (float((real < t).double().mean()) + float((fake >= t).double().mean()))


def auroc(real: torch.Tensor, fake: torch.Tensor) -> float:
    """ROC-AUC as the Mann-Whitney statistic: P(a generated image scores above a real one),
    ties counted half (exact, O(n log n))."""
    r = real.double().sort().values
    f = fake.double()
    below = torch.searchsorted(r, f, side="left").double()
    tied = torch.searchsorted(r, f, side="right").double() - below
    return float((below + tied / 2).mean() / len(r))


def binary_metrics(real: torch.Tensor, fake: torch.Tensor, t: float, bootstrap: int = 0,
                   seed: int = 0) -> dict[str, float]:  # fmt: skip
    """ROC-AUC, average precision and balanced accuracy at ``t`` of scores of real (negative)
    and generated (positive) images; with ``bootstrap``, 95 % percentile intervals of AUC and
    accuracy (``auc_ci_low`` ...) from resampling each set with replacement."""
    from torchmetrics.functional.classification import binary_average_precision

    s = torch.cat([real, fake]).float()
    y = torch.cat([torch.zeros(len(real)), torch.ones(len(fake))]).long()
    out = {
        "auc": auroc(real, fake),
        "ap": float(binary_average_precision(s, y)),
        "accuracy": balanced_accuracy(real, fake, t),
    }
    if bootstrap:
        g = torch.Generator().manual_seed(seed)
        aucs, accs = [], []
        for _ in range(bootstrap):
            r = real[torch.randint(len(real), (len(real),), generator=g)]
            f = fake[torch.randint(len(fake), (len(fake),), generator=g)]
            aucs.append(auroc(r, f))
            accs.append(balanced_accuracy(r, f, t))
        for key, vals in (("auc", aucs), ("accuracy", accs)):
            lo, hi = np.percentile(vals, [2.5, 97.5])
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(lo), float(hi)
    return out


def roc_curve(real: torch.Tensor, fake: torch.Tensor) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) of the scores, for the plot."""
    from torchmetrics.functional.classification import binary_roc

    s = torch.cat([real, fake]).float()
    y = torch.cat([torch.zeros(len(real)), torch.ones(len(fake))]).long()
    fpr, tpr, _ = binary_roc(s, y)
    return fpr.tolist(), tpr.tolist()


# ---------------------------------------------------------------------------------------------
# the stage's work


def _real_stores(dataset_dir, resolutions: set[int], split: str) -> dict[int, Any]:
    from gm.data.parquet import level_path
    from gm.data.rowstore import RowStore

    out = {}
    for r in sorted(resolutions):
        path = level_path(dataset_dir, r)
        if not path.is_file():
            raise DataError(f"{dataset_dir}: no {r}x{r} level (a model samples at {r}x{r})")
        out[r] = RowStore(path, ("image",), split=split, mode="auto")
    return out


def _calibrated(net, real_val: dict[int, Any], fakes: list[SampleSet], resolution: int):
    """The threshold calibrated on the validation rows: every real validation image at each
    resolution the models sample at, against every model's validation samples."""
    r = torch.cat([_store_scores(net, s, resolution) for s in real_val.values()])
    f = torch.cat([_store_scores(net, m.splits["val"], resolution) for m in fakes])
    return calibrate(r, f)


def run_detection(dataset_dir: str | os.PathLike, sample_files: dict[str, Path],
                  resolution: int, cfg: DetectConfig,
                  progress: bool = True) -> tuple[Any, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Train the detector of a dataset and score every model (module docstring).

    ``sample_files``: job → its sample file. Returns (network, report, curves): ``report``
    holds the threshold and, per job, the metrics of each condition (``auc``, ``ap``,
    ``accuracy``, ``auc_jpeg75`` ..., ``auc_loo`` ...); ``curves`` the ROC points per
    condition and job for :func:`plot_roc`. DataError names a missing or unreadable file or a
    split with no rows."""
    if not sample_files:
        raise DataError(f"{dataset_dir}: no model's samples to detect")
    sets = {job: open_samples(p) for job, p in sample_files.items()}
    channels = {s.splits["train"].shape("image")[-1] for s in sets.values()}
    if len(channels) != 1:
        raise DataError(f"{dataset_dir}: the sample files have {sorted(channels)} channels")
    resolutions = {s.resolution for s in sets.values()}
    if max(resolutions) > resolution:
        resolution = max(resolutions)
    real_train = _real_stores(dataset_dir, resolutions, "train")
    real_val = _real_stores(dataset_dir, resolutions, "val")
    real_test = _real_stores(dataset_dir, resolutions, "test")
    fakes = list(sets.values())
    net = train_detector(real_train, fakes, resolution, cfg, progress)
    threshold = _calibrated(net, real_val, fakes, resolution)

    conditions = perturbations(cfg)
    real_scores = {
        (name, r): _store_scores(net, store, resolution, fn)
        for name, fn in conditions.items()
        for r, store in real_test.items()
    }
    report: dict[str, Any] = {}
    curves: dict[str, dict[str, Any]] = {name: {} for name in conditions}
    for job, s in sets.items():
        n_fake, n_real = len(s.splits["test"]), len(real_test[s.resolution])
        row: dict[str, Any] = {
            "family": s.meta.get("family", ""),
            "resolution": s.resolution,
            "step": s.meta.get("step"),
            "n_real": n_real,
            "n_generated": n_fake,
            "mlflow_run_id": s.meta.get("mlflow_run_id", ""),
        }
        if min(n_fake, n_real) < cfg.min_images:
            row["unavailable"] = (f"{n_fake} held-out samples and {n_real} real test images; "
                                  f"detect.min_images is {cfg.min_images}")  # fmt: skip
            report[job] = row
            continue
        for name, fn in conditions.items():
            real = real_scores[(name, s.resolution)]
            fake = _store_scores(net, s.splits["test"], resolution, fn)
            m = binary_metrics(real, fake, threshold, cfg.bootstrap if name == "clean" else 0,
                               cfg.seed)  # fmt: skip
            suffix = "" if name == "clean" else f"_{name}"
            row |= {f"{k}{suffix}": v for k, v in m.items()}
            curves[name][job] = roc_curve(real, fake)
        report[job] = row

    families = sorted({s.meta.get("family", job) for job, s in sets.items()})
    if cfg.leave_one_out and len(families) > 1:
        curves["leave-one-family-out"] = {}
        for fam in families:
            held = [j for j, s in sets.items() if s.meta.get("family", j) == fam]
            rest = [s for j, s in sets.items() if j not in held]
            loo = train_detector(real_train, rest, resolution, cfg, progress, f"without {fam}")
            t = _calibrated(loo, real_val, rest, resolution)
            for job in held:
                if "unavailable" in report[job]:
                    continue
                s = sets[job]
                real = _store_scores(loo, real_test[s.resolution], resolution)
                fake = _store_scores(loo, s.splits["test"], resolution)
                m = binary_metrics(real, fake, t)
                report[job] |= {f"{k}_loo": v for k, v in m.items()}
                curves["leave-one-family-out"][job] = roc_curve(real, fake)
    summary = {
        "resolution": resolution,
        "threshold": threshold,
        "conditions": list(conditions) + (["leave-one-family-out"]
                                          if "leave-one-family-out" in curves else []),
        "models": report,
    }  # fmt: skip
    return net, summary, curves


def plot_roc(curves: dict[str, dict[str, Any]], title: str):
    """One panel of ROC curves per condition (a curve per model), as a PIL image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, v) for k, v in curves.items() if v]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), dpi=110,
                             squeeze=False)  # fmt: skip
    for ax, (name, per_job) in zip(axes[0], panels, strict=True):
        for job, (fpr, tpr) in per_job.items():
            ax.plot(fpr, tpr, lw=1.3, label=job)
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        ax.set(title=name, xlabel="false positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("true positive rate (generated)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from gm.plots import figure_image

    return figure_image(fig)


def save_detector(path, net, cfg: DetectConfig, info: dict[str, Any]) -> None:
    from gm.config import to_dict
    from gm.io import atomic_path

    payload = {
        "kind": KIND,
        "config": json.dumps(to_dict(cfg), sort_keys=True),
        "info": json.dumps(info, sort_keys=True),
        "state_dict": net.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_detector(path: str | os.PathLike):
    """(network in eval mode, info: resolution, channels, threshold, dataset, models)."""
    from gm.config import from_dict

    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such detector") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable detector ({e})") from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise DataError(f"{path}: not a gm detector (made by the detect stage)")
    cfg = from_dict(DetectConfig, json.loads(payload["config"]), "detect")
    info = json.loads(payload["info"])
    net = _network(cfg, info["resolution"], info["channels"])
    net.load_state_dict(payload["state_dict"])
    return net.eval(), info


def log_to_mlflow(root, report: dict[str, Any], detector_sha256: str) -> int:
    """Each model's detection metrics (``detect/<name>``) on its own MLflow training run;
    returns how many runs were written."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from gm.tracking import check_store, tracking_uri

    rows = [r for r in report["models"].values()
            if r.get("mlflow_run_id") and "unavailable" not in r]  # fmt: skip
    if not rows:
        return 0
    uri = tracking_uri(root)
    check_store(uri)
    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    for row in rows:
        run_id = row["mlflow_run_id"]
        step = int(row.get("step") or 0)
        metrics = [Metric(f"detect/{k}", float(v), now, step) for k, v in row.items()
                   if isinstance(v, float) and math.isfinite(v)]  # fmt: skip
        client.log_batch(run_id, metrics=metrics,
                         tags=[RunTag("detect.detector_sha256", detector_sha256)])  # fmt: skip
    return len(rows)


# ---------------------------------------------------------------------------------------------
# gm detect


def image_files(paths: list[str]) -> list[Path]:
    """Files named, and image files (the datasets' suffixes) under folders named, in order."""
    from gm.data.archives import IMAGE_SUFFIXES

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and f.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def detect_files(
    net, info: dict[str, Any], files: list[Path], batch: int = 64
) -> tuple[list[tuple[Path, float]], list[tuple[Path, str]]]:
    """(file, P(generated)) for each readable image, and (file, reason) for the others. Each
    image is read under the datasets' colour policy and resized to the detector's resolution
    as a sample is shown to it (bilinear, antialiased)."""
    from gm.apply import read_image

    res, ch = info["resolution"], info["channels"]
    scored, bad = [], []
    pending: list[tuple[Path, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        x = torch.stack([img if img.shape[-2:] == (res, res) else
                         F.interpolate(img[None], size=(res, res), mode="bilinear",
                                       antialias=True)[0].clamp(-1, 1)
                         for _, img in pending])  # fmt: skip
        with torch.no_grad():
            p = torch.sigmoid(net(x).squeeze(1))
        scored.extend((f, float(v)) for (f, _), v in zip(pending, p, strict=True))
        pending.clear()

    for f in files:
        try:
            pending.append((f, read_image(f, ch)))
        except DataError as e:
            bad.append((f, str(e).removeprefix(f"{f}: ")))
        if len(pending) == batch:
            flush()
    flush()
    return scored, bad


def main_detect(args) -> int:
    """``gm detect IMAGES --model DETECTOR``: a table (or ``--json``) of P(generated) per image;
    unreadable files on stderr; exit 1 when nothing could be scored."""
    net, info = load_detector(args.model)
    files = image_files(args.images)
    if not files:
        raise DataError(f"{' '.join(args.images)}: no image files")
    scored, bad = detect_files(net, info, files)
    t = info["threshold"]
    rows = [{"file": str(f), "p_generated": round(p, 6),
             "verdict": "generated" if p >= t else "real"} for f, p in scored]  # fmt: skip
    if args.json:
        doc = {
            "detector": str(args.model),
            "threshold": t,
            "resolution": info["resolution"],
            "images": rows,
            "unreadable": [{"file": str(f), "reason": r} for f, r in bad],
        }
        print(json.dumps(doc, indent=2))  # fmt: skip
    else:
        width = max([len(r["file"]) for r in rows] + [4])
        print(f"{'file':<{width}}  P(generated)  verdict (threshold {t:.3g})")
        for r in rows:
            print(f"{r['file']:<{width}}  {r['p_generated']:>12.4f}  {r['verdict']}")
    for f, reason in bad:
        print(f"unreadable: {f}: {reason}", file=sys.stderr)
    return 0 if scored else 1
