"""Adversarial autoencoder (Makhzani et al., ICLR workshop 2016).

A deterministic encoder z = q(x) and a decoder x̂ = p(z) trained in three phases per step,
as in the paper: (1) *reconstruction* in x space, ‖x − p(q(x))‖²; (2) the *discriminator*
D(z) learns to tell prior samples z ~ N(0, I) from codes q(x); (3) *regularization*: the
encoder is updated to fool D, which matches the aggregated posterior q(z) to the prior.
Sampling decodes prior samples. With ``conditional`` the decoder also receives the label
(the paper's supervised AAE: z then carries the style, the label the class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gm.config import check
from gm.models.losses import logistic_d_loss, logistic_g_loss
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GenerativeModel, OptimConfig, Phase


@dataclass(frozen=True)
class AAEConfig:
    z_dim: int = 8  # the paper's MNIST AAE: 8-dimensional Gaussian prior
    width: int = 64  # channels of the first encoder conv, doubled per block
    d_hidden: int = 1000  # the paper's discriminator: two layers of 1000 units
    conditional: bool = False
    embed_dim: int = 16
    optim_ae: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, betas=(0.5, 0.999)))
    optim_d: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.999)))

    def __post_init__(self):
        for name in ("z_dim", "width", "d_hidden", "embed_dim"):
            check(getattr(self, name) > 0, name, "must be > 0")


class AutoEncoder(nn.Module):
    def __init__(self, cfg: AAEConfig, info: DataInfo):
        super().__init__()
        if info.resolution < 8 or info.resolution & (info.resolution - 1):
            raise ValueError(f"AAE needs a power-of-two resolution >= 8, got {info.resolution}")
        n = int(math.log2(info.resolution)) - 2
        enc: list[nn.Module] = []
        ch_in, ch = info.channels, cfg.width
        for _ in range(n):
            enc += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, True)]
            ch_in, ch = ch, ch * 2
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(ch_in * 16, cfg.z_dim))
        e = cfg.embed_dim if cfg.conditional else 0
        self.embed = nn.Embedding(max(info.num_classes, 1), e) if e else None
        self.top = ch_in
        self.from_latent = nn.Linear(cfg.z_dim + e, ch_in * 16)
        dec: list[nn.Module] = []
        ch = ch_in
        for _ in range(n - 1):
            dec += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.BatchNorm2d(ch // 2),
                    nn.ReLU(True)]  # fmt: skip
            ch //= 2
        dec += [nn.ConvTranspose2d(ch, info.channels, 4, 2, 1), nn.Tanh()]
        self.decoder_net = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], 1)
        return self.decoder_net(F.relu(self.from_latent(z).view(-1, self.top, 4, 4)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, part: str = "recon"):
        z = self.encode(x)
        return z if part == "encode" else self.decode(z, labels)


class LatentDiscriminator(nn.Module):
    def __init__(self, z_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.ReLU(True),
            nn.Linear(hidden, hidden), nn.ReLU(True),
            nn.Linear(hidden, 1),
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


class Decoder(nn.Module):
    """(z, labels) → images: the generating half of a trained AAE."""

    def __init__(self, ae: AutoEncoder):
        super().__init__()
        self.ae = ae

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(z, labels)


class AdversarialAutoencoder(GenerativeModel):
    sampler = "ae"

    def __init__(self, cfg: AAEConfig, info: DataInfo):
        super().__init__()
        if cfg.conditional and info.num_classes < 2:
            raise ValueError(f"a conditional AAE needs >= 2 classes, got {info.num_classes}")
        self.cfg, self.info = cfg, info
        self.conditional = cfg.conditional
        self.ae = AutoEncoder(cfg, info)
        self.Dz = LatentDiscriminator(cfg.z_dim, cfg.d_hidden)

    def trainable(self):
        return {"ae": self.ae, "Dz": self.Dz}

    def phases(self):
        return [Phase("recon", "ae"), Phase("Dz", "Dz"), Phase("reg", "ae")]

    def optim_config(self, module):
        return self.cfg.optim_ae if module == "ae" else self.cfg.optim_d

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        x, y = batch.images, batch.labels
        if phase == "recon":
            loss = F.mse_loss(nets["ae"](x, y), x)
            return loss, {}
        if phase == "Dz":
            with torch.no_grad():
                q = nets["ae"](x, y, part="encode")
            p = torch.randn_like(q)
            real, fake = nets["Dz"](p), nets["Dz"](q)
            loss = logistic_d_loss(real, fake)
            return loss, {"D_prior": real.mean().item(), "D_code": fake.mean().item()}
        q = nets["ae"](x, y, part="encode")  # regularization: the encoder fools Dz
        loss = logistic_g_loss(nets["Dz"](q))
        return loss, {"code_mean": q.mean().item(), "code_std": q.std().item()}

    def latent_shape(self):
        return (self.cfg.z_dim,)

    def generator(self, nets=None):
        return Decoder((nets or {}).get("ae", self.ae))

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        decoder = self.generator(nets)
        device = next(decoder.parameters()).device
        z = torch.randn(n, self.cfg.z_dim, generator=generator).to(device)
        if labels is None:
            labels = self.labels_for(n, self.info.num_classes, device)
        return decoder(z, labels.to(device))


@register("aae", AAEConfig, "Makhzani et al., ICLR workshop 2016 (adversarial autoencoder)")
def build_aae(cfg: AAEConfig, info: DataInfo) -> AdversarialAutoencoder:
    return AdversarialAutoencoder(cfg, info)
