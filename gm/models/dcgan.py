"""DCGAN (Radford, Metz & Chintala, ICLR 2016) and the conditional GAN built on it
(Mirza & Osindero 2014; projection discriminator: Miyato & Koyama, ICLR 2018).

Generator: z → (1x1 → 4x4 "project and reshape" by a transposed conv) → fractionally strided
convs halving the channels → tanh. At 64x64 with ``ngf=128``: 100 → 4x4x1024 → 8x8x512 →
16x16x256 → 32x32x128 → 64x64x3, the paper's network; other resolutions add or remove blocks
at the coarse end. BatchNorm everywhere but G's output and D's input; ReLU in G, LeakyReLU(0.2)
in D; no hidden fully connected layers; weights N(0, 0.02). Loss: the non-saturating GAN loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from gm.augment import AugmentFields, build_augment, check_augment
from gm.config import check
from gm.models.losses import logistic_d_loss, logistic_g_loss
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GANPair, GenerativeModel, OptimConfig, Phase

PAPER_OPTIM = OptimConfig(lr=2e-4, betas=(0.5, 0.999))


def _check_resolution(resolution: int) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"DCGAN needs a power-of-two resolution >= 8, got {resolution}")


def dcgan_init(module: nn.Module) -> None:
    """The paper's initialisation: conv weights N(0, 0.02); BN scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    def __init__(
        self,
        z_dim: int,  # latent size (100 in the paper)
        resolution: int,  # output side, a power of two >= 8
        channels: int,  # output channels
        ngf: int,  # channels of the last hidden block; 4x4 has ngf * 2**(blocks-1)
        num_classes: int = 0,  # > 0: a label embedding is concatenated to z
        embed_dim: int = 0,  # size of that embedding
    ):
        super().__init__()
        _check_resolution(resolution)
        n_up = int(math.log2(resolution)) - 2  # 4x4 → resolution
        ch = ngf * 2 ** (n_up - 1)
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        cond_dim = embed_dim if num_classes else 0
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim + cond_dim, ch, 4, 1, 0, bias=False),  # (b, ch, 4, 4)
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        for _ in range(n_up - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(z[:, :, None, None])  # (b, channels, res, res)


class DCGANDiscriminator(nn.Module):
    def __init__(
        self,
        resolution: int,  # input side, a power of two >= 8
        channels: int,  # input channels (plus cond_channels)
        ndf: int,  # channels of the first conv; doubled per block
        num_classes: int = 0,  # > 0: the label conditions D (see `conditioning`)
        conditioning: str = "projection",  # projection: + <embed(y), phi(x)>; concat: a label
        # embedding map of `embed_dim` channels concatenated to the image
        embed_dim: int = 0,
    ):
        super().__init__()
        _check_resolution(resolution)
        n_down = int(math.log2(resolution)) - 2
        concat = bool(num_classes) and conditioning == "concat"
        self.embed_map = nn.Embedding(num_classes, embed_dim) if concat else None
        layers: list[nn.Module] = [
            nn.Conv2d(channels + (embed_dim if concat else 0), ndf, 4, 2, 1),  # no BN here
            nn.LeakyReLU(0.2, True),
        ]
        ch = ndf
        for _ in range(n_down - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2, True),
            ]
            ch *= 2
        self.features = nn.Sequential(*layers)  # (b, ch, 4, 4)
        self.out = nn.Conv2d(ch, 1, 4, 1, 0)  # (b, 1, 1, 1)
        projection = bool(num_classes) and conditioning == "projection"
        self.embed = nn.Embedding(num_classes, ch) if projection else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed_map is not None:
            emb = self.embed_map(labels)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, emb], dim=1)
        h = self.features(x)
        logit = self.out(h).flatten()
        if self.embed is not None:
            logit = logit + (self.embed(labels) * h.sum(dim=(2, 3))).sum(dim=1)
        return logit  # (b,)


