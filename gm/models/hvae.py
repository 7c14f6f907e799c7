"""A hierarchical VAE in the style of NVAE (Vahdat & Kautz, NeurIPS 2020).

- **Bidirectional encoder**: a bottom-up residual tower reads x and leaves a feature map per
  latent group; the top-down tower (shared by inference and generation) starts from a learned
  constant at the coarsest scale and, group by group, forms the prior p(z_l | z_<l) from its
  state and the posterior q(z_l | x, z_<l) from its state and the matching bottom-up feature,
  in NVAE's residual form q = N(μ_p + Δμ, σ_p · Δσ). z_l is added back into the state.
- **Several scales**: ``groups_per_scale`` latent groups at each of ``scales`` resolutions
  (R/2, R/4, … of the image resolution R), nearest-neighbour upsampling between them.
- **Residual cells**: BatchNorm → Swish → 3×3 conv → BatchNorm → Swish → 3×3 conv →
  squeeze-and-excitation, added to the input.
- **KL warm-up**: the KL term is weighted by β rising linearly from 0 to 1 over
  ``kl_warmup_steps`` (the reported bits/dim always uses β = 1: the true bound).
- **Likelihood**: a discretized logistic mixture (Salimans et al. 2017) with ``mixtures``
  components per pixel; the colour channels are independent given the mixture component
  (NVAE and PixelCNN++ also condition each channel's mean on the previous channels).

Loss per image: −E_q[log p(x | z)] + β Σ_l KL(q(z_l | ·) ‖ p(z_l | ·)), in nats; bits/dim is the
negative ELBO per dimension in bits, an upper bound on the code length of the 8-bit image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gm.config import check
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GenerativeModel, OptimConfig, Phase

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class HVAEConfig:
    width: int = 64  # channels of every cell (NVAE: 128–256 at its smaller scales)
    z_channels: int = 8  # channels of each latent group (NVAE: 20)
    scales: int = 2  # latent scales: R/2, R/4, ...
    groups_per_scale: int = 2  # latent groups at each scale (NVAE: up to 10–20)
    mixtures: int = 5  # discretized logistic mixture components (NVAE: 10)
    kl_warmup_steps: int = 1000  # β: 0 → 1 over these steps (NVAE: 30% of training)
    temperature: float = 1.0  # prior std multiplier when sampling
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, betas=(0.9, 0.999), grad_clip=200.0)
    )

    def __post_init__(self):
        for name in ("width", "z_channels", "scales", "groups_per_scale", "mixtures"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.kl_warmup_steps >= 0, "kl_warmup_steps", "must be >= 0")
        check(self.temperature > 0, "temperature", "must be > 0")


class SE(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        hidden = max(ch // 16, 4)
        self.net = nn.Sequential(nn.Linear(ch, hidden), nn.ReLU(), nn.Linear(hidden, ch))

    def forward(self, x):
        return x * torch.sigmoid(self.net(x.mean((2, 3))))[:, :, None, None]


class Cell(nn.Module):
    """NVAE's residual cell."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            nn.BatchNorm2d(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), SE(ch),
        )  # fmt: skip

    def forward(self, x):
        return x + 0.1 * self.body(x)


def gaussian_kl(mu_q, logs_q, mu_p, logs_p) -> torch.Tensor:
    """KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) per image, summed over dimensions (nats)."""
    kl = (
        logs_p - logs_q + (torch.exp(2 * logs_q) + (mu_q - mu_p) ** 2) / (2 * torch.exp(2 * logs_p))
    )
    return (kl - 0.5).flatten(1).sum(1)


def _log_normal(z, mu, log_s) -> torch.Tensor:
    """log N(z; μ, σ²) per image without the 2π constant (it cancels in p/q ratios)."""
    return (-0.5 * ((z - mu) / torch.exp(log_s)) ** 2 - log_s).flatten(1).sum(1)


