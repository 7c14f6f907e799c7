"""Evaluation of paired families on held-out aligned pairs, beside a baseline on the same images.

- Super-resolution: PSNR and SSIM on luma with ``scale`` border pixels cropped (the SR papers'
  convention), beside bicubic upscaling of the same LR inputs (``psnr_bicubic``, ...); also the
  PSNR pooled over all test pixels (``psnr_pooled``: a mean of per-image PSNRs is dominated by
  flat tiles, where bicubic is exact and scores the 100 dB cap) and ``win_rate``, the share of
  test images on which the model's PSNR beats bicubic's.
- Translation: L1 (on [-1, 1]), PSNR and SSIM on all channels against the aligned ground truth,
  beside the identity baseline (the input itself as the answer: ``l1_identity`` ...); two-way
  models (CycleGAN) add the cycle-reconstruction error ``cycle_l1`` (mean of |F(G(a)) − a| and
  |G(F(b)) − b|).

Outputs (and the bicubic baseline) are rounded to 8 bits first, as the image files a user gets.
The same numbers are computed at every checkpoint of a training run (rank 0) and for the final
model, and :meth:`PairedProbe.grid` draws the comparison grid (input | output | target).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gm.metrics.quality import psnr, psnr_per_image, psnr_pooled, ssim
from gm.train.protocol import PairSource


def bicubic(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The SR baseline: bicubic upscaling of (B, C, h, w) images in [-1, 1], clamped."""
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the 8-bit grid (what saving them as PNG keeps)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


class PairedProbe:
    """Test pairs of a paired dataset, read once; called with a trainer, returns the metrics of
    its model (sampling networks, eval mode) on them."""

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        source: PairSource,
        split: str = "test",
        max_images: int = 0,  # 0: every image of the split
    ):
        from gm.data.readers import PairedDataset

        data = PairedDataset(
            Path(dataset_dir) / source.file, (source.inputs, source.targets), split
        )
        n = len(data) if max_images <= 0 else min(max_images, len(data))
        self.inputs, self.targets, _ = data.batch(slice(0, n))
        self.scale = source.scale
        self._baseline: dict[str, float | torch.Tensor] | None = None  # computed once

    def baseline(self) -> dict[str, float | torch.Tensor]:
        """The baseline's scores (bicubic for SR, the identity for translation); they do not
        change during training, so they are computed on the first call only."""
        if self._baseline is None:
            x, y = self.inputs, self.targets
            if self.scale > 1:
                kw = {"border": self.scale, "y_channel": True}
                base = to_8bit(bicubic(x, self.scale))
                per_image = psnr_per_image(base, y, **kw)
                self._baseline = {
                    "per_image": per_image,
                    "psnr_bicubic": float(per_image.mean()),
                    "ssim_bicubic": ssim(base, y, **kw),
                    "psnr_pooled_bicubic": psnr_pooled(base, y, **kw),
                }
            else:
                self._baseline = {
                    "l1_identity": float((x - y).abs().mean()),
                    "psnr_identity": psnr(x, y),
                    "ssim_identity": ssim(x, y),
                }
        return self._baseline

    @torch.no_grad()
    def outputs(self, trainer, x: torch.Tensor, reverse: bool = False, batch: int = 64):
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            nets = trainer.sampling_nets()
            parts = [
                model.translate(x[i : i + batch], nets, reverse) for i in range(0, len(x), batch)
            ]
            return to_8bit(torch.cat(parts).cpu())
        finally:
            model.train(was_training)

    def __call__(self, trainer) -> dict[str, float]:
        x, y = self.inputs, self.targets
        out = self.outputs(trainer, x)
        base = {k: v for k, v in self.baseline().items() if k != "per_image"}
        if self.scale > 1:
            kw = {"border": self.scale, "y_channel": True}
            per_image = psnr_per_image(out, y, **kw)
            return {
                "psnr": float(per_image.mean()),
                "ssim": ssim(out, y, **kw),
                "psnr_pooled": psnr_pooled(out, y, **kw),
                **base,
                "win_rate": float((per_image > self.baseline()["per_image"]).float().mean()),
            }
        metrics = {
            "l1": float((out - y).abs().mean()),
            "psnr": psnr(out, y),
            "ssim": ssim(out, y),
            **base,
        }
        if trainer.model.two_way:
            rec_a = self.outputs(trainer, out, reverse=True)
            rec_b = self.outputs(trainer, self.outputs(trainer, y, reverse=True))
            cycle = 0.5 * ((rec_a - x).abs().mean() + (rec_b - y).abs().mean())
            metrics["cycle_l1"] = float(cycle)
        return metrics

    def grid(self, trainer, n: int = 8) -> np.ndarray:
        """(H, W, 3) uint8: one row per test pair, input (upscaled by pixel repetition) | output
        | target, and for two-way models the cycle reconstruction F(G(input)) last."""
        x, y = self.inputs[:n], self.targets[:n]
        out = self.outputs(trainer, x)
        columns = [F.interpolate(x, scale_factor=self.scale, mode="nearest"), out, y]
        if trainer.model.two_way:
            columns.append(self.outputs(trainer, out, reverse=True))
        from gm.train.samples import image_grid

        images = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: pair by pair
        return image_grid(images, nrow=len(columns))
