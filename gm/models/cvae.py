"""Conditional VAE (Sohn, Lee & Yan, NeurIPS 2015; Kingma & Welling, ICLR 2014).

q(z|x,y) = N(mu, diag sigma^2) from a conv encoder fed the image and a label map;
p(z) = N(0, I); p(x|z,y) from a transposed-conv decoder fed z and the label embedding.
Loss: the negative ELBO per image, -E_q[log p(x|z,y)] + KL(q(z|x,y) || p(z)), with one
reparameterized sample. The reconstruction likelihood is configurable:
- ``gaussian``: N(x; mu(z, y), sigma_c^2) with one learned log-sigma per channel;
- ``logistic``: discretized logistic over the 256 levels of x (Salimans et al. 2017), per-pixel
  mean and log-scale, so the loss is a real code length (bits/dim);
- ``bernoulli``: x mapped to [0, 1] as the target of per-pixel Bernoulli logits.

``posterior_flow: {kind: planar | radial | iaf, length: K}`` puts K steps of a normalizing
flow after the Gaussian posterior (Rezende & Mohamed, ICML 2015; IAF: Kingma et al., NeurIPS
2016; :mod:`gm.models.posterior_flows`): z_K = f_K(… f_1(z₀)), and the KL term becomes the
one-sample estimate log q₀(z₀|x) − Σ log|det ∂f_k| − log p(z_K). Length 0 (the default) is the
plain CVAE with its closed-form KL.
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
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GenerativeModel, OptimConfig, Phase

LOG2 = math.log(2.0)


def discretized_logistic_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, bins: int = 256
) -> torch.Tensor:
    """log P(x) per element for x on the grid of ``bins`` levels in [-1, 1]."""
    log_scale = log_scale.clamp(min=-7.0)
    half = 1.0 / (bins - 1)
    centered = x - mean
    inv = torch.exp(-log_scale)
    cdf_plus = torch.sigmoid(inv * (centered + half))
    cdf_minus = torch.sigmoid(inv * (centered - half))
    log_cdf_plus = (inv * (centered + half)) - F.softplus(inv * (centered + half))  # x = -1 edge
    log_one_minus_cdf_minus = -F.softplus(inv * (centered - half))  # x = +1 edge
    mid = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(
        x < -1 + half / 2, log_cdf_plus, torch.where(x > 1 - half / 2, log_one_minus_cdf_minus, mid)
    )


@dataclass(frozen=True)
class PosteriorFlowConfig:
    kind: Literal["planar", "radial", "iaf"] = "planar"
    length: int = 0  # flow steps after the Gaussian posterior; 0: none (the plain CVAE)

    def __post_init__(self):
        check(self.kind in ("planar", "radial", "iaf"), "kind",
              f"{self.kind!r}: must be planar, radial or iaf")  # fmt: skip
        check(0 <= self.length <= 64, "length", f"{self.length}: must be in 0..64")


@dataclass(frozen=True)
class CVAEConfig:
    z_dim: int = 32  # latent size
    width: int = 64  # channels of the first encoder conv; doubled per block
    embed_dim: int = 16  # label embedding size (decoder input, encoder label map)
    likelihood: Literal["gaussian", "logistic", "bernoulli"] = "logistic"
    conditional: bool = True  # False: a plain VAE
    posterior_flow: PosteriorFlowConfig = field(default_factory=PosteriorFlowConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, betas=(0.9, 0.999)))

    def __post_init__(self):
        for name in ("z_dim", "width", "embed_dim"):
            check(getattr(self, name) > 0, name, "must be > 0")


class CVAENet(nn.Module):
    def __init__(self, cfg: CVAEConfig, info: DataInfo):
        super().__init__()
        if info.resolution < 8 or info.resolution & (info.resolution - 1):
            raise ValueError(f"CVAE needs a power-of-two resolution >= 8, got {info.resolution}")
        self.cfg, self.info = cfg, info
        n = int(math.log2(info.resolution)) - 2
        c, e = info.channels, cfg.embed_dim if cfg.conditional else 0
        self.embed = nn.Embedding(max(info.num_classes, 1), cfg.embed_dim) if e else None
        enc: list[nn.Module] = []
        ch_in, ch = c + e, cfg.width
        for _ in range(n):
            enc += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, True)]
            ch_in, ch = ch, ch * 2
        self.encoder = nn.Sequential(*enc)  # (b, ch_in, 4, 4)
        self.to_posterior = nn.Linear(ch_in * 16 + e, 2 * cfg.z_dim)
        self.top = ch_in
        self.from_latent = nn.Linear(cfg.z_dim + e, ch_in * 16)
        dec: list[nn.Module] = []
        ch = ch_in
        for _ in range(n - 1):
            dec += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        out = c * (2 if cfg.likelihood == "logistic" else 1)
        dec += [nn.ConvTranspose2d(ch, out, 4, 2, 1)]
        self.decoder = nn.Sequential(*dec)
        self.log_sigma = nn.Parameter(torch.zeros(c)) if cfg.likelihood == "gaussian" else None
        pf = cfg.posterior_flow
        self.flow = None
        if pf.length > 0:
            from gm.models.posterior_flows import PosteriorFlow

            self.flow = PosteriorFlow(pf.kind, pf.length, cfg.z_dim, ch_in * 16 + e)

    def encode(self, x, labels):
        mu, log_var, _ = self.encode_features(x, labels)
        return mu, log_var

    def encode_features(self, x, labels):
        """(μ, log σ², h): the Gaussian posterior's parameters (B, z_dim) and the features
        (B, H) they are computed from (the posterior flow's context)."""
        e = self.embed(labels) if self.embed is not None else None
        if e is not None:
            x = torch.cat([x, e[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        h = self.encoder(x).flatten(1)
        if e is not None:
            h = torch.cat([h, e], dim=1)
        mu, log_var = self.to_posterior(h).chunk(2, dim=1)
        return mu, log_var.clamp(-30.0, 20.0), h

    def decode(self, z, labels):
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = self.from_latent(z).view(-1, self.top, 4, 4)
        return self.decoder(F.relu(h))  # distribution parameters, (b, c or 2c, res, res)

    def forward(self, x, labels):
        """Per-image (reconstruction NLL, KL) in nats; with a posterior flow the KL is the
        one-sample estimate log q₀(z₀) − Σ log|det| − log p(z_K)."""
        mu, log_var, h = self.encode_features(x, labels)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        if self.flow is None:
            kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
        else:
            from gm.models.posterior_flows import gaussian_log_prob

            log_q0 = gaussian_log_prob(z, mu, log_var)
            z, logdet = self.flow(z, h)
            kl = log_q0 - logdet - gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        params = self.decode(z, labels)
        return -self.log_likelihood(x, params).flatten(1).sum(1), kl

    def log_likelihood(self, x, params):
        lik = self.cfg.likelihood
        if lik == "logistic":
            mean, log_scale = params.chunk(2, dim=1)
            return discretized_logistic_log_prob(x, torch.tanh(mean), log_scale)
        if lik == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, (x + 1) / 2, reduction="none")
        log_sigma = self.log_sigma.view(1, -1, 1, 1)
        return (
            -0.5 * ((x - params) / log_sigma.exp()).pow(2) - log_sigma - 0.5 * math.log(2 * math.pi)
        )

    def mean(self, params):
        """E[x | z, y] in [-1, 1]."""
        lik = self.cfg.likelihood
        if lik == "logistic":
            return torch.tanh(params.chunk(2, dim=1)[0])
        if lik == "bernoulli":
            return torch.sigmoid(params) * 2 - 1
        return params.clamp(-1, 1)


class CVAEDecoder(nn.Module):
    """(z, labels) → E[x | z, y]: the generating half of a trained CVAE."""

    def __init__(self, vae: CVAENet):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.vae.mean(self.vae.decode(z, labels))


class ConditionalVAE(GenerativeModel):
    sampler = "vae"

    def __init__(self, cfg: CVAEConfig, info: DataInfo):
        super().__init__()
        if cfg.conditional and info.num_classes < 2:
            raise ValueError(f"a conditional VAE needs >= 2 classes, got {info.num_classes}")
        self.cfg, self.info = cfg, info
        self.conditional = cfg.conditional
        self.vae = CVAENet(cfg, info)

    def trainable(self):
        return {"vae": self.vae}

    def phases(self):
        return [Phase("elbo", "vae")]

    def optim_config(self, module):
        return self.cfg.optim

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        nll, kl = nets["vae"](batch.images, batch.labels)
        loss = (nll + kl).mean()
        dims = batch.images[0].numel()
        metrics = {"nll": nll.mean().item(), "kl": kl.mean().item()}
        if self.cfg.likelihood == "logistic":  # a true code length in bits per dimension
            metrics["bits_per_dim"] = loss.item() / (dims * LOG2)
        return loss, metrics

    def latent_shape(self):
        return (self.cfg.z_dim,)

    def bits_per_dim(self, batch: Batch):
        """The negative ELBO (an upper bound on -log p(x|y)) per dimension, one z sample;
        a code length only under the discretized logistic likelihood."""
        if self.cfg.likelihood != "logistic":
            return None
        nll, kl = self.vae(batch.images, batch.labels)
        return (nll + kl) / (batch.images[0].numel() * LOG2)

    def generator(self, nets=None):
        return CVAEDecoder((nets or {}).get("vae", self.vae))

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        decoder = self.generator(nets)
        device = next(decoder.parameters()).device
        z = torch.randn(n, self.cfg.z_dim, generator=generator).to(device)
        if labels is None:
            labels = self.labels_for(n, self.info.num_classes, device)
        return decoder(z, labels.to(device))


@register(
    "cvae",
    CVAEConfig,
    "Sohn, Lee & Yan, NeurIPS 2015 (conditional VAE); posterior flows: "
    "Rezende & Mohamed, ICML 2015; Kingma et al., NeurIPS 2016 (IAF)",
)
def build_cvae(cfg: CVAEConfig, info: DataInfo) -> ConditionalVAE:
    return ConditionalVAE(cfg, info)