def dmol_log_prob(x: torch.Tensor, params: torch.Tensor, mixtures: int) -> torch.Tensor:
    """log P(x) per image under a discretized logistic mixture over the 256 levels of x in
    [−1, 1]; ``params``: (B, K·(1 + 2C), H, W) = mixture logits, then K means and K log-scales
    per channel."""
    b, c, h, w = x.shape
    k = mixtures
    logits = params[:, :k]
    means = params[:, k : k + k * c].reshape(b, k, c, h, w)
    log_scales = params[:, k + k * c :].reshape(b, k, c, h, w).clamp(min=-7.0)
    xk = x[:, None]
    half = 1.0 / 255.0
    inv = torch.exp(-log_scales)
    plus, minus = inv * (xk - means + half), inv * (xk - means - half)
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    log_cdf_plus = plus - F.softplus(plus)  # x = −1: the mass of (−∞, −1 + half]
    log_one_minus = -F.softplus(minus)  # x = +1: the mass of [1 − half, ∞)
    # the middle bins; in the far tails a density-times-width approximation keeps gradients
    mid_in = inv * (xk - means)
    log_pdf_mid = mid_in - log_scales - 2 * F.softplus(mid_in)
    mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                      log_pdf_mid + math.log(2 * half))  # fmt: skip
    log_probs = torch.where(xk < -0.999, log_cdf_plus, torch.where(xk > 0.999, log_one_minus, mid))
    per_component = log_probs.sum(2) + F.log_softmax(logits, 1)  # (B, K, H, W)
    return torch.logsumexp(per_component, 1).flatten(1).sum(1)


def dmol_mean(params: torch.Tensor, mixtures: int, channels: int) -> torch.Tensor:
    """E[x] under the mixture (each logistic's mean, weighted by the component's weight),
    clamped to [−1, 1]: the deterministic image of the likelihood parameters."""
    b, _, h, w = params.shape
    k = mixtures
    weights = F.softmax(params[:, :k], 1)[:, :, None]
    means = params[:, k : k + k * channels].reshape(b, k, channels, h, w)
    return (weights * means).sum(1).clamp(-1, 1)


class HierarchicalVAE(nn.Module):
    def __init__(self, cfg: HVAEConfig, info: DataInfo):
        super().__init__()
        top = info.resolution // 2**cfg.scales
        if top < 1 or info.resolution % 2**cfg.scales:
            raise ValueError(f"resolution {info.resolution} is too small for {cfg.scales} scales")
        self.cfg, self.info, self.top = cfg, info, top
        w, zc = cfg.width, cfg.z_channels
        n = cfg.scales * cfg.groups_per_scale
        self.stem = nn.Sequential(nn.Conv2d(info.channels, w, 3, padding=1), Cell(w),
                                  nn.Conv2d(w, w, 3, stride=2, padding=1))  # fmt: skip
        self.up_cells = nn.ModuleList([Cell(w) for _ in range(n)])  # bottom-up, fine → coarse
        self.up_down = nn.ModuleList([nn.Conv2d(w, w, 3, stride=2, padding=1)
                                      for _ in range(cfg.scales - 1)])  # fmt: skip
        self.h0 = nn.Parameter(torch.zeros(1, w, top, top))
        self.prior = nn.ModuleList([nn.Conv2d(w, 2 * zc, 3, padding=1) for _ in range(n)])
        self.posterior = nn.ModuleList([nn.Conv2d(2 * w, 2 * zc, 3, padding=1) for _ in range(n)])
        self.from_z = nn.ModuleList([nn.Conv2d(zc, w, 1) for _ in range(n)])
        self.down_cells = nn.ModuleList([Cell(w) for _ in range(n)])
        self.upsample = nn.ModuleList([nn.Conv2d(w, w, 3, padding=1) for _ in range(cfg.scales)])
        out_ch = cfg.mixtures * (1 + 2 * info.channels)
        self.out = nn.Sequential(Cell(w), nn.SiLU(), nn.Conv2d(w, out_ch, 3, padding=1))
        for conv in (*self.prior, *self.posterior):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One feature per latent group, in top-down order (coarsest first)."""
        g = self.cfg.groups_per_scale
        h, feats = self.stem(x), []
        for s in range(self.cfg.scales):
            for i in range(g):
                h = self.up_cells[s * g + i](h)
                feats.append(h)
            if s < self.cfg.scales - 1:
                h = self.up_down[s](h)
        return feats[::-1]

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """Shape of each latent group, in top-down order."""
        out = []
        for s in range(self.cfg.scales):
            res = self.top * 2**s
            out += [(self.cfg.z_channels, res, res)] * self.cfg.groups_per_scale
        return out

    def top_down(
        self,
        feats: list[torch.Tensor] | None,
        n: int,
        temperature: float = 1.0,
        noise: list[torch.Tensor] | None = None,
        log_ratio: bool = False,
    ):
        """(likelihood parameters, KL per image). With ``feats`` (inference): z from the
        posteriors; without: z_l = μ_p + T σ_p ε_l from the priors, ε_l from ``noise``
        (sampling; KL is then zero). ``log_ratio``: also log p(z) − log q(z | x) at the
        sampled z (up to the constants that cancel), for importance weighting."""
        h = self.h0.expand(n, -1, -1, -1)
        kl = self.h0.new_zeros(n)
        ratio = self.h0.new_zeros(n)
        g = self.cfg.groups_per_scale
        for s in range(self.cfg.scales):
            for i in range(g):
                j = s * g + i
                mu_p, logs_p = self.prior[j](h).chunk(2, 1)
                logs_p = logs_p.clamp(-7, 5)
                if feats is not None:
                    d_mu, d_logs = self.posterior[j](torch.cat([h, feats[j]], 1)).chunk(2, 1)
                    mu_q, logs_q = mu_p + d_mu, logs_p + d_logs.clamp(-7, 5)
                    z = mu_q + torch.exp(logs_q) * torch.randn_like(mu_q)
                    kl = kl + gaussian_kl(mu_q, logs_q, mu_p, logs_p)
                    if log_ratio:
                        ratio = ratio + _log_normal(z, mu_p, logs_p) - _log_normal(z, mu_q, logs_q)
                else:
                    z = mu_p + temperature * torch.exp(logs_p) * noise[j]
                h = self.down_cells[j](h + self.from_z[j](z))
            h = self.upsample[s](F.interpolate(h, scale_factor=2, mode="nearest"))
        return (self.out(h), kl, ratio) if log_ratio else (self.out(h), kl)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (reconstruction NLL, KL) in nats, one posterior sample."""
        params, kl = self.top_down(self.bottom_up(x), x.shape[0])
        return -dmol_log_prob(x, params, self.cfg.mixtures), kl


