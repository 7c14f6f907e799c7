"""A multi-scale normalizing flow in the style of RealNVP (Dinh et al., ICLR 2017) and Glow
(Kingma & Dhariwal, NeurIPS 2018), with an exact log-likelihood.

x (8-bit images) → uniform dequantization y = (k + u)/256, u ~ U[0, 1) → logit transform
z = logit(α + (1 − 2α) y) (RealNVP, α = 0.05) → L levels of [squeeze (C, H, W) → (4C, H/2, W/2),
K steps of (actnorm, invertible 1×1 convolution, affine coupling), split off half the
channels as a latent with a standard-normal prior] → the rest standard normal.

log p(k) ≥ E_u[log p_y(y)] (dequantization bound) with log p_y(y) = log N(f(y)) + log|det ∂f/∂y|;
bits/dim = −(log p_y(y) − D log 256) / (D log 2), a code length for the 8-bit data.

Deviation from Glow: actnorm starts as the identity rather than with data-dependent
initialization (a per-rank data init would desynchronize DDP replicas).
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
class FlowConfig:
    levels: int = 3  # squeeze/split levels (Glow: 3 at 32×32)
    steps: int = 8  # flow steps per level (Glow: 32)
    hidden: int = 128  # channels of each coupling network (Glow: 512)
    alpha: float = 0.05  # logit transform margin (RealNVP)
    temperature: float = 0.7  # std of the prior when sampling (Glow's reduced temperature)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, betas=(0.9, 0.999), grad_clip=50.0)
    )

    def __post_init__(self):
        for name in ("levels", "steps", "hidden"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(0 < self.alpha < 0.5, "alpha", "must be in (0, 0.5)")
        check(self.temperature > 0, "temperature", "must be > 0")


def squeeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


class ActNorm(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, ch, 1, 1))

    def forward(self, x):
        hw = x.shape[2] * x.shape[3]
        return (x + self.bias) * self.log_scale.exp(), self.log_scale.sum() * hw

    def inverse(self, z):
        return z * (-self.log_scale).exp() - self.bias


class InvConv(nn.Module):
    """Invertible 1×1 convolution, LU-parameterized (Glow): W = P L (U + diag(s))."""

    def __init__(self, ch: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(ch, ch))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(ch, ch), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> torch.Tensor:
        eye = torch.eye(len(self.log_s), device=self.log_s.device)
        lower = self.lower * self.l_mask + eye
        upper = self.upper * self.l_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.p @ lower @ upper

    def forward(self, x):
        w = self.weight()
        return F.conv2d(x, w[:, :, None, None]), self.log_s.sum() * x.shape[2] * x.shape[3]

    def inverse(self, z):
        w = torch.linalg.inv(self.weight().double()).to(z.dtype)
        return F.conv2d(z, w[:, :, None, None])


class Coupling(nn.Module):
    """Affine coupling: the second half scaled and shifted by a CNN of the first half; the
    scale is sigmoid(h + 2) (Glow), so it starts near 1 and never explodes."""

    def __init__(self, ch: int, hidden: int):
        super().__init__()
        half = ch // 2
        self.net = nn.Sequential(
            nn.Conv2d(half, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * (ch - half), 3, padding=1),
        )  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.half = half

    def _st(self, xa):
        h = self.net(xa)
        shift, raw = h[:, 0::2], h[:, 1::2]
        return torch.sigmoid(raw + 2.0), shift

    def forward(self, x):
        xa, xb = x[:, : self.half], x[:, self.half :]
        scale, shift = self._st(xa)
        return torch.cat([xa, (xb + shift) * scale], 1), scale.log().flatten(1).sum(1)

    def inverse(self, z):
        za, zb = z[:, : self.half], z[:, self.half :]
        scale, shift = self._st(za)
        return torch.cat([za, zb / scale - shift], 1)


class FlowStep(nn.Module):
    def __init__(self, ch: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(ch), InvConv(ch), Coupling(ch, hidden)])

    def forward(self, x):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z):
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z


class FlowNet(nn.Module):
    """The bijection f: logit-space image → latents, multi-scale."""

    def __init__(self, cfg: FlowConfig, info: DataInfo):
        super().__init__()
        if info.resolution % (2**cfg.levels):
            raise ValueError(f"resolution {info.resolution} is not divisible by 2^{cfg.levels}")
        self.cfg, self.info = cfg, info
        self.levels = nn.ModuleList()
        ch = info.channels
        self.shapes = []  # latent shape split off at each level (the last: everything left)
        res = info.resolution
        for i in range(cfg.levels):
            ch, res = ch * 4, res // 2
            self.levels.append(nn.ModuleList([FlowStep(ch, cfg.hidden) for _ in range(cfg.steps)]))
            if i < cfg.levels - 1:
                self.shapes.append((ch // 2, res, res))
                ch //= 2
            else:
                self.shapes.append((ch, res, res))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(latents per level, log|det ∂f/∂x|) per image."""
        logdet = x.new_zeros(x.shape[0])
        latents = []
        for i, steps in enumerate(self.levels):
            x = squeeze(x)
            for step in steps:
                x, ld = step(x)
                logdet = logdet + ld
            if i < len(self.levels) - 1:
                half = x.shape[1] // 2
                latents.append(x[:, half:])
                x = x[:, :half]
        latents.append(x)
        return latents, logdet

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        x = latents[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                x = torch.cat([x, latents[i]], 1)
            for step in reversed(self.levels[i]):
                x = step.inverse(x)
            x = unsqueeze(x)
        return x


def _normal_logp(z: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (z**2 + math.log(2 * math.pi))).flatten(1).sum(1)


class Flow(GenerativeModel):
    sampler = "flow"

    def __init__(self, cfg: FlowConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.flow = FlowNet(cfg, info)

    def trainable(self):
        return {"flow": self.flow}

    def phases(self):
        return [Phase("nll", "flow")]

    def optim_config(self, module):
        return self.cfg.optim

    def to_logit(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y in [0, 1) → logit space, and log|det| of the transform per image."""
        a = self.cfg.alpha
        p = a + (1 - 2 * a) * y
        z = torch.log(p) - torch.log1p(-p)
        logdet = (math.log(1 - 2 * a) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return z, logdet

    def from_logit(self, z: torch.Tensor) -> torch.Tensor:
        a = self.cfg.alpha
        return (torch.sigmoid(z) - a) / (1 - 2 * a)

    def log_prob_y(self, y: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """log density of dequantized images y ∈ [0, 1)^D, per image (nats)."""
        z, ld_logit = self.to_logit(y)
        latents, ld = (net or self.flow)(z)
        return sum(_normal_logp(v) for v in latents) + ld + ld_logit

    def dequantize(self, images: torch.Tensor) -> torch.Tensor:
        k = torch.round((images.clamp(-1, 1) + 1) * 127.5)  # the 8-bit levels 0..255
        return (k + torch.rand_like(k)) / 256.0

    def _bpd(self, images: torch.Tensor, net=None) -> torch.Tensor:
        y = self.dequantize(images)
        dims = images[0].numel()
        # density of k + u on [0, 256)^D is p_y(y) / 256^D
        return -(self.log_prob_y(y, net) - dims * math.log(256.0)) / (dims * LOG2)

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        bpd = self._bpd(batch.images, nets["flow"])
        loss = bpd.mean()
        return loss, {"bits_per_dim": loss.item()}

    def bits_per_dim(self, batch: Batch):
        """−log p of the 8-bit images in bits/dim, the dequantization bound (one u sample)."""
        return self._bpd(batch.images)

    def latent_shape(self):
        return (self.info.channels * self.info.resolution**2,)

    def generator(self, nets=None):
        return FlowSampler(self, (nets or {}).get("flow", self.flow))

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        gen = self.generator(nets)
        device = next(gen.parameters()).device
        z = torch.randn(n, *self.latent_shape(), generator=generator).to(device)
        return gen(z * self.cfg.temperature, torch.zeros(n, dtype=torch.long, device=device))


class FlowSampler(nn.Module):
    """(z, labels) → images: z (flat, N(0, T²)) cut into the per-level latents, inverted."""

    def __init__(self, model: Flow, flow: FlowNet):
        super().__init__()
        self.flow, self.alpha = flow, model.cfg.alpha

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        latents, start = [], 0
        for shape in self.flow.shapes:
            size = math.prod(shape)
            latents.append(z[:, start : start + size].reshape(-1, *shape))
            start += size
        y = (torch.sigmoid(self.flow.inverse(latents)) - self.alpha) / (1 - 2 * self.alpha)
        return (y * 2 - 1).clamp(-1, 1)


@register("flow", FlowConfig, "Dinh et al., ICLR 2017 (RealNVP); Kingma & Dhariwal 2018 (Glow)")
def build_flow(cfg: FlowConfig, info: DataInfo) -> Flow:
    return Flow(cfg, info)
