"""LAPGAN (Denton, Chintala, Szlam & Fergus, NeurIPS 2015): a Laplacian pyramid of GANs.

Levels k = 0 (the top resolution) … K−1 (the coarsest). With the pyramid dataset's images I_k
at each level and u the 2× upsampling (bilinear): l_k = u(I_{k+1}), the real residual
h_k = I_k − l_k. The coarsest generator makes an image from noise (G_{K−1}(z), an MLP as in the
paper's CIFAR-10/STL models); each finer generator makes the residual from a noise plane and
the upsampled coarser image, h̃_k = G_k(z_k, l_k), and D_k judges (h, l) pairs. Sampling runs
the chain coarse to fine: Ĩ_{K−1} = G_{K−1}(z), Ĩ_k = u(Ĩ_{k+1}) + G_k(z_k, u(Ĩ_{k+1})).

Real I_k come from the pyramid dataset's own levels (``Batch.levels``), not from resizing in the
training loop; the levels are independent GANs and train side by side in one run (each with its
own optimizers and phases). The exported generator takes one latent vector: the coarse z
followed by one noise plane per finer level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gm.augment import AugmentFields, build_augment, check_augment
from gm.config import check, check_literal
from gm.models.losses import logistic_d_loss, logistic_g_loss
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GenerativeModel, OptimConfig, Phase

Coarse = Literal["mlp", "conv"]
PAPER_OPTIM = OptimConfig(lr=2e-4, betas=(0.5, 0.999))


def up(x: torch.Tensor) -> torch.Tensor:
    """u: the pyramid's 2× upsampling."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def residuals(levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Real residuals h_k = I_k − u(I_{k+1}) of a pyramid given fine to coarse."""
    return [fine - up(coarse) for fine, coarse in zip(levels[:-1], levels[1:], strict=True)]


def reconstruct(coarsest: torch.Tensor, residuals_coarse_to_fine: list[torch.Tensor]):
    """I_0 from the coarsest image and the residuals, coarse to fine: I_k = u(I_{k+1}) + h_k."""
    x = coarsest
    for h in residuals_coarse_to_fine:
        x = up(x) + h
    return x


class CoarseG(nn.Module):
    def __init__(self, z_dim: int, res: int, channels: int, hidden: int):
        super().__init__()
        self.shape = (channels, res, res)
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.ReLU(True), nn.Linear(hidden, hidden), nn.ReLU(True),
            nn.Linear(hidden, channels * res * res), nn.Tanh(),
        )  # fmt: skip

    def forward(self, z):
        return self.net(z).view(-1, *self.shape)


class CoarseD(nn.Module):
    def __init__(self, res: int, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * res * res, hidden), nn.LeakyReLU(0.2, True),
            nn.Dropout(0.5), nn.Linear(hidden, 1),
        )  # fmt: skip

    def forward(self, x, low=None):
        return self.net(x).flatten()


class ConvCoarseG(nn.Module):
    """``coarse: conv``: a small DCGAN-style generator (Radford et al. 2016) for the coarsest level.

    z (B, z_dim) → dense to (B, W·2ⁿ, 4, 4) → n × [4×4 transposed conv /2, channels halved] → 3×3
    conv → tanh, images (B, C, res, res) with res = 4·2ⁿ; BatchNorm and ReLU after every layer but
    the last. Not the paper's (an MLP), it draws 8×8 images closer to the data at the pipeline's
    budget: docs/training.md, "What more steps buy".
    """

    def __init__(self, z_dim: int, res: int, channels: int, width: int):
        super().__init__()
        n = res.bit_length() - 3  # doublings from 4×4
        self.top = width << n
        self.dense = nn.Sequential(
            nn.Linear(z_dim, self.top * 16), nn.BatchNorm1d(self.top * 16), nn.ReLU(True)
        )
        layers: list[nn.Module] = []
        for k in range(n, 0, -1):
            conv = nn.ConvTranspose2d(width << k, width << (k - 1), 4, 2, 1)
            layers += [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(True)]
        layers += [nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.dense(z).view(-1, self.top, 4, 4))


