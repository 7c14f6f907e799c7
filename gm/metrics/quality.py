"""Sample-quality metrics on feature vectors, and the registry that names them.

Features are computed once per image set (real test split, a real train subset of the same
size as the generated set, the generated set) and every metric reads them: torchmetrics' FID,
KID and Inception Score are fed the features through an identity "extractor", so the numbers
are torchmetrics' own. Metrics never synchronize across processes (they run on one rank, also
inside a DDP process group). Each distance is also computed for real train vs real test, the
*baseline*: what a perfect generator would score with this many samples and this extractor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gm.errors import ConfigError, DataError

# Metrics run on one process: never gather states across a DDP process group (rank 0 computes
# in-training KID alone; a gather there would wait forever for the other ranks).
_LOCAL = {"sync_on_compute": False, "distributed_available_fn": lambda: False}


class _Features(nn.Module):
    """Identity 'extractor': the inputs already are feature vectors."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F), in float64:
    torchmetrics' FID formula (``_compute_fid``: the trace of the matrix square root from the
    eigenvalues of Σ_r Σ_f) on the sets' means and unbiased covariances, as its
    ``FrechetInceptionDistance`` computes them, without building a metric object per call (the
    bootstrap calls it 200 times per evaluation)."""
    from torchmetrics.image.fid import _compute_fid

    if min(len(real), len(fake)) < 2:
        raise DataError(f"FID needs >= 2 samples per set, got {len(real)}, {len(fake)}")
    r, f = real.double(), fake.double()
    return float(_compute_fid(r.mean(0), torch.cov(r.T), f.mean(0), torch.cov(f.T)))


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, seed: int = 0):
    """(mean, standard deviation over subsets) of the unbiased polynomial-kernel MMD²."""
    from torchmetrics.image.kid import KernelInceptionDistance

    # Subsets of half the smaller set (at most 1000, Bińkowski et al.'s size), so the spread
    # over subsets measures the estimator's variability.
    size = max(min(len(real), len(fake)) // 2, 2)
    size = min(size, 1000)
    m = KernelInceptionDistance(
        feature=_Features(real.shape[1]), subsets=subsets, subset_size=size, **_LOCAL
    )
    m.update(real.float(), real=True)
    m.update(fake.float(), real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws its subsets from the global RNG
    try:
        mean, std = m.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019): the share of fake
    samples inside the real manifold (k-NN balls around real features), and vice versa."""

    if min(len(real), len(fake)) < 2:
        raise DataError(f"precision/recall need >= 2 samples per set, got {len(real)}, {len(fake)}")

    def inside(points, ref):
        d_ref = torch.cdist(ref, ref)
        kth = min(k, len(ref) - 1)  # tiny sets: the farthest neighbour
        radii = d_ref.kthvalue(kth + 1, dim=1).values  # k-th neighbour, self excluded
        return (torch.cdist(points, ref) <= radii[None, :]).any(dim=1).float().mean()

    real, fake = real.double(), fake.double()
    return float(inside(fake, real)), float(inside(real, fake))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception-style score on the domain classifier's logits (mean, std over splits)."""
    from torchmetrics.image.inception import InceptionScore

    m = InceptionScore(feature=_Features(logits.shape[1]), splits=splits, **_LOCAL)
    m.update(logits.double())
    mean, std = m.compute()
    return float(mean), float(std)


# Paired metrics (super-resolution, translation): outputs against aligned targets.
PSNR_CAP = 100.0  # dB, the PSNR reported for identical images (instead of infinity)


def to_y(images: torch.Tensor) -> torch.Tensor:
    """RGB in [-1, 1] → luma Y (ITU-R BT.601, as SR papers report) in [-1, 1] (16–235 range);
    grey images pass through."""
    if images.shape[1] == 1:
        return images
    rgb = (images + 1) / 2  # [0, 1]
    w = torch.tensor([65.481, 128.553, 24.966], dtype=rgb.dtype, device=rgb.device)
    y = (16.0 + torch.einsum("bchw,c->bhw", rgb, w))[:, None] / 255.0
    return y * 2 - 1


def _prepare(pred, target, border: int, y_channel: bool):
    if pred.shape != target.shape:
        raise DataError(f"paired metric: output shape {tuple(pred.shape)} != target "
                        f"{tuple(target.shape)}")  # fmt: skip
    pred, target = pred.double().clamp(-1, 1), target.double().clamp(-1, 1)
    if y_channel:
        pred, target = to_y(pred), to_y(target)
    if border:
        pred = pred[..., border:-border, border:-border]
        target = target[..., border:-border, border:-border]
    return pred, target