class HVAEDecoder(nn.Module):
    """(z, labels) → images: z (flat, N(0, I)) is the noise of every latent group, top-down;
    the image is the likelihood's mixture mean."""

    def __init__(self, net: HierarchicalVAE, temperature: float):
        super().__init__()
        self.net, self.temperature = net, temperature

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        noise, start = [], 0
        for shape in self.net.latent_shapes():
            size = math.prod(shape)
            noise.append(z[:, start : start + size].reshape(-1, *shape))
            start += size
        params, _ = self.net.top_down(None, z.shape[0], self.temperature, noise)
        return dmol_mean(params, self.net.cfg.mixtures, self.net.info.channels)


class HVAE(GenerativeModel):
    sampler = "vae"

    def __init__(self, cfg: HVAEConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.vae = HierarchicalVAE(cfg, info)
        self.register_buffer("beta", torch.tensor(0.0 if cfg.kl_warmup_steps else 1.0))

    def trainable(self):
        return {"vae": self.vae}

    def phases(self):
        return [Phase("elbo", "vae")]

    def optim_config(self, module):
        return self.cfg.optim

    def on_progress(self, step: int, images_seen: int) -> None:
        w = self.cfg.kl_warmup_steps
        self.beta.fill_(min(1.0, step / w) if w else 1.0)

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        nll, kl = nets["vae"](batch.images)
        dims = batch.images[0].numel()
        loss = (nll + self.beta * kl).mean()
        bpd = (nll + kl).mean().item() / (dims * LOG2)
        return loss, {"nll": nll.mean().item(), "kl": kl.mean().item(),
                      "beta": self.beta.item(), "bits_per_dim": bpd}  # fmt: skip

    def bits_per_dim(self, batch: Batch):
        """The negative ELBO (β = 1) per dimension in bits, one posterior sample."""
        nll, kl = self.vae(batch.images)
        return (nll + kl) / (batch.images[0].numel() * LOG2)

    def log_likelihood_bounds(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of k ELBO samples, the k-sample importance-weighted bound) per image, nats;
        the weights are log p(x | z) + log p(z) − log q(z | x) at each posterior sample."""
        feats = self.vae.bottom_up(x)
        elbos, weights = [], []
        for _ in range(k):
            params, kl, ratio = self.vae.top_down(feats, x.shape[0], log_ratio=True)
            log_px = dmol_log_prob(x, params, self.cfg.mixtures)
            elbos.append(log_px - kl)
            weights.append(log_px + ratio)
        return torch.stack(elbos).mean(0), torch.logsumexp(torch.stack(weights), 0) - math.log(k)

    def latent_shape(self):
        return (sum(math.prod(s) for s in self.vae.latent_shapes()),)

    def generator(self, nets=None):
        return HVAEDecoder((nets or {}).get("vae", self.vae), self.cfg.temperature)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        decoder = self.generator(nets)
        device = next(decoder.parameters()).device
        z = torch.randn(n, *self.latent_shape(), generator=generator).to(device)
        return decoder(z, torch.zeros(n, dtype=torch.long, device=device))


@register("hvae", HVAEConfig, "Vahdat & Kautz, NeurIPS 2020 (NVAE-style hierarchical VAE)")
def build_hvae(cfg: HVAEConfig, info: DataInfo) -> HVAE:
    return HVAE(cfg, info)
