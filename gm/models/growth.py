"""Building blocks of the progressively grown GANs (Karras et al., ICLR 2018 and CVPR 2019):
equalized-learning-rate layers, pixelwise feature normalization, minibatch standard deviation,
the per-resolution channel widths, and the growth schedule in images.

Schedule: the start resolution is trained for ``stable_images``; each next resolution is faded
in over ``fade_images`` (alpha rising linearly from 0 to 1 with the images seen by all
workers), then stabilized for ``stable_images``; the last resolution trains until the run's
step budget ends. Batch size, learning rate and the two image budgets can be set per
resolution (``per_resolution``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gm.config import check
from gm.train.protocol import Growth


class EqLinear(nn.Module):
    """Dense layer with equalized learning rate: weights N(0, 1/lr_mul²) scaled at run time by
    gain/√fan_in · lr_mul (He's constant), so every layer learns at the same speed."""

    def __init__(self, fan_in: int, out: int, gain: float = math.sqrt(2), lr_mul: float = 1.0,
                 bias_init: float = 0.0):  # fmt: skip
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, fan_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((out,), float(bias_init) / lr_mul))
        self.scale, self.lr_mul = gain / math.sqrt(fan_in) * lr_mul, lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqConv2d(nn.Module):
    """Convolution ('same' padding unless given) with equalized learning rate."""

    def __init__(self, c_in: int, c_out: int, k: int, gain: float = math.sqrt(2),
                 padding: int | None = None, bias: bool = True):  # fmt: skip
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale = gain / math.sqrt(c_in * k * k)
        self.padding = k // 2 if padding is None else padding

    def scaled_weight(self) -> torch.Tensor:
        """The weight as applied, (c_out, c_in, k, k): the stored N(0, 1) one times He's
        constant (the equalized learning rate)."""
        return self.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.scaled_weight(), self.bias, padding=self.padding)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalize each pixel's feature vector to unit average square (ProGAN §4.2)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append one feature map: the standard deviation of each feature over a group of samples,
    averaged over features and pixels (ProGAN §3). Groups are the largest size <= group_size
    that divides the batch."""
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, b) + 1) if b % d == 0)
    y = x.reshape(g, -1, c, h, w)  # sample i belongs to group i % (b // g)
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (b/g, c, h, w)
    stat = std.mean(dim=(1, 2, 3))  # (b/g,)
    stat = stat.repeat(g)[:, None, None, None].expand(b, 1, h, w)
    return torch.cat([x, stat], dim=1)


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def widths(fmap_base: int, fmap_max: int, fmap_min: int = 1):
    """Channels at a resolution: min(fmap_base / resolution, fmap_max), the paper's table with
    fmap_base 16384 and fmap_max 512 (4–32: 512, 64: 256, …, 1024: 16)."""
    return lambda res: int(max(min(fmap_base // res, fmap_max), fmap_min))


@dataclass(frozen=True)
class LevelSettings:
    """Overrides for one resolution of the schedule (0 / -1: the schedule's value)."""

    batch_size: int = 0  # per worker; 0: the run's batch size
    lr: float = 0.0  # every module's learning rate; 0: the family's
    fade_images: int = -1  # -1: the schedule's
    stable_images: int = -1

    def __post_init__(self):
        check(self.batch_size >= 0, "batch_size", "must be >= 0 (0: the run's)")
        check(self.lr >= 0, "lr", "must be >= 0 (0: the family's)")
        check(self.fade_images >= -1 and self.stable_images >= -1, "images", "must be >= -1")


@dataclass(frozen=True)
class GrowthConfig:
    progressive: bool = True  # false: train at the top resolution from the start
    start_resolution: int = 0  # 0: the family's (Progressive GAN 4, StyleGAN 8, as the papers)
    fade_images: int = 800_000  # the paper's 800k real images per fade-in ...
    stable_images: int = 800_000  # ... and per stabilization
    reset_optimizers: bool = False  # fresh Adam state at each new phase
    per_resolution: dict[int, LevelSettings] = field(default_factory=dict)

    def __post_init__(self):
        r = self.start_resolution
        check(r == 0 or (r >= 4 and r & (r - 1) == 0), "start_resolution",
              f"{r} is not 0 or a power of two >= 4")  # fmt: skip
        check(self.fade_images >= 0 and self.stable_images >= 0, "images", "must be >= 0")
        for res in self.per_resolution:
            check(res >= 4 and res & (res - 1) == 0, f"per_resolution.{res}", "not a resolution")


def schedule(cfg: GrowthConfig, top: int, default_start: int = 4) -> list[tuple[Growth, int]]:
    """[(phase, images in it)] from the start resolution to ``top``; the last phase's count is
    its nominal length (it runs until the budget ends)."""
    if not cfg.progressive:
        return []
    start = cfg.start_resolution or min(default_start, top)
    if start > top:
        raise ValueError(f"growth.start_resolution {start} > resolution {top}")
    phases: list[tuple[Growth, int]] = []
    res = start
    while res <= top:
        lv = cfg.per_resolution.get(res, LevelSettings())
        fade = cfg.fade_images if lv.fade_images < 0 else lv.fade_images
        stable = cfg.stable_images if lv.stable_images < 0 else lv.stable_images
        common = {
            "resolution": res,
            "batch_size": lv.batch_size or None,
            "lr": lv.lr or None,
            "reset_optimizers": cfg.reset_optimizers,
        }
        if res > start and fade > 0:
            phases.append((Growth(len(phases), alpha=0.0, **common), fade))
        phases.append((Growth(len(phases), alpha=1.0, **common), stable))
        res *= 2
    return phases


def growth_at(phases: list[tuple[Growth, int]], images_seen: int) -> Growth | None:
    """The phase (with its alpha) at ``images_seen``."""
    if not phases:
        return None
    start = 0
    for i, (g, n) in enumerate(phases):
        if images_seen < start + n or i == len(phases) - 1:
            if g.alpha < 1.0:  # fading in: alpha rises linearly over the phase's images
                alpha = min((images_seen - start) / n, 1.0)
                return Growth(g.index, g.resolution, alpha, g.batch_size, g.lr, g.reset_optimizers)
            return g
        start += n
    raise AssertionError("unreachable")


class GrowingModel(nn.Module):
    """Mixin of a family grown across resolutions: keeps the current level (0 = the start
    resolution's 4×4 block counted from 4×4) and fade-in alpha as buffers, so checkpoints hold
    them and a resumed run continues at the same resolution and alpha."""

    unused_parameters = True  # blocks above the current resolution get no gradient

    default_start = 4  # the paper's first resolution

    def _init_growth(self, cfg: GrowthConfig, top: int) -> None:
        self.top = top
        self.phases_ = schedule(cfg, top, self.default_start)
        start = self.phases_[0][0].resolution if self.phases_ else top
        self.register_buffer("level", torch.tensor(int(math.log2(start)) - 2))
        self.register_buffer("alpha", torch.tensor(1.0))

    def growth(self, images_seen: int) -> Growth | None:
        return growth_at(self.phases_, images_seen)

    def schedule_phases(self) -> list[Growth]:
        return [g for g, _ in self.phases_]

    def on_progress(self, step: int, images_seen: int) -> None:
        g = self.growth(images_seen)
        if g is not None:
            self.level.fill_(int(math.log2(g.resolution)) - 2)
            self.alpha.fill_(g.alpha)

    @property
    def resolution(self) -> int:
        return 4 * 2 ** int(self.level)

    def to_top(self, images: torch.Tensor) -> torch.Tensor:
        """Images of the current resolution shown at the top one (nearest neighbour)."""
        f = self.top // images.shape[-1]
        return images if f == 1 else F.interpolate(images, scale_factor=f, mode="nearest")


class AtResolution(nn.Module):
    """The exported generator: ``(z, labels) → images`` at the top resolution in [-1, 1], with
    the level and alpha it was trained to so far."""

    def __init__(self, G: nn.Module, level: int, alpha: float, top: int, **kwargs):
        super().__init__()
        self.G, self.level, self.alpha, self.top, self.kwargs = G, level, alpha, top, kwargs

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.G(z, self.level, self.alpha, **self.kwargs)
        f = self.top // (4 * 2**self.level)
        if f > 1:
            x = F.interpolate(x, scale_factor=f, mode="nearest")
        return x.clamp(-1, 1)