def psnr_per_image(
    pred: torch.Tensor, target: torch.Tensor, border: int = 0, y_channel: bool = False
) -> torch.Tensor:
    """(N,) PSNR in dB of images in [-1, 1] (data range 2); identical images score PSNR_CAP.
    ``border``: pixels cropped on each side (SR convention: the scale)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred, target = _prepare(pred, target, border, y_channel)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    per_image = peak_signal_noise_ratio(
        pred, target, data_range=2.0, reduction="none", dim=(1, 2, 3)
    )
    per_image = torch.where(mse == 0, torch.full_like(per_image, PSNR_CAP), per_image)
    return per_image.clamp(max=PSNR_CAP)


def psnr(pred: torch.Tensor, target: torch.Tensor, border: int = 0, y_channel: bool = False):
    """Per-image PSNR in dB (:func:`psnr_per_image`), averaged over images."""
    return float(psnr_per_image(pred, target, border, y_channel).mean())


def psnr_pooled(pred: torch.Tensor, target: torch.Tensor, border: int = 0, y_channel: bool = False):
    """PSNR of the mean squared error over every pixel of every image: not dominated by a few
    flat images whose per-image PSNR runs to the cap."""
    pred, target = _prepare(pred, target, border, y_channel)
    mse = float((pred - target).pow(2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(4.0 / mse))


def ssim(pred: torch.Tensor, target: torch.Tensor, border: int = 0, y_channel: bool = False):
    """Mean SSIM (Gaussian window 11, σ 1.5; torchmetrics) of images in [-1, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = _prepare(pred, target, border, y_channel)
    # float32: an order of magnitude faster than float64 on CPU, equal to ~1e-8
    return float(structural_similarity_index_measure(pred.float(), target.float(), data_range=2.0))


# Metrics of two image distributions: reported only when every set (real test split, real train
# subset, generated samples) has at least ``evaluate.min_images`` images (default 50). Below
# that, FID's and KID's bias and spread and precision/recall's k-NN manifolds swamp the
# differences between models (docs/evaluation.md): the metric is unavailable, with the reason.
DISTRIBUTION_METRICS = ("fid", "kid", "precision_recall", "inception_score")


def unavailable(metrics, counts: dict[str, int], dataset: str, minimum: int) -> dict[str, str]:
    """{metric: reason} for each of ``metrics`` (:data:`DISTRIBUTION_METRICS`) that ``counts``
    (images per set, by set name) cannot support: a set under ``minimum``. Empty otherwise."""
    if min(counts.values(), default=0) >= minimum:
        return {}
    have = ", ".join(f"{v} {k}" for k, v in counts.items())
    why = f"needs >= {minimum} images per set; {dataset!r} gave {have}"
    return {name: why for name in metrics if name in DISTRIBUTION_METRICS}


@dataclass
class EvalSets:
    """What the metrics read. Features: (N, F); logits: (N, K)."""

    real: torch.Tensor  # test split features
    baseline: torch.Tensor  # train-split features, as many as `fake`
    fake: torch.Tensor  # generated samples' features
    fake_logits: torch.Tensor
    fake_labels: torch.Tensor | None  # the labels samples were conditioned on (None: unconditional)
    baseline_logits: torch.Tensor
    bits_per_dim: float | None = None  # test-split bits/dim of a likelihood model
    label_logits: torch.Tensor | None = None  # domain classifier on `fake` (else fake_logits)
    # the domain classifier on the real test images, shown as the samples are, and their labels:
    # the real baseline of the conditional accuracy
    real_label_logits: torch.Tensor | None = None
    real_labels: torch.Tensor | None = None
    # Paired models: outputs, aligned targets and a baseline's outputs (e.g. bicubic upscaling)
    paired_output: torch.Tensor | None = None
    paired_target: torch.Tensor | None = None
    paired_baseline: torch.Tensor | None = None
    paired_border: int = 0  # pixels cropped on each side before PSNR/SSIM (SR: the scale)
    paired_y_channel: bool = False  # on luma (SR convention) instead of all channels
    # Energy-based models: energies (N,) of the test split and of out-of-distribution sets
    ood_energies: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    bootstrap: int = 0  # resamples for the 95 % intervals of FID, precision, recall (0: none)
    seed: int = 0


def bootstrap_interval(
    fn,
    real: torch.Tensor,
    fake: torch.Tensor,
    value,
    resamples: int,
    seed: int = 0,
    level: float = 0.95,
) -> list[tuple[float, float]]:
    """Bootstrap interval (Efron & Tibshirani 1993) of each ``value`` = ``fn(real, fake)``
    (a float or a tuple of floats, computed by the caller): both feature sets (N, F) are
    resampled with replacement ``resamples`` times (seeded); the central ``level`` share of
    the resampled values gives the spread below and above their median, laid around the value
    itself. (Resampling with replacement repeats images, which raises FID and shrinks k-NN
    radii: the raw percentiles sit off the value, often wholly above it for FID; their spread
    does not.) The sampling uncertainty of a metric at this sample count, not the training
    seed's. Returns [(low, high)] per value."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        i = torch.randint(len(real), (len(real),), generator=g)
        j = torch.randint(len(fake), (len(fake),), generator=g)
        v = fn(real[i], fake[j])
        values.append(v if isinstance(v, tuple) else (v,))
    point = value if isinstance(value, tuple) else (value,)
    table = torch.tensor(values, dtype=torch.float64)
    q = torch.tensor([(1 - level) / 2, 0.5, (1 + level) / 2], dtype=torch.float64)
    out = []
    for v, col in zip(point, table.T, strict=True):
        lo, mid, hi = (float(x) for x in torch.quantile(col, q))
        out.append((v - (mid - lo), v + (hi - mid)))
    return out


def _ci(out: dict[str, float], name: str, interval: tuple[float, float]) -> None:
    out[f"{name}_ci_low"], out[f"{name}_ci_high"] = interval


def _fid(s: EvalSets) -> dict[str, float]:
    out = {"fid": fid(s.real, s.fake), "fid_baseline": fid(s.real, s.baseline)}
    if s.bootstrap:
        ci = bootstrap_interval(fid, s.real, s.fake, out["fid"], s.bootstrap, s.seed)
        _ci(out, "fid", ci[0])
    return out


def _kid(s: EvalSets) -> dict[str, float]:
    mean, std = kid(s.real, s.fake)
    base, base_std = kid(s.real, s.baseline)
    out = {"kid": mean, "kid_std": std, "kid_baseline": base, "kid_baseline_std": base_std}
    if s.bootstrap:  # KID's own spread over subsets: mean ± 1.96 std
        _ci(out, "kid", (mean - 1.96 * std, mean + 1.96 * std))
    return out


def _pr(s: EvalSets) -> dict[str, float]:
    p, r = precision_recall(s.real, s.fake)
    pb, rb = precision_recall(s.real, s.baseline)
    out = {"precision": p, "recall": r, "precision_baseline": pb, "recall_baseline": rb}
    if s.bootstrap:
        ci = bootstrap_interval(precision_recall, s.real, s.fake, (p, r), s.bootstrap, s.seed)
        for name, (lo, hi) in zip(("precision", "recall"), ci, strict=True):
            _ci(out, name, (max(lo, 0.0), min(hi, 1.0)))  # shares: within [0, 1]
    return out


def _cond(s: EvalSets) -> dict[str, float]:
    if s.fake_labels is None:
        return {}
    logits = s.fake_logits if s.label_logits is None else s.label_logits
    hits = (logits.argmax(1) == s.fake_labels).float()
    out = {"conditional_accuracy": float(hits.mean())}
    if s.bootstrap:  # a share of n samples: the Wilson score interval (95 %)
        _ci(out, "conditional_accuracy", wilson(float(hits.sum()), len(hits)))
    if s.real_label_logits is not None and s.real_labels is not None:
        real = (s.real_label_logits.argmax(1) == s.real_labels).float().mean()
        out["conditional_accuracy_baseline"] = float(real)
    return out


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of a binomial proportion: ``successes`` of ``n``."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _is(s: EvalSets) -> dict[str, float]:
    mean, std = inception_score(s.fake_logits)
    base, _ = inception_score(s.baseline_logits)
    return {"inception_score": mean, "inception_score_std": std, "inception_score_baseline": base}


def _bpd(s: EvalSets) -> dict[str, float]:
    return {} if s.bits_per_dim is None else {"bits_per_dim": s.bits_per_dim}


def energy_roc_auc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """ROC-AUC of telling out-of-distribution images from test images by their energy (higher
    energy: out), as Du & Mordatch 2019 evaluate EBMs; 0.5 is chance (scikit-learn)."""
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([inside, outside]).double().numpy()
    truth = [0] * len(inside) + [1] * len(outside)
    return float(roc_auc_score(truth, scores))


def _ood(s: EvalSets) -> dict[str, float]:
    if not s.ood_energies:
        return {}
    return {f"ood_auc_{name}": energy_roc_auc(inside, outside)
            for name, (inside, outside) in s.ood_energies.items()}  # fmt: skip


def _paired(name: str, fn) -> Callable[[EvalSets], dict[str, float]]:
    def metric(s: EvalSets) -> dict[str, float]:
        if s.paired_output is None or s.paired_target is None:
            return {}
        kw = {"border": s.paired_border, "y_channel": s.paired_y_channel}
        out = {name: fn(s.paired_output, s.paired_target, **kw)}
        if s.paired_baseline is not None:
            out[f"{name}_baseline"] = fn(s.paired_baseline, s.paired_target, **kw)
        return out

    return metric


METRICS: dict[str, Callable[[EvalSets], dict[str, float]]] = {
    "fid": _fid,
    "kid": _kid,
    "precision_recall": _pr,
    "conditional_accuracy": _cond,
    "inception_score": _is,
    "bits_per_dim": _bpd,
    "ood_auc": _ood,
    "psnr": _paired("psnr", psnr),
    "ssim": _paired("ssim", ssim),
}


def get(name: str) -> Callable[[EvalSets], dict[str, float]]:
    if name not in METRICS:
        raise ConfigError(f"metrics: unknown metric {name!r} (known: {', '.join(METRICS)})")
    return METRICS[name]