class ConvCoarseD(nn.Module):
    """``coarse: conv``: images (B, C, res, res) → logits (B,): a 3×3 conv to W channels, n × [4×4
    conv /2, channels doubled] to 4×4, dropout 0.5 and a dense output; LeakyReLU 0.2 between."""

    def __init__(self, res: int, channels: int, width: int):
        super().__init__()
        n = res.bit_length() - 3
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(0.2, True)]
        for k in range(n):
            layers += [nn.Conv2d(width << k, width << (k + 1), 4, 2, 1), nn.LeakyReLU(0.2, True)]
        layers += [nn.Flatten(), nn.Dropout(0.5), nn.Linear((width << n) * 16, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x, low=None):
        return self.net(x).flatten()


class ResidualG(nn.Module):
    """h̃ = G(noise plane, l): three 3×3 convs on [l, z] (the paper's conditional convnet)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, channels, 3, 1, 1),
        )  # fmt: skip

    def forward(self, noise, low):
        return self.net(torch.cat([low, noise], dim=1))


class ResidualD(nn.Module):
    """D(h, l): two convs (the second strided) and a dense output on [h, l]."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels, width, 5, 1, 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, width, 5, 2, 2), nn.LeakyReLU(0.2, True),
        )  # fmt: skip
        self.out = nn.Sequential(nn.Dropout(0.5), nn.Linear(width, 1))

    def forward(self, h, low):
        return self.out(self.net(torch.cat([h, low], dim=1)).mean(dim=(2, 3))).flatten()


