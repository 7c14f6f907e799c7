"""DDPM (Ho, Jain & Abbeel, NeurIPS 2020): a U-Net ε-predictor trained with the simple loss
E_{t, x_0, ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖², sampled by ancestral steps or DDIM.

The network is the paper's U-Net in miniature: sinusoidal time embedding → MLP, residual blocks
(GroupNorm, SiLU, the time embedding added per block, dropout), self-attention at the listed
resolutions, strided-conv downsampling and nearest-neighbour upsampling with skip connections.
The schedule and the samplers live in :mod:`gm.diffusion` and hold no parameters.

Class-conditional with classifier-free guidance (Ho & Salimans 2021) when ``conditional``:
the label embedding is added to the time embedding; during training a label is replaced by the
"no class" index with probability ``p_uncond``; sampling mixes the two predictions with weight
``guidance``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gm.config import check
from gm.diffusion import NoiseSchedule, ddim_sample, ddpm_sample, drop_labels, guided
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GenerativeModel, OptimConfig, Phase


@dataclass(frozen=True)
class DDPMConfig:
    width: int = 128  # channels at full resolution (paper, CIFAR-10: 128)
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # per resolution level (paper at 32²)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    timesteps: int = 1000
    schedule: Literal["linear", "cosine"] = "linear"
    conditional: bool = False
    p_uncond: float = 0.1  # classifier-free guidance: label dropout while training
    guidance: float = 0.0  # w at sampling (0: the conditional model alone)
    sampler: Literal["ddpm", "ddim"] = "ddim"  # ddpm: all T ancestral steps
    sample_steps: int = 50  # DDIM steps
    variance: Literal["beta", "posterior"] = "beta"  # ancestral σ_t²
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.9, 0.999), grad_clip=1.0)
    )

    def __post_init__(self):
        check(self.width >= 8 and self.width % 8 == 0, "width", "must be a multiple of 8")
        check(len(self.channel_mult) >= 1, "channel_mult", "needs at least one level")
        check(self.num_res_blocks >= 1, "num_res_blocks", "must be >= 1")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(self.timesteps >= 2, "timesteps", "must be >= 2")
        check(0 <= self.p_uncond < 1, "p_uncond", "must be in [0, 1)")
        check(self.guidance >= 0, "guidance", "must be >= 0")
        check(1 <= self.sample_steps <= self.timesteps, "sample_steps", "must be in 1..timesteps")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps, (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.out = _norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None], v.transpose(1, 2)[:, None]
        )[:, 0]
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """ε_θ(x_t, t, y) at the dataset's resolution."""

    def __init__(self, cfg: DDPMConfig, info: DataInfo):
        super().__init__()
        levels = len(cfg.channel_mult)
        if info.resolution % (2 ** (levels - 1)):
            raise ValueError(
                f"resolution {info.resolution} is not divisible by 2^{levels - 1} "
                f"(channel_mult has {levels} levels)"
            )
        self.cfg, self.info = cfg, info
        w, temb = cfg.width, cfg.width * 4
        self.time = nn.Sequential(nn.Linear(w, temb), nn.SiLU(), nn.Linear(temb, temb))
        # one extra label index: "no class" (classifier-free guidance's unconditional half)
        self.label = nn.Embedding(info.num_classes + 1, temb) if cfg.conditional else None
        self.null_label = info.num_classes
        self.head = nn.Conv2d(info.channels, w, 3, padding=1)
        self.down = nn.ModuleList()
        chans, ch, res = [w], w, info.resolution
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, w * mult, temb, cfg.dropout)])
                ch = w * mult
                if res in cfg.attention_resolutions:
                    block.append(Attention(ch))
                self.down.append(block)
                chans.append(ch)
            if i < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, cfg.dropout), Attention(ch),
                                  ResBlock(ch, ch, temb, cfg.dropout)])  # fmt: skip
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + chans.pop(), w * mult, temb, cfg.dropout)])
                ch = w * mult
                if res in cfg.attention_resolutions:
                    block.append(Attention(ch))
                self.up.append(block)
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))  # fmt: skip
                res *= 2
        self.tail = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, info.channels, 3, padding=1))
        nn.init.zeros_(self.tail[-1].weight)
        nn.init.zeros_(self.tail[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None):
        emb = self.time(timestep_embedding(t, self.cfg.width))
        if self.label is not None:
            if labels is None:
                labels = torch.full_like(t, self.null_label, dtype=torch.long)
            emb = emb + self.label(labels)
        h = self.head(x)
        skips = [h]
        for block in self.down:
            if isinstance(block[0], ResBlock):
                h = block[0](h, emb)
                for extra in block[1:]:
                    h = extra(h)
            else:
                h = block[0](h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = block[0](torch.cat([h, skips.pop()], 1), emb)
                for extra in block[1:]:
                    h = extra(h)
            else:
                h = block[1](block[0](h))
        return self.tail(h)


class DDPMSampler(nn.Module):
    """(z, labels) → images: the deterministic DDIM sampler (η = 0) from the initial noise z,
    what gm exports as the generator (the same z gives the same image). Under torch.export
    its steps are one scan (:func:`gm.diffusion.loop_as_scan`), so the exported graph holds
    the U-Net once; run eagerly they are a Python loop (8x faster than an eager scan)."""

    def __init__(self, model: DDPM, unet: UNet):
        super().__init__()
        self.unet, self.cfg, self.schedule = unet, model.cfg, model.schedule
        self.abar = model.schedule.alphas_cumprod.tolist()  # plain floats: export-friendly

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        eps = _eps_fn(self.unet, self.cfg, labels)
        return ddim_sample(eps, self.schedule, tuple(z.shape), self.cfg.sample_steps, x=z,
                           abar=self.abar, as_scan=torch.compiler.is_exporting())  # fmt: skip


def _eps_fn(unet: UNet, cfg: DDPMConfig, labels: torch.Tensor | None):
    if not cfg.conditional:
        return lambda x, t: unet(x, t)
    return guided(unet, labels, unet.null_label, cfg.guidance)


class DDPM(GenerativeModel):
    sampler = "unet"
    ema_modules = ("unet",)

    def __init__(self, cfg: DDPMConfig, info: DataInfo):
        super().__init__()
        if cfg.conditional and info.num_classes < 2:
            raise ValueError(f"a class-conditional DDPM needs >= 2 classes, got {info.num_classes}")
        self.cfg, self.info = cfg, info
        self.conditional = cfg.conditional
        self.schedule = NoiseSchedule.named(cfg.schedule, cfg.timesteps)
        self.unet = UNet(cfg, info)

    def trainable(self):
        return {"unet": self.unet}

    def phases(self):
        return [Phase("eps", "unet")]

    def optim_config(self, module):
        return self.cfg.optim

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        x0 = batch.images
        n = x0.shape[0]
        t = torch.randint(0, self.cfg.timesteps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.schedule.q_sample(x0, t, noise)
        labels = None
        if self.cfg.conditional:
            labels = drop_labels(batch.labels, self.info.num_classes, self.cfg.p_uncond)
        loss = F.mse_loss(nets["unet"](xt, t, labels), noise)
        return loss, {}

    def latent_shape(self):
        return (self.info.channels, self.info.resolution, self.info.resolution)

    def generator(self, nets=None):
        return DDPMSampler(self, (nets or {}).get("unet", self.unet))

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        unet = (nets or {}).get("unet", self.unet)
        device = next(unet.parameters()).device
        if labels is None and self.conditional:
            labels = self.labels_for(n, self.info.num_classes, device)
        eps = _eps_fn(unet, self.cfg, None if labels is None else labels.to(device))
        shape = (n, *self.latent_shape())
        if self.cfg.sampler == "ddpm":
            return ddpm_sample(eps, self.schedule, shape, generator, self.cfg.variance, device)
        z = torch.randn(shape, generator=generator).to(device)
        return ddim_sample(eps, self.schedule, shape, self.cfg.sample_steps, x=z)


@register("ddpm", DDPMConfig, "Ho, Jain & Abbeel, NeurIPS 2020 (DDPM); Song et al. 2021 (DDIM)")
def build_ddpm(cfg: DDPMConfig, info: DataInfo) -> DDPM:
    return DDPM(cfg, info)
