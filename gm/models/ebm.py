"""Energy-based model (Du & Mordatch, "Implicit Generation and Generalization in Energy-Based
Models", NeurIPS 2019).

An energy network E_θ(x, y) (a ResNet with Swish activations and optional spectral
normalization; class-conditional: one energy per class, the label's is used) defines
p_θ(x | y) ∝ exp(−E_θ(x, y)). Training is contrastive divergence: negatives x⁻ come from
short-run stochastic gradient Langevin dynamics (SGLD),

    x^k = clip(x^{k−1} − λ ∇ₓE(x^{k−1}, y) + ω,  0, 1),   ω ~ N(0, σ² I),

K steps (paper: K 60, λ 10, σ 0.005, on images in [0, 1]; the energy gradient clipped per
pixel at ``sgld_grad_clip``), started 95 % of the time from a replay buffer of past negatives and
5 % from uniform noise; the chains' ends go back into the buffer. The loss is

    E(x⁺, y⁺) − E(x⁻, y⁻) + α (E(x⁺, y⁺)² + E(x⁻, y⁻)²),  α = 1,

lowering the energy of data, raising that of samples. The buffer (images, labels) is part of
the model's state, so a checkpoint resumes the same chains. Sampling runs SGLD from uniform
noise for ``sample_steps`` steps. The update's stationary law is ∝ exp(−E/T) with
T = σ²/(2λ) (:func:`sgld`); at the paper's λ and σ, T ≈ 1e-6: short-run SGLD is a learned,
nearly deterministic sampler rather than an exact one, as the paper discusses.

Images: the network sees x in [0, 1] (the paper's units); gm's batches in [−1, 1] are mapped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gm.config import check
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GenerativeModel, OptimConfig, Phase


@dataclass(frozen=True)
class EBMConfig:
    width: int = 128  # channels of the first block; doubled per downsampling block
    blocks: int = 3  # residual blocks, each halving the resolution
    spectral_norm: bool = True
    conditional: bool = True  # one energy per class
    sgld_steps: int = 60  # K, training chains
    sgld_step_size: float = 10.0  # λ (images in [0, 1])
    sgld_noise: float = 0.005  # σ
    sgld_grad_clip: float = 0.01  # per-pixel clip of ∇ₓE in each step; 0: off
    buffer_size: int = 10000  # replay buffer of past negatives
    reinit_prob: float = 0.05  # chains started from uniform noise instead of the buffer
    energy_reg: float = 1.0  # α
    sample_steps: int = 200  # SGLD steps from noise when sampling
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.0, 0.999)))

    def __post_init__(self):
        for name in ("width", "blocks", "sgld_steps", "buffer_size", "sample_steps"):
            check(getattr(self, name) >= 1, name, f"{getattr(self, name)} must be >= 1")
        for name in ("sgld_step_size", "sgld_noise", "sgld_grad_clip", "energy_reg"):
            check(getattr(self, name) >= 0, name, f"{getattr(self, name)} must be >= 0")
        check(0 <= self.reinit_prob <= 1, "reinit_prob", f"{self.reinit_prob} not in [0, 1]")


def sgld(
    energy: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    steps: int,
    step_size: float,
    noise: float,
    grad_clip: float = 0.0,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stochastic gradient Langevin dynamics (Welling & Teh 2011), in Du & Mordatch's form:
    x ← x − λ·clip(∇ₓ Σ E(x)) + σ·ε, ε ~ N(0, I), then clamped to ``bounds``.

    ``energy``: x (B, …) → energies (B,). Returns the chains' ends, detached. With a small λ
    and no clipping or bounds the update is Langevin dynamics whose stationary law is
    ∝ exp(−E(x)·2λ/σ²) (the step λ∇E, noise variance σ² = 2λT: temperature T = σ²/(2λ)).
    Gradients reach x only: parameters get none."""
    x = x.detach().clone()
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
        if grad_clip > 0:
            grad = grad.clamp(-grad_clip, grad_clip)
        if generator is None:  # torch's global RNG (an exported graph can hold this draw)
            eps = torch.randn_like(x)
        else:
            eps = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        x = x.detach() - step_size * grad + noise * eps
        if bounds is not None:
            x = x.clamp(*bounds)
    return x.detach()


