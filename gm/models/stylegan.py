"""StyleGAN (Karras, Laine & Aila, CVPR 2019).

Mapping network: z (pixel-normalized) → 8 dense layers (learning-rate multiplier 0.01) → w.
Synthesis: a learned constant 4×4 input; two layers per resolution (the first of each finer
resolution upsamples bilinearly and convolves; the 4×4 block's first layer is the constant):
after each, per-pixel noise scaled by a learned per-channel factor, bias, LeakyReLU(0.2), then
AdaIN with a style (scale, bias) = A(w) of that layer. With ``style: demod`` the convolutions
are StyleGAN2's modulated, demodulated ones in place of AdaIN (Karras et al., CVPR 2020,
"Analyzing and Improving the Image Quality of StyleGAN", section 2.2). A 1×1 toRGB per
resolution. Progressive growing as in the paper (from 8×8 by default) or fixed-resolution
training (``growth.progressive: false``); the discriminator is Progressive GAN's.

Style mixing: with probability ``mixing_prob`` a batch uses two latents, w₁ for the layers before
a crossover drawn uniformly from [1, layers) and w₂ from it on. The truncation trick moves w
towards the running mean w̄ (tracked in training, β = 0.995): w' = w̄ + ψ(w − w̄) in the first
``truncation_cutoff`` layers. Loss: non-saturating logistic, with R1 (γ/2·E‖∇D(x)‖²) as a
lazy phase every ``r1_every`` steps, scaled by that interval.
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
    lrelu,
    pixel_norm,
    widths,
)
from gm.models.losses import logistic_d_loss, logistic_g_loss, r1_loss
from gm.models.progan import Architecture, ProDiscriminator, blend_reals, fade
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GANPair, GenerativeModel, OptimConfig, Phase

PAPER_OPTIM = OptimConfig(lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
Style = Literal["adain", "demod"]  # how w enters a synthesis layer (StyleLayer)
# How G doubles its feature maps and a fading level's lower output, and so how the real images
# D sees mid-fade-in are enlarged (Progressive GAN's is nearest): one name keeps them in step
UPSAMPLE = "bilinear"


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, layers: int = 8, lr_mul: float = 0.01):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.layers = nn.ModuleList(
            EqLinear(a, b, lr_mul=lr_mul) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = pixel_norm(z)
        for layer in self.layers:
            x = lrelu(layer(x))
        return x


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """StyleGAN2's modulated convolution (Karras et al., CVPR 2020, section 2.2, eq. 1 and 3).

    ``x``: (B, C_in, H, W); ``weight``: (C_out, C_in, k, k), already scaled (equalized lr);
    ``styles``: (B, C_in), the per-sample scale s of each input channel. The per-sample weight
    w'_ijk = s_i·w_ijk is demodulated to w''_ijk = w'_ijk / √(Σ_ik w'_ijk² + ε), so each output
    channel has unit expected std for unit-std inputs. Computed unfused (scale the input, one
    shared convolution, scale the output), which equals the per-sample grouped convolution and
    keeps the batch a batch (channels_last, AMP, one kernel). Returns (B, C_out, H, W), 'same'
    padding for odd k.
    """
    out = F.conv2d(x * styles[:, :, None, None], weight, padding=weight.shape[-1] // 2)
    if demodulate:  # Σ_ik (s_i w_ijk)² = Σ_i s_i² Σ_k w_ijk², one (B, C_in) @ (C_in, C_out)
        sq = styles.square() @ weight.square().sum((2, 3)).t()
        out = out * torch.rsqrt(sq + eps)[:, :, None, None]
    return out


class StyleLayer(nn.Module):
    """One synthesis layer; ``style`` picks how w enters it.

    ``adain`` (StyleGAN): [upsample + conv] → noise → bias → LeakyReLU → AdaIN(style from w).
    ``demod`` (StyleGAN2, Karras et al. 2020): [upsample] → modulated, demodulated conv (the
    style scales the weights; no instance normalization) → noise → bias → LeakyReLU. The
    constant's layer has no convolution to modulate and keeps its AdaIN in both.
    """

    def __init__(self, c_in: int, c_out: int, w_dim: int, conv: bool = True, up: bool = False,
                 style: Style = "adain"):  # fmt: skip
        super().__init__()
        check_literal(style, Style, "style")
        self.conv = EqConv2d(c_in, c_out, 3) if conv else None
        self.up = up
        self.noise_strength = nn.Parameter(torch.zeros(c_out))  # learned per channel
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.demod = style == "demod" and conv
        if self.demod:  # A: w → one scale per input channel, starting at 1 (StyleGAN2)
            self.style = EqLinear(w_dim, c_in, gain=1.0, bias_init=1.0)
        else:
            self.style = EqLinear(w_dim, 2 * c_out, gain=1.0)
            with torch.no_grad():
                self.style.bias[:c_out] = 1.0  # style scale starts at 1

    def _noise_bias_act(self, x, noise):
        if noise is None:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        x = x + self.noise_strength[None, :, None, None] * noise
        return lrelu(x + self.bias[None, :, None, None])

    def forward(self, x, w, noise=None):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode=UPSAMPLE, align_corners=False)
        if self.demod:
            x = modulated_conv2d(x, self.conv.scaled_weight(), self.style(w))
            return self._noise_bias_act(x, noise)
        if self.conv is not None:  # the conv's own bias is unused: the layer adds its bias
            x = F.conv2d(x, self.conv.scaled_weight(), padding=1)
        x = F.instance_norm(self._noise_bias_act(x, noise), eps=1e-8)
        scale, shift = self.style(w).chunk(2, dim=1)
        return x * scale[:, :, None, None] + shift[:, :, None, None]


def num_layers(level: int) -> int:
    """Style layers up to ``level`` (4×4 = level 0): two per resolution."""
    return 2 * (level + 1)


def mix_styles(w1: torch.Tensor, w2: torch.Tensor, layers: int, crossover: int) -> torch.Tensor:
    """(B, layers, w_dim): w1 for layers [0, crossover), w2 for [crossover, layers)."""
    use_w1 = (torch.arange(layers, device=w1.device) < crossover)[None, :, None]
    return torch.where(use_w1, w1[:, None], w2[:, None])


def truncate(ws: torch.Tensor, w_avg: torch.Tensor, psi: float, cutoff: int) -> torch.Tensor:
    """The truncation trick on (B, layers, w_dim): w̄ + ψ(w − w̄) in layers < cutoff."""
    if psi == 1.0:
        return ws
    layer = torch.arange(ws.shape[1], device=ws.device)[None, :, None]
    return torch.where(layer < cutoff, torch.lerp(w_avg.to(ws.dtype), ws, psi), ws)


class StyleSynthesis(nn.Module):
    def __init__(self, w_dim: int, resolution: int, channels: int, nf, style: Style = "adain"):
        super().__init__()
        n = int(math.log2(resolution)) - 1
        self.const = nn.Parameter(torch.ones(1, nf(4), 4, 4))
        self.layers = nn.ModuleList([StyleLayer(nf(4), nf(4), w_dim, conv=False),
                                     StyleLayer(nf(4), nf(4), w_dim, style=style)])  # fmt: skip
        for i in range(1, n):
            r = 4 * 2**i
            self.layers.append(StyleLayer(nf(r // 2), nf(r), w_dim, up=True, style=style))
            self.layers.append(StyleLayer(nf(r), nf(r), w_dim, style=style))
        self.to_rgb = nn.ModuleList(EqConv2d(nf(4 * 2**i), channels, 1, gain=1.0) for i in range(n))

    def forward(self, ws: torch.Tensor, level: int, alpha: float = 1.0, noise_gen=None,
                noises=None):  # fmt: skip
        """``ws``: (B, layers, w_dim) with at least num_layers(level) layers. ``noises``: the
        per-pixel noise input of each layer, (B or 1, 1, side, side), instead of fresh draws
        (the projector optimizes them, gm.project)."""
        x = self.const.expand(ws.shape[0], -1, -1, -1)
        prev = x
        for i in range(num_layers(level)):
            if i % 2 == 0 and i > 0:
                prev = x
            noise = None
            if noises is not None:
                noise = noises[i]
            elif noise_gen is not None:  # seeded noise inputs (fixed sample grids)
                side = 4 * 2 ** (i // 2)
                noise = torch.randn(ws.shape[0], 1, side, side, generator=noise_gen)
                noise = noise.to(ws.device)
            x = self.layers[i](x, ws[:, i], noise)
        rgb = self.to_rgb[level](x)
        if level > 0 and alpha < 1.0:
            low = self.to_rgb[level - 1](prev)
            rgb = fade(F.interpolate(low, scale_factor=2, mode=UPSAMPLE), rgb, alpha)
        return rgb


class StyleGenerator(nn.Module):
    """``(z, level, alpha) → images``; mapping, mixing and truncation around the synthesis."""

    def __init__(self, cfg: StyleGANConfig, resolution: int, channels: int):
        super().__init__()
        nf = widths(cfg.fmap_base, cfg.fmap_max)
        self.mapping = MappingNetwork(cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.mapping_lr_mul)
        self.synthesis = StyleSynthesis(cfg.w_dim, resolution, channels, nf, cfg.style)
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))
        self.max_layers = num_layers(int(math.log2(resolution)) - 2)

    def forward(self, z, level: int, alpha: float = 1.0, psi: float = 1.0, cutoff: int = 8,
                noise_gen=None, z2=None, crossover: int | None = None):  # fmt: skip
        layers = num_layers(level)
        w = self.mapping(z)
        ws = w[:, None].expand(-1, self.max_layers, -1)
        if z2 is not None and crossover is not None:
            ws = mix_styles(w, self.mapping(z2), self.max_layers, crossover)
        ws = truncate(ws, self.w_avg, psi, cutoff)
        return self.synthesis(ws[:, :layers], level, alpha, noise_gen)


@dataclass(frozen=True)
class StyleGANConfig(AugmentFields):  # + augment, ada_* (gm.augment)
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_mul: float = 0.01
    style: Style = "adain"  # demod: StyleGAN2's weight demodulation
    architecture: Architecture = "orig"  # D's blocks; resnet: residual (StyleGAN2's D)
    fmap_base: int = 16384
    fmap_max: int = 512
    mixing_prob: float = 0.9  # style mixing regularization
    truncation_psi: float = 1.0  # at sampling (grids, evaluation); 0.7 in the paper's figures
    truncation_cutoff: int = 8  # layers truncated (the coarse ones)
    w_avg_beta: float = 0.995
    r1_gamma: float = 10.0
    r1_every: int = 16  # lazy regularization interval (steps)
    mbstd_group: int = 4
    growth: GrowthConfig = field(default_factory=GrowthConfig)  # starts at 8x8 unless set
    optim_g: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)
    optim_d: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)

    def __post_init__(self):
        for name in ("z_dim", "w_dim", "mapping_layers", "fmap_base", "fmap_max", "r1_every"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(0 <= self.mixing_prob <= 1, "mixing_prob", "must be in [0, 1]")
        check(0 <= self.truncation_psi <= 1, "truncation_psi", "must be in [0, 1]")
        check(self.r1_gamma >= 0, "r1_gamma", "must be >= 0")
        check_augment(self)


class StyleGAN(GrowingModel, GANPair):
    ema_modules = ("G",)
    default_start = 8  # "progressive growing from 8x8" (the paper's FFHQ setup)

    def __init__(self, cfg: StyleGANConfig, info: DataInfo):
        GenerativeModel.__init__(self)
        self.cfg, self.info = cfg, info
        self.G = StyleGenerator(cfg, info.resolution, info.channels)
        nf = widths(cfg.fmap_base, cfg.fmap_max)
        self.D = ProDiscriminator(
            info.resolution, info.channels, nf, cfg.mbstd_group, cfg.architecture
        )
        self._init_growth(cfg.growth, info.resolution)
        self.augment = build_augment(cfg)

    def phases(self) -> list[Phase]:
        return [Phase("D", "D"), Phase("Dreg", "D", every=self.cfg.r1_every), Phase("G", "G")]

    def _fake(self, G, b: int, device, level: int, alpha: float) -> torch.Tensor:
        z = torch.randn(b, self.cfg.z_dim, device=device)
        z2 = crossover = None
        if torch.rand(()) < self.cfg.mixing_prob:
            z2 = torch.randn(b, self.cfg.z_dim, device=device)
            crossover = int(torch.randint(1, num_layers(level), ()))
        return G(z, level, alpha, z2=z2, crossover=crossover)

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        level, alpha = int(self.level), float(self.alpha)
        real = blend_reals(batch.images, alpha, UPSAMPLE)  # as G fades
        b, device = real.shape[0], real.device
        G, D = nets["G"], nets["D"]
        if phase == "D":
            with torch.no_grad():
                fake = self._fake(G, b, device, level, alpha)
            d_real = D(self.augmented(real), level, alpha)
            d_fake = D(self.augmented(fake), level, alpha)
            return logistic_d_loss(d_real, d_fake), self.d_metrics(d_real, d_fake)
        if phase == "Dreg":  # R1 on the real images, through the augmentation (as ADA)

            def judge(x):
                return D(self.augmented(x), level, alpha)

            loss, r1 = r1_loss(judge, real, self.cfg.r1_gamma, self.cfg.r1_every)
            return loss, {"r1": r1}
        with torch.no_grad():  # track the mean w for truncation
            w = self.G.mapping(torch.randn(b, self.cfg.z_dim, device=device))
            # the float32 buffer tracks the mapping's output, float16 under AMP
            self.G.w_avg.lerp_(w.mean(0).to(self.G.w_avg.dtype), 1 - self.cfg.w_avg_beta)
        fake = self.augmented(self._fake(G, b, device, level, alpha))
        return logistic_g_loss(D(fake, level, alpha)), {}

    def latent_shape(self):
        return (self.cfg.z_dim,)

    def generator(self, nets=None, psi: float | None = None):
        G = (nets or {}).get("G", self.G)
        psi = self.cfg.truncation_psi if psi is None else psi
        return AtResolution(
            G, int(self.level), float(self.alpha), self.top, psi=psi,
            cutoff=self.cfg.truncation_cutoff,
        )  # fmt: skip

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        G = self.generator(nets)
        device = next(G.parameters()).device
        z = torch.randn(n, self.cfg.z_dim, generator=generator).to(device)
        if generator is not None:
            G.kwargs["noise_gen"] = generator
        return G(z)


@register("stylegan", StyleGANConfig, "Karras, Laine & Aila, CVPR 2019 (StyleGAN)")
def build_stylegan(cfg: StyleGANConfig, info: DataInfo) -> StyleGAN:
    return StyleGAN(cfg, info)
