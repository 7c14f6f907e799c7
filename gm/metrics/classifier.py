"""The domain classifier: a small CNN trained on a dataset's train split.

Inception-v3 features are the convention for FID, but its weights cannot be downloaded here and
many domains (digits, emoji, medical images) are far from ImageNet. gm trains a classifier per
dataset instead; its penultimate layer is the feature space of "domain FID/KID", its softmax
the classifier of the conditional accuracy and the Inception-style score. The checkpoint holds
the config and data info as JSON and the weights, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gm.config import check, from_dict, to_dict
from gm.errors import DataError
from gm.io import atomic_path, sha256_file


@dataclass(frozen=True)
class ClassifierConfig:
    width: int = 32  # channels of the first conv block; doubled per downsampling
    features: int = 128  # size of the feature layer (the FID/KID feature space)
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # lower pyramid levels the classifier also learns, each image shown as evaluation shows a
    # sample of that resolution (resized up to the classifier's; gm.metrics.evaluate): a model
    # trained at 16x16 is then scored in a feature space that has seen 16x16 images
    levels: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("width", "features", "steps", "batch_size"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        for r in self.levels:
            check(r >= 4 and not r & (r - 1), "levels", f"{r} is not a power of two >= 4")


class DomainClassifier(nn.Module):
    """(B, C, R, R) images in [-1, 1] → logits; :meth:`features` gives the penultimate layer."""

    def __init__(self, cfg: ClassifierConfig, resolution: int, channels: int, num_classes: int):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"classifier needs a power-of-two resolution >= 4, got {resolution}")
        layers: list[nn.Module] = []
        c_in, c = channels, cfg.width
        for _ in range(max(int(math.log2(resolution)) - 2, 1)):  # down to 4x4
            layers += [
                nn.Conv2d(c_in, c, 3, 1, 1),
                nn.BatchNorm2d(c),
                nn.ReLU(True),
                nn.Conv2d(c, c, 3, 2, 1),
                nn.BatchNorm2d(c),
                nn.ReLU(True),
            ]
            c_in, c = c, c * 2
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(c_in, cfg.features), nn.ReLU(True))
        self.head = nn.Linear(cfg.features, num_classes)
        self.num_features = cfg.features  # read by torchmetrics for custom extractors

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def present(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, C, r, r) in [-1, 1] as the classifier of resolution ``size`` sees them:
    resized by bilinear interpolation with antialiasing, clamped to [-1, 1] (unchanged at
    ``size``). Evaluation shows samples and real images the same way."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(-1, 1)


def train_classifier(
    dataset_dir: str | os.PathLike, resolution: int, cfg: ClassifierConfig, progress: bool = True
) -> tuple[DomainClassifier, dict]:
    """Train on the train split; returns the network (eval mode) and its test-split report:
    ``test_accuracy`` at ``resolution``, and with ``cfg.levels`` the accuracy at each level
    shown as evaluation shows it (``test_accuracy_by_level``). Each training image is drawn
    at one of the levels, uniformly. A level the pyramid lacks is a DataError naming it."""
    from tqdm import tqdm

    from gm.data.parquet import level_path
    from gm.data.readers import to_unit_range
    from gm.data.rowstore import RowStore, shard_positions

    torch.manual_seed(cfg.seed)
    levels = sorted({resolution, *(r for r in cfg.levels if r < resolution)})
    for r in levels:
        if not level_path(dataset_dir, r).is_file():
            raise DataError(f"{dataset_dir}: no {r}x{r} level for evaluate.classifier.levels")
    try:  # in memory for small splits, streamed (bounded) for large ones
        train = {r: RowStore(level_path(dataset_dir, r), ("image",), split="train", mode="auto")
                 for r in levels}  # fmt: skip
        test = {r: RowStore(level_path(dataset_dir, r), ("image",), split="test", mode="auto")
                for r in levels}  # fmt: skip
    except DataError:
        raise DataError(
            f"{dataset_dir}: the classifier needs non-empty train and test splits"
        ) from None
    top, top_test = train[resolution], test[resolution]
    for r in levels:  # the same images in the same order at every level
        if not torch.equal(train[r].labels, top.labels):
            raise DataError(f"{dataset_dir}: level {r} does not list the images of level "
                            f"{resolution} in the same order")  # fmt: skip
    num_classes = len(json.loads((Path(dataset_dir) / "manifest.json").read_text())["classes"])
    channels = top.shape("image")[-1]
    net = DomainClassifier(cfg, resolution, channels, num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    net.train()
    bar = tqdm(
        range(cfg.steps),
        desc="classifier",
        unit="step",
        disable=not progress,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,  # a log file gets few lines
    )
    g = torch.Generator().manual_seed(cfg.seed)
    for step in bar:  # the windowed per-epoch shuffle of training (gm.data.rowstore)
        idx = shard_positions(len(top), step, cfg.batch_size, 0, 1, cfg.seed, top.window)
        nxt = shard_positions(len(top), step + 1, cfg.batch_size, 0, 1, cfg.seed, top.window)
        for store in train.values():
            store.prefetch(nxt)
        cols, labels = top.take(idx)
        x = to_unit_range(cols["image"])
        if len(levels) > 1:  # each image at a level drawn uniformly, shown at `resolution`
            pick = torch.randint(len(levels), (len(idx),), generator=g)
            for k, r in enumerate(levels[:-1]):
                rows = (pick == k).nonzero().flatten()
                if len(rows):
                    low, _ = train[r].take(idx[rows])
                    x[rows] = present(to_unit_range(low["image"]), resolution)
        loss = F.cross_entropy(net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    net.eval()
    by_level = {}
    with torch.no_grad():
        for r in levels:
            correct = 0
            for pixels, labels in test[r].batches(None, 512):
                x = present(to_unit_range(pixels), resolution)
                correct += (net(x).argmax(1) == labels).sum().item()
            by_level[str(r)] = correct / len(top_test)
    info = {"resolution": resolution, "channels": channels, "num_classes": num_classes}
    report = {
        "test_accuracy": by_level[str(resolution)],
        "chance_accuracy": 1.0 / num_classes,
        "train_size": len(top),
        "test_size": len(top_test),
        **info,
    }
    if len(levels) > 1:
        report["test_accuracy_by_level"] = by_level
    return net, report


def save_classifier(path, net: DomainClassifier, cfg: ClassifierConfig, info: dict) -> None:
    payload = {
        "kind": "gm-domain-classifier",
        "config": json.dumps(to_dict(cfg), sort_keys=True),
        "data_info": dict(info),
        "state_dict": net.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_classifier(path: str | os.PathLike) -> tuple[DomainClassifier, dict]:
    """(network in eval mode, description: kind, path, sha256, data info)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such classifier checkpoint") from None
    except Exception as e:  # truncated or foreign file
        raise DataError(f"{path}: not a readable classifier checkpoint ({e})") from None
    if not isinstance(payload, dict) or payload.get("kind") != "gm-domain-classifier":
        raise DataError(f"{path}: not a gm domain-classifier checkpoint")
    cfg = from_dict(ClassifierConfig, json.loads(payload["config"]), "classifier")
    info = payload["data_info"]
    net = DomainClassifier(cfg, info["resolution"], info["channels"], info["num_classes"])
    net.load_state_dict(payload["state_dict"])
    desc = {"kind": "domain-classifier", "path": str(path), "sha256": sha256_file(path), **info}
    return net.eval(), desc