@dataclass(frozen=True)
class LAPGANConfig(AugmentFields):  # + augment, ada_* (gm.augment)
    levels: int = 3  # pyramid levels: e.g. 32 → 16 → 8 (the paper's CIFAR-10 model)
    z_dim: int = 100  # noise of the coarsest level
    coarse: Coarse = "mlp"  # coarsest G/D pair: mlp (the paper's) | conv (ConvCoarseG/ConvCoarseD)
    coarse_hidden: int = 600  # width of the coarsest MLPs (coarse: mlp)
    coarse_width: int = 64  # channels at the coarsest level's full resolution (coarse: conv)
    coarse_updates: int = 1  # D and G updates of the coarsest level per step, on the step's batch
    width: int = 128  # channels of the residual convnets
    optim_g: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)
    optim_d: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)

    def __post_init__(self):
        for name in ("levels", "z_dim", "coarse_hidden", "coarse_width", "coarse_updates", "width"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check_literal(self.coarse, Coarse, "coarse")
        check_augment(self)


class LAPGAN(GenerativeModel):
    def __init__(self, cfg: LAPGANConfig, info: DataInfo):
        super().__init__()
        coarsest = info.resolution >> (cfg.levels - 1)
        if coarsest < 4 or info.resolution & (info.resolution - 1):
            raise ValueError(
                f"LAPGAN: {cfg.levels} levels from {info.resolution}x{info.resolution} leave a "
                f"{coarsest}x{coarsest} coarsest level (needs a power of two >= 4)"
            )
        self.cfg, self.info = cfg, info
        self.res = [info.resolution >> k for k in range(cfg.levels)]  # fine to coarse
        c = info.channels
        conv = cfg.coarse == "conv"
        G, D = (ConvCoarseG, ConvCoarseD) if conv else (CoarseG, CoarseD)  # the same signatures
        w = cfg.coarse_width if conv else cfg.coarse_hidden
        nets = {f"G{coarsest}": G(cfg.z_dim, coarsest, c, w), f"D{coarsest}": D(coarsest, c, w)}
        for r in self.res[:-1]:
            nets[f"G{r}"] = ResidualG(c, cfg.width)
            nets[f"D{r}"] = ResidualD(c, cfg.width)
        self.nets = nn.ModuleDict(nets)
        # every level's G has an EMA copy when the run's ema_beta > 0 (not in the paper)
        self.ema_modules = tuple(f"G{r}" for r in self.res)
        # One pipeline (one ADA p, steered by every level's D) for what each D sees: the
        # coarsest images, and at finer levels the image and its low-pass band transformed
        # together, the residual taken after (so a colour shift moves no residual).
        self.augment = build_augment(cfg)

    def trainable(self) -> dict[str, nn.Module]:
        return dict(self.nets.items())

    def phases(self) -> list[Phase]:
        """Coarse to fine, D then G per level; the coarsest pair ``coarse_updates`` times (each
        with fresh noise on the step's real batch: its metrics are the last update's)."""
        pair = [[Phase(f"{m}{r}", f"{m}{r}") for m in "DG"] for r in reversed(self.res)]
        return pair[0] * self.cfg.coarse_updates + [p for ps in pair[1:] for p in ps]

    def optim_config(self, module: str) -> OptimConfig:
        return self.cfg.optim_g if module.startswith("G") else self.cfg.optim_d

    def pyramid_levels(self) -> tuple[int, ...]:
        return tuple(self.res[1:])

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        kind, r = phase[0], int(phase[1:])
        images = {self.res[0]: batch.images, **batch.levels}
        real = images[r]
        b, device = real.shape[0], real.device
        G, D = nets[f"G{r}"], nets[f"D{r}"]
        if r == self.res[-1]:  # coarsest: a plain GAN on images
            low = None
            z = torch.randn(b, self.cfg.z_dim, device=device)
        else:
            low = up(images[r // 2])
            real = real - low  # the real residual h
            z = torch.randn(b, 1, r, r, device=device)

        def fake_of():
            return G(z) if low is None else G(z, low)

        def judge(h):  # D of a residual h (or a coarsest image), through the augmentation
            if low is None or self.augment is None:
                return D(self.augmented(h), low)
            image, band = self.augmented_pair(low + h, low)
            return D(image - band, band)

        if kind == "D":
            with torch.no_grad():
                fake = fake_of()
            d_real, d_fake = judge(real), judge(fake)
            return logistic_d_loss(d_real, d_fake), self.d_metrics(d_real, d_fake)
        return logistic_g_loss(judge(fake_of())), {}

    def latent_shape(self):
        return (self.cfg.z_dim + sum(r * r for r in self.res[:-1]),)

    def generator(self, nets=None):
        return LaplacianSampler(self, {**dict(self.nets.items()), **(nets or {})})

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        G = self.generator(nets)
        device = next(G.parameters()).device
        return G(torch.randn(n, *self.latent_shape(), generator=generator).to(device))


class LaplacianSampler(nn.Module):
    """``(latent, labels) → images``: the coarse-to-fine chain of a LAPGAN's generators."""

    def __init__(self, model: LAPGAN, nets: Mapping[str, nn.Module]):
        super().__init__()
        self.res = list(model.res)
        self.z_dim = model.cfg.z_dim
        self.gens = nn.ModuleDict({f"G{r}": nets[f"G{r}"] for r in self.res})

    def forward(self, latent: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b = latent.shape[0]
        x = self.gens[f"G{self.res[-1]}"](latent[:, : self.z_dim])
        offset = self.z_dim
        for r in reversed(self.res[:-1]):
            x = self.refine(x, latent[:, offset : offset + r * r].reshape(b, 1, r, r))
            offset += r * r
        return x

    def refine(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One level up the chain: images x (B, C, r, r) and a noise plane (B, 1, 2r, 2r) →
        clamp(u(x) + G_2r(noise, u(x)), −1, 1), (B, C, 2r, 2r)."""
        low = up(x)
        return (low + self.gens[f"G{2 * x.shape[-1]}"](noise, low)).clamp(-1, 1)


@register("lapgan", LAPGANConfig, "Denton et al., NeurIPS 2015 (LAPGAN)")
def build_lapgan(cfg: LAPGANConfig, info: DataInfo) -> LAPGAN:
    return LAPGAN(cfg, info)