def _sn(module: nn.Module, on: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module) if on else module


class EnergyBlock(nn.Module):
    """Pre-activation residual block with Swish, then 2× average-pool downsampling."""

    def __init__(self, cin: int, cout: int, sn: bool):
        super().__init__()
        self.conv1 = _sn(nn.Conv2d(cin, cout, 3, padding=1), sn)
        self.conv2 = _sn(nn.Conv2d(cout, cout, 3, padding=1), sn)
        self.skip = _sn(nn.Conv2d(cin, cout, 1), sn)

    def forward(self, x):
        h = self.conv2(F.silu(self.conv1(F.silu(x))))
        return F.avg_pool2d(h + self.skip(x), 2)


class EnergyNet(nn.Module):
    """x (B, C, H, W) in [0, 1] → energies (B, K) (K classes, or 1)."""

    def __init__(self, cfg: EBMConfig, info: DataInfo, outputs: int):
        super().__init__()
        if info.resolution < 2**cfg.blocks:
            raise ValueError(f"EBM: {cfg.blocks} blocks need a resolution >= {2**cfg.blocks}, "
                             f"got {info.resolution}")  # fmt: skip
        ch = cfg.width
        self.stem = _sn(nn.Conv2d(info.channels, ch, 3, padding=1), cfg.spectral_norm)
        blocks = []
        for i in range(cfg.blocks):
            out = ch * 2 if i < cfg.blocks - 1 else ch
            blocks.append(EnergyBlock(ch, out, cfg.spectral_norm))
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.head = _sn(nn.Linear(ch, outputs), cfg.spectral_norm)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.blocks(self.stem(x01 * 2 - 1))).sum((2, 3))
        # the head's affine map written out: the same as self.head(h), but its gradient (which
        # SGLD takes inside the exported generator) is one torch.export can trace; nn.Linear's
        # backward saves a transposed weight that export cannot lift (torch 2.14)
        return h @ self.head.weight.T + self.head.bias


def _energy_of(net: nn.Module, labels: torch.Tensor | None) -> Callable:
    def energy(x01: torch.Tensor) -> torch.Tensor:
        e = net(x01)
        return e[:, 0] if labels is None else e.gather(1, labels[:, None])[:, 0]

    return energy


class EBMSampler(nn.Module):
    """(initial images in [−1, 1] (B, C, H, W), labels) → samples in [−1, 1]: SGLD from the
    given start for ``steps`` steps. Called as a module (gm's exported generator) the chains'
    noise comes from torch's global RNG: seed it (``torch.manual_seed``) for repeatable
    samples, as ``gm sample --seed`` does; :meth:`run` takes a ``torch.Generator``."""

    def __init__(self, net: EnergyNet, cfg: EBMConfig, conditional: bool, steps: int):
        super().__init__()
        self.net, self.cfg, self.conditional, self.steps = net, cfg, conditional, steps

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.run(z, labels, None)

    def run(self, z, labels, generator):
        cfg = self.cfg
        energy = _energy_of(self.net, labels if self.conditional else None)
        x = sgld(energy, (z.clamp(-1, 1) + 1) / 2, self.steps, cfg.sgld_step_size,
                 cfg.sgld_noise, cfg.sgld_grad_clip, generator=generator)  # fmt: skip
        return x * 2 - 1