@dataclass(frozen=True)
class DCGANConfig(AugmentFields):  # + augment, ada_* (gm.augment)
    z_dim: int = 100  # the paper's latent size
    ngf: int = 128  # 64x64 → the paper's 1024-512-256-128 generator
    ndf: int = 128  # D mirrors G
    optim_g: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)
    optim_d: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)

    def __post_init__(self):
        for name in ("z_dim", "ngf", "ndf"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check_augment(self)


@dataclass(frozen=True)
class CGANConfig(DCGANConfig):
    embed_dim: int = 50  # label embedding fed to G (and to D's concat map)
    d_conditioning: Literal["projection", "concat"] = "projection"


class DCGAN(GANPair):
    """Unconditional DCGAN; :class:`ConditionalGAN` adds the label to G and D."""

    ema_modules = ("G",)  # used when the run's ema_beta > 0 (not in the paper; off by default)

    def __init__(self, cfg: DCGANConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.G = DCGANGenerator(cfg.z_dim, info.resolution, info.channels, cfg.ngf)
        self.D = DCGANDiscriminator(info.resolution, info.channels, cfg.ndf)
        dcgan_init(self)
        self.augment = build_augment(cfg)  # None, or buffers only: p is in the state dict

    def phases(self) -> list[Phase]:
        return [Phase("D", "D"), Phase("G", "G")]

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        b = batch.images.shape[0]
        z = torch.randn(b, self.cfg.z_dim, device=batch.images.device)
        if phase == "D":
            with torch.no_grad():
                fake = nets["G"](z, batch.labels)
            real_logit = nets["D"](self.augmented(batch.images), batch.labels)
            fake_logit = nets["D"](self.augmented(fake), batch.labels)
            loss = logistic_d_loss(real_logit, fake_logit)
            return loss, self.d_metrics(real_logit, fake_logit)
        fake = nets["G"](z, batch.labels)
        return logistic_g_loss(nets["D"](self.augmented(fake), batch.labels)), {}

    def latent_shape(self):
        return (self.cfg.z_dim,)

    def generator(self, nets=None):
        return (nets or {}).get("G", self.G)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        G = self.generator(nets)
        device = next(G.parameters()).device
        z = torch.randn(n, self.cfg.z_dim, generator=generator, device="cpu").to(device)
        if labels is None:
            labels = self.labels_for(n, self.info.num_classes, device)
        return G(z, labels.to(device))


class ConditionalGAN(DCGAN):
    """DCGAN networks with the label in G (embedding concatenated to z) and in D (projection
    discriminator, or an embedding map concatenated to the image)."""

    conditional = True

    def __init__(self, cfg: CGANConfig, info: DataInfo):
        GenerativeModel.__init__(self)
        if info.num_classes < 2:
            raise ValueError(f"a conditional GAN needs >= 2 classes, got {info.num_classes}")
        self.cfg, self.info = cfg, info
        self.G = DCGANGenerator(
            cfg.z_dim,
            info.resolution,
            info.channels,
            cfg.ngf,
            num_classes=info.num_classes,
            embed_dim=cfg.embed_dim,
        )
        self.D = DCGANDiscriminator(
            info.resolution,
            info.channels,
            cfg.ndf,
            num_classes=info.num_classes,
            conditioning=cfg.d_conditioning,
            embed_dim=cfg.embed_dim,
        )
        dcgan_init(self)
        self.augment = build_augment(cfg)


@register("dcgan", DCGANConfig, "Radford, Metz & Chintala, ICLR 2016 (DCGAN)")
def build_dcgan(cfg: DCGANConfig, info: DataInfo) -> DCGAN:
    return DCGAN(cfg, info)


@register(
    "cgan",
    CGANConfig,
    "Mirza & Osindero 2014 (conditional GAN); projection D: Miyato & Koyama, ICLR 2018",
)
def build_cgan(cfg: CGANConfig, info: DataInfo) -> ConditionalGAN:
    return ConditionalGAN(cfg, info)
