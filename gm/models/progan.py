"""Progressive GAN (Karras, Aila, Laine & Lehtinen, ICLR 2018).

G: z (pixel-normalized) → dense to 4×4 → 3×3 conv; then per resolution: nearest upsample and
two 3×3 convs; LeakyReLU(0.2) and pixelwise feature normalization after every conv; a 1×1
toRGB per resolution (linear). D mirrors it: a 1×1 fromRGB per resolution, two 3×3 convs and
2×2 average pooling per block, and at 4×4 the minibatch standard deviation, a 3×3 conv, a 4×4
conv and a dense output. Every layer has an equalized learning rate. Widths
min(fmap_base / resolution, fmap_max): the paper's network is fmap_base 16384, fmap_max 512.

All resolutions' blocks exist from the start (the parameter set never changes); a new block is
faded in: G's output is (1 − α)·upsample(toRGB_prev(x_prev)) + α·toRGB(x), D's input path
(1 − α)·fromRGB_prev(avgpool(img)) + α·block(fromRGB(img)), and the real images D sees are
blended the same way.

Loss (``loss``): ``wgan_gp``, the paper's, is WGAN-GP (λ = 10) with the drift term
ε·E[D(x)²] (ε = 0.001). ``logistic`` is the non-saturating logistic loss with an R1 penalty
γ/2·E‖∇D(x)‖² on the real images (Mescheder et al., ICML 2018), the option the paper's
released code calls ``D_logistic_simplegp`` and the loss StyleGAN kept; here it runs as a lazy
phase every ``r1_every`` steps, scaled by that interval (StyleGAN2's lazy regularization;
``r1_every: 1`` is the released code's every-step form).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gm.augment import AugmentFields, build_augment, check_augment
from gm.config import check, check_literal
from gm.models.growth import (
    AtResolution,
    EqConv2d,
    EqLinear,
    GrowingModel,
    GrowthConfig,
    downsample,
    lrelu,
    minibatch_stddev,
    pixel_norm,
    upsample,
    widths,
)
from gm.models.losses import logistic_d_loss, logistic_g_loss, r1_loss
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GANPair, GenerativeModel, OptimConfig, Phase

PAPER_OPTIM = OptimConfig(lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
SQRT_HALF = math.sqrt(0.5)
Architecture = Literal["orig", "resnet"]  # D: the paper's, or with residual blocks (StyleGAN2)


def _levels(resolution: int) -> int:
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"needs a power-of-two resolution >= 4, got {resolution}")
    return int(math.log2(resolution)) - 1  # 4x4 is level 0


def fade(low: torch.Tensor, high: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 − α)·low + α·high; exactly ``low`` at α = 0 and ``high`` at α = 1."""
    if alpha >= 1.0:
        return high
    dtype = torch.promote_types(low.dtype, high.dtype)  # CUDA autocast upsamples in float32
    return torch.lerp(low.to(dtype), high.to(dtype), alpha)