class EnergyBasedModel(GenerativeModel):
    sampler = "E"

    def __init__(self, cfg: EBMConfig, info: DataInfo):
        super().__init__()
        if cfg.conditional and info.num_classes < 2:
            raise ValueError(f"a conditional EBM needs >= 2 classes, got {info.num_classes}")
        self.cfg, self.info = cfg, info
        self.conditional = cfg.conditional
        self.E = EnergyNet(cfg, info, info.num_classes if cfg.conditional else 1)
        shape = (cfg.buffer_size, info.channels, info.resolution, info.resolution)
        # the replay buffer (images in [0, 1], their labels): uniform noise to start with
        self.register_buffer("buffer_x", torch.rand(shape))
        classes = max(info.num_classes, 1)
        self.register_buffer("buffer_y", torch.randint(0, classes, (cfg.buffer_size,)))

    def trainable(self):
        return {"E": self.E}

    def phases(self):
        return [Phase("cd", "E")]

    def optim_config(self, module):
        return self.cfg.optim

    def energy(self, images: torch.Tensor, labels: torch.Tensor | None = None,
               net: nn.Module | None = None) -> torch.Tensor:  # fmt: skip
        """Energies (B,) of images in [−1, 1]: E(x, y) for a conditional model given labels,
        else the energy of the marginal, −log Σ_y exp(−E(x, y)) (one output: that one)."""
        e = (net or self.E)((images + 1) / 2)
        if labels is not None and self.conditional:
            return e.gather(1, labels[:, None].to(e.device))[:, 0]
        return -torch.logsumexp(-e, dim=1)

    def negatives(self, n: int, net: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Short-run SGLD chains from the buffer (``reinit_prob`` from noise), written back."""
        cfg = self.cfg
        idx = torch.randint(0, cfg.buffer_size, (n,))
        x0 = self.buffer_x[idx].clone()
        y = self.buffer_y[idx].clone()
        fresh = torch.rand(n) < cfg.reinit_prob
        if bool(fresh.any()):
            k = int(fresh.sum())
            x0[fresh] = torch.rand(k, *x0.shape[1:]).to(x0.device)
            y[fresh] = torch.randint(0, max(self.info.num_classes, 1), (k,)).to(y.device)
        energy = _energy_of(net, y.to(device) if self.conditional else None)
        x = sgld(energy, x0.to(device), cfg.sgld_steps, cfg.sgld_step_size, cfg.sgld_noise,
                 cfg.sgld_grad_clip)  # fmt: skip
        self.buffer_x[idx] = x.to(self.buffer_x.device)
        self.buffer_y[idx] = y
        return x, y.to(device)

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        net = nets["E"]
        inner = getattr(net, "module", net)  # SGLD on the bare network, not through DDP
        x_neg, y_neg = self.negatives(batch.images.shape[0], inner, batch.images.device)
        x_pos = (batch.images + 1) / 2
        both = net(torch.cat([x_pos, x_neg]))
        labels = torch.cat([batch.labels, y_neg]) if self.conditional else None
        e = both[:, 0] if labels is None else both.gather(1, labels[:, None])[:, 0]
        e_pos, e_neg = e.chunk(2)
        cd = e_pos.mean() - e_neg.mean()
        reg = e_pos.pow(2).mean() + e_neg.pow(2).mean()
        loss = cd + self.cfg.energy_reg * reg
        return loss, {"e_pos": e_pos.mean().item(), "e_neg": e_neg.mean().item(),
                      "cd": cd.item()}  # fmt: skip

    def latent_shape(self):
        return (self.info.channels, self.info.resolution, self.info.resolution)

    def generator(self, nets=None):
        net = (nets or {}).get("E", self.E)
        return EBMSampler(getattr(net, "module", net), self.cfg, self.conditional,
                          self.cfg.sample_steps)  # fmt: skip

    def sample(self, n, labels=None, generator=None, nets=None):
        """SGLD from uniform noise for ``sample_steps`` steps; ``generator`` seeds the start
        and the chains' noise."""
        sampler = self.generator(nets)
        device = next(sampler.parameters()).device
        z = torch.rand(n, *self.latent_shape(), generator=generator) * 2 - 1
        if labels is None:
            labels = self.labels_for(n, self.info.num_classes, device)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        return sampler.run(z.to(device), labels.to(device), g)


@register("ebm", EBMConfig, "Du & Mordatch, NeurIPS 2019 (EBM, SGLD, replay buffer)")
def build_ebm(cfg: EBMConfig, info: DataInfo) -> EnergyBasedModel:
    return EnergyBasedModel(cfg, info)
