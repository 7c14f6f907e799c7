"""pix2pix (Isola, Zhu, Zhou & Efros, CVPR 2017): image-to-image translation from aligned pairs.

Generator: a U-Net, encoder C64-C128-C256-C512-C512… (4×4 stride-2 convs, LeakyReLU 0.2, BN
but on the first and the innermost layer) down to 1×1, decoder mirrored with skip connections
(ReLU, 4×4 transposed convs, BN, dropout 0.5 in the three innermost decoder layers), tanh out.
Discriminator: the 70×70 PatchGAN on (input, output) concatenated. Loss: GAN + λ_L1 = 100 ×
L1 to the target; Adam 2e-4, β1 = 0.5; D's objective halved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gm.augment import AugmentFields, build_augment, check_augment
from gm.config import check
from gm.models.dcgan import dcgan_init
from gm.models.losses import logistic_d_loss, logistic_g_loss
from gm.models.paired import PairedGAN, PatchGAN
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, OptimConfig, PairSource, Phase

PAPER_OPTIM = OptimConfig(lr=2e-4, betas=(0.5, 0.999))


class UNet(nn.Module):
    def __init__(
        self,
        channels_in: int,
        channels_out: int,
        depth: int,  # stride-2 encoder layers: log2(side) reaches 1×1 (8 at 256², the paper)
        ngf: int = 64,  # first layer's channels; doubled per layer up to 8·ngf
        dropout: float = 0.5,  # in the three innermost decoder layers (the paper's noise)
    ):
        super().__init__()
        widths = [ngf * min(2**i, 8) for i in range(depth)]
        self.down = nn.ModuleList()
        for i, out in enumerate(widths):
            layers: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(0.2)]
            layers.append(nn.Conv2d(widths[i - 1] if i else channels_in, out, 4, 2, 1))
            if 0 < i < depth - 1:
                layers.append(nn.BatchNorm2d(out))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()
        for k, i in enumerate(reversed(range(depth))):  # innermost first
            c_in = widths[i] * (1 if i == depth - 1 else 2)  # skip concatenated below it
            c_out = widths[i - 1] if i else channels_out
            layers = [nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)]
            if i:
                layers.append(nn.BatchNorm2d(c_out))
                if k < 3 and dropout > 0:
                    layers.append(nn.Dropout(dropout))
            else:
                layers.append(nn.Tanh())
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        h = skips.pop()  # (b, 8·ngf, 1, 1) at full depth
        for layer in self.up:
            h = layer(h)
            if skips:
                h = torch.cat([h, skips.pop()], dim=1)
        return h  # (b, channels_out, H, W)


@dataclass(frozen=True)
class Pix2PixConfig(AugmentFields):  # + augment, ada_* (gm.augment)
    ngf: int = 64  # U-Net's first layer
    ndf: int = 64  # PatchGAN's first layer
    depth: int = 0  # U-Net stride-2 layers; 0 = log2(resolution), down to 1×1 as the paper
    d_layers: int = 3  # PatchGAN stride-2 layers: 3 = the paper's 70×70 patches
    dropout: float = 0.5
    lambda_l1: float = 100.0
    optim_g: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)
    optim_d: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)

    def __post_init__(self):
        for name in ("ngf", "ndf", "d_layers"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.depth >= 0, "depth", "must be >= 0 (0: down to 1x1)")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(self.lambda_l1 >= 0, "lambda_l1", "must be >= 0")
        check_augment(self)


class Pix2Pix(PairedGAN):
    def __init__(self, cfg: Pix2PixConfig, info: DataInfo):
        super().__init__()
        depth = cfg.depth or int(math.log2(info.resolution))
        if info.resolution % 2**depth:
            raise ValueError(f"a U-Net of depth {depth} needs a side divisible by {2**depth}")
        self.cfg, self.info = cfg, info
        c = info.channels
        self.G = UNet(c, c, depth, cfg.ngf, cfg.dropout)
        self.D = PatchGAN(2 * c, cfg.ndf, cfg.d_layers, norm="batch")
        dcgan_init(self)  # the paper's N(0, 0.02), inherited from DCGAN
        # the conditional PatchGAN sees (input, output) pairs: both get the same transform
        self.augment = build_augment(cfg)

    def pair_source(self) -> PairSource:
        return PairSource("aligned.parquet", "a", "b")

    def phases(self) -> list[Phase]:
        return [Phase("D", "D"), Phase("G", "G")]

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        a, b = batch.inputs, batch.images
        if phase == "D":
            with torch.no_grad():
                fake = nets["G"](a)
            real_logit = nets["D"](torch.cat(self.augmented_pair(a, b), 1))
            fake_logit = nets["D"](torch.cat(self.augmented_pair(a, fake), 1))
            loss = 0.5 * logistic_d_loss(real_logit, fake_logit)  # the paper halves D's loss
            return loss, self.d_metrics(real_logit, fake_logit)
        fake = nets["G"](a)
        adversarial = logistic_g_loss(nets["D"](torch.cat(self.augmented_pair(a, fake), 1)))
        l1 = F.l1_loss(fake, b)  # on the images themselves, never augmented
        return adversarial + self.cfg.lambda_l1 * l1, {
            "l1": l1.item(),
            "adversarial": adversarial.item(),
        }


@register(
    "pix2pix",
    Pix2PixConfig,
    "Isola et al., CVPR 2017 (pix2pix: U-Net + PatchGAN, aligned pairs)",
    pairs="translation",
)
def build_pix2pix(cfg: Pix2PixConfig, info: DataInfo) -> Pix2Pix:
    return Pix2Pix(cfg, info)