class ProGenerator(nn.Module):
    def __init__(self, latent: int, resolution: int, channels: int, nf):
        super().__init__()
        n = _levels(resolution)
        self.latent, self.nf4 = latent, nf(4)
        self.dense = EqLinear(latent, nf(4) * 16, gain=math.sqrt(2) / 4)  # the paper's gain
        self.conv4 = EqConv2d(nf(4), nf(4), 3)
        self.blocks = nn.ModuleList(
            nn.ModuleList([EqConv2d(nf(r // 2), nf(r), 3), EqConv2d(nf(r), nf(r), 3)])
            for r in (4 * 2**i for i in range(1, n))
        )
        self.to_rgb = nn.ModuleList(EqConv2d(nf(4 * 2**i), channels, 1, gain=1.0) for i in range(n))

    def forward(self, z: torch.Tensor, level: int, alpha: float = 1.0) -> torch.Tensor:
        x = pixel_norm(lrelu(self.dense(pixel_norm(z)).view(-1, self.nf4, 4, 4)))
        x = pixel_norm(lrelu(self.conv4(x)))
        prev = x
        for conv1, conv2 in self.blocks[:level]:
            prev = x
            x = pixel_norm(lrelu(conv1(upsample(x))))
            x = pixel_norm(lrelu(conv2(x)))
        rgb = self.to_rgb[level](x)
        if level > 0 and alpha < 1.0:
            rgb = fade(upsample(self.to_rgb[level - 1](prev)), rgb, alpha)
        return rgb


class ProDiscriminator(nn.Module):
    """The Progressive GAN discriminator, (B, C, H, W) images at ``level`` → logits (B,).

    ``architecture: resnet`` gives every block a residual connection, StyleGAN2's D (Karras et
    al., CVPR 2020, figure 7c): out = (block(x) + skip(downsample(x)))/√2 with ``skip`` a
    linear 1×1 convolution without bias; ``orig`` is the paper's plain chain of blocks."""

    def __init__(self, resolution: int, channels: int, nf, mbstd_group: int = 4,
                 architecture: Architecture = "orig"):  # fmt: skip
        super().__init__()
        check_literal(architecture, Architecture, "architecture")
        n = _levels(resolution)
        self.mbstd_group = mbstd_group
        self.from_rgb = nn.ModuleList(EqConv2d(channels, nf(4 * 2**i), 1) for i in range(n))
        above_4 = [4 * 2**i for i in range(1, n)]  # the resolutions a block takes down by 2
        self.blocks = nn.ModuleList(  # blocks[i-1] takes level i down to level i-1
            nn.ModuleList([EqConv2d(nf(r), nf(r), 3), EqConv2d(nf(r), nf(r // 2), 3)])
            for r in above_4
        )
        self.skips = None
        if architecture == "resnet":
            self.skips = nn.ModuleList(
                EqConv2d(nf(r), nf(r // 2), 1, gain=1.0, bias=False) for r in above_4
            )
        self.conv4 = EqConv2d(nf(4) + 1, nf(4), 3)
        self.conv4x4 = EqConv2d(nf(4), nf(4), 4, padding=0)
        self.out = EqLinear(nf(4), 1, gain=1.0)

    def forward(self, img: torch.Tensor, level: int, alpha: float = 1.0) -> torch.Tensor:
        x = lrelu(self.from_rgb[level](img))
        for i in range(level, 0, -1):
            conv1, conv2 = self.blocks[i - 1]
            y = downsample(lrelu(conv2(lrelu(conv1(x)))))
            if self.skips is not None:
                y = (y + self.skips[i - 1](downsample(x))) * SQRT_HALF
            x = y
            if i == level and alpha < 1.0:
                x = fade(lrelu(self.from_rgb[i - 1](downsample(img))), x, alpha)
        x = minibatch_stddev(x, self.mbstd_group)
        x = lrelu(self.conv4x4(lrelu(self.conv4(x))))
        return self.out(x.flatten(1)).flatten()  # (b,)


@dataclass(frozen=True)
class ProGANConfig(AugmentFields):  # + augment, ada_* (gm.augment)
    latent: int = 512
    fmap_base: int = 16384  # channels at a resolution: min(fmap_base / res, fmap_max)
    fmap_max: int = 512
    loss: Literal["wgan_gp", "logistic"] = "wgan_gp"  # logistic: non-saturating + lazy R1
    architecture: Architecture = "orig"  # D's blocks; resnet: residual (StyleGAN2)
    gp_lambda: float = 10.0  # wgan_gp only
    drift: float = 0.001  # wgan_gp only: ε of the drift term ε·E[D(real)²]
    r1_gamma: float = 10.0  # logistic only
    r1_every: int = 16  # logistic only: lazy regularization interval (steps)
    mbstd_group: int = 4
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    optim_g: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)
    optim_d: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)

    def __post_init__(self):
        for name in ("latent", "fmap_base", "fmap_max", "mbstd_group", "r1_every"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.gp_lambda >= 0 and self.drift >= 0, "gp_lambda", "penalties must be >= 0")
        check(self.r1_gamma >= 0, "r1_gamma", "must be >= 0")
        check_augment(self)


def blend_reals(images: torch.Tensor, alpha: float, mode: str = "nearest") -> torch.Tensor:
    """The real images D sees while a level fades in: the level below (2×2 mean), upsampled by
    ``mode`` as G upsamples its lower output (Progressive GAN nearest, StyleGAN bilinear), mixed
    with the current level like G's output. (B, C, H, W) → the same shape."""
    if alpha >= 1.0:
        return images
    low = F.interpolate(downsample(images), scale_factor=2, mode=mode)
    return fade(low, images, alpha)


def wgan_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """WGAN's generator loss −E[D(G(z))] from the critic's scores of G's samples (a scalar)."""
    return -d_fake.mean()


def gradient_penalty(D, real, fake, level, alpha) -> torch.Tensor:
    """WGAN-GP: E[(‖∇D(x̂)‖ − 1)²] on random interpolates x̂ of real and fake images."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    # under AMP, G's output is float16 and the real images float32: mix in float32
    x = torch.lerp(real.float(), fake.float(), eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x, level, alpha).sum(), x, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


class ProGAN(GrowingModel, GANPair):
    ema_modules = ("G",)  # the paper samples from an EMA of G (run.ema_beta: 0.999)

    def __init__(self, cfg: ProGANConfig, info: DataInfo):
        GenerativeModel.__init__(self)
        self.cfg, self.info = cfg, info
        nf = widths(cfg.fmap_base, cfg.fmap_max)
        self.G = ProGenerator(cfg.latent, info.resolution, info.channels, nf)
        self.D = ProDiscriminator(
            info.resolution, info.channels, nf, cfg.mbstd_group, cfg.architecture
        )
        self._init_growth(cfg.growth, info.resolution)
        self.augment = build_augment(cfg)

    def phases(self) -> list[Phase]:
        if self.cfg.loss == "logistic":
            return [Phase("D", "D"), Phase("Dreg", "D", every=self.cfg.r1_every), Phase("G", "G")]
        return [Phase("D", "D"), Phase("G", "G")]

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        level, alpha = int(self.level), float(self.alpha)
        if batch.images.shape[-1] != self.resolution:
            raise ValueError(
                f"batch of {batch.images.shape[-1]}x{batch.images.shape[-1]} images at the "
                f"{self.resolution}x{self.resolution} phase"
            )
        G, D = nets["G"], nets["D"]
        real = blend_reals(batch.images, alpha)
        if phase == "Dreg":  # logistic only: R1 on the real images D is shown

            def judge(x):
                return D(self.augmented(x), level, alpha)

            loss, r1 = r1_loss(judge, real, self.cfg.r1_gamma, self.cfg.r1_every)
            return loss, {"r1": r1}
        z = torch.randn(real.shape[0], self.cfg.latent, device=real.device)
        if phase == "D":
            real = self.augmented(real)
            with torch.no_grad():
                fake = G(z, level, alpha)
            fake = self.augmented(fake)
            d_loss = self._d_logistic if self.cfg.loss == "logistic" else self._d_wgan_gp
            return d_loss(D, real, fake, level, alpha)
        g_loss = logistic_g_loss if self.cfg.loss == "logistic" else wgan_g_loss
        return g_loss(D(self.augmented(G(z, level, alpha)), level, alpha)), {}

    def _d_logistic(self, D, real, fake, level: int, alpha: float):
        d_real, d_fake = D(real, level, alpha), D(fake, level, alpha)
        return logistic_d_loss(d_real, d_fake), self.d_metrics(d_real, d_fake)

    def _d_wgan_gp(self, D, real, fake, level: int, alpha: float):
        d_real, d_fake = D(real, level, alpha), D(fake, level, alpha)
        gp = gradient_penalty(D, real, fake, level, alpha)  # between what D was shown
        loss = (
            d_fake.mean()
            - d_real.mean()
            + self.cfg.gp_lambda * gp
            + self.cfg.drift * d_real.pow(2).mean()
        )
        extra = {"wdist": (d_real.mean() - d_fake.mean()).item(), "gp": gp.item()}
        # ADA's sign(D(real)) for a critic, whose outputs have no fixed origin: measured from
        # the mean fake score (r_t = 1: every real image scored above it)
        self.observe_real(d_real - d_fake.mean().detach(), extra)
        return loss, extra

    def latent_shape(self):
        return (self.cfg.latent,)

    def generator(self, nets=None):
        G = (nets or {}).get("G", self.G)
        return AtResolution(G, int(self.level), float(self.alpha), self.top)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        G = self.generator(nets)
        device = next(G.parameters()).device
        z = torch.randn(n, self.cfg.latent, generator=generator).to(device)
        return G(z)


@register("progan", ProGANConfig, "Karras et al., ICLR 2018 (Progressive GAN)")
def build_progan(cfg: ProGANConfig, info: DataInfo) -> ProGAN:
    return ProGAN(cfg, info)
