"""Sample grids: one row per class for conditional models, so classes can be told apart; for
paired families, input | output | target."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid


def sample_grid(
    trainer, num_classes: int, per_class: int = 8, max_classes: int = 16, seed: int = 0
) -> np.ndarray:
    """(H, W, 3) uint8 grid from the trainer's sampling networks (EMA copies where kept).

    Conditional: row i holds ``per_class`` samples of class i (the first ``max_classes``).
    Unconditional: an 8x8 grid. The seed is fixed, so grids of one run are comparable.
    """
    if trainer.model.conditional and num_classes > 1:
        classes = min(num_classes, max_classes)
        labels = torch.arange(classes).repeat_interleave(per_class)
        images = trainer.sample(len(labels), labels, seed=seed)
    else:
        images = trainer.sample(per_class * per_class, seed=seed)
    return image_grid(images, nrow=per_class)


def image_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] → an (H', W', 3) uint8 grid, ``nrow`` images a row."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    grid = make_grid(images.float().clamp(-1, 1), nrow=nrow, padding=2, pad_value=1.0)
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def preview_grid(trainer, num_classes: int, dataset_dir, seed: int = 0) -> np.ndarray:
    """What a run shows of its model: the sample grid, or for a paired family the comparison
    grid (input | output | target) of the first test pairs of ``dataset_dir``."""
    src = trainer.model.pair_source()
    if src is None:
        return sample_grid(trainer, num_classes, seed=seed)
    from gm.metrics.paired import PairedProbe

    return PairedProbe(dataset_dir, src, max_images=8).grid(trainer)
