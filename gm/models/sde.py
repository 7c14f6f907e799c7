"""Score-based generative model through SDEs (Song et al., ICLR 2021): family ``sde``.

A time-conditioned score network s_θ(x, t, y) ≈ ∇ₓ log p_t(x | y) is the DDPM U-Net
(:class:`gm.models.ddpm.UNet`, fed 999·t) in the noise parameterization the paper's code
uses: s_θ = −ε_θ(x_t, t, y) / std(t). It is trained by continuous-time denoising score
matching, t ~ U(eps, 1), x_t = mean(t)·x_0 + std(t)·z:

    L = E ‖ε_θ(x_t, t, y) − z‖²            (λ(t) = std², the default)
    L = E g(t)²/std(t)² ‖ε_θ − z‖²           (``likelihood_weighting``: λ = g², Song et al.,
                                               NeurIPS 2021, a bound on the negative
                                               log-likelihood; higher variance)

for the VP, sub-VP or VE SDE (:mod:`gm.sde`, published schedules as defaults). Sampling:
predictor–corrector (``sampler: pc``; reverse diffusion or Euler–Maruyama predictor, a
Langevin corrector at ``snr``) or the probability-flow ODE (``sampler: ode``, torchdiffeq's
RK45; ``sampler: heun``, ``heun_steps`` fixed Heun steps, which is also the exported
generator). ``bits_per_dim`` is the exact likelihood of the probability-flow ODE with the
Hutchinson–Skilling trace estimator and uniform dequantization, which ``evaluate@`` reports.
Class-conditional like ``ddpm``: label dropout ``p_uncond`` while training and classifier-free
guidance ``guidance`` at sampling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from gm import sde as sdelib
from gm.config import check
from gm.diffusion import drop_labels, guided
from gm.models.ddpm import DDPMConfig, UNet
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GenerativeModel, OptimConfig, Phase


@dataclass(frozen=True)
class ScoreSDEConfig:
    sde: Literal["vp", "subvp", "ve"] = "vp"
    beta_min: float = 0.1  # VP / sub-VP (paper)
    beta_max: float = 20.0
    sigma_min: float = 0.01  # VE (paper)
    sigma_max: float = 50.0  # VE: about the largest pairwise distance of the data (CIFAR-10: 50)
    eps: float = 1e-5  # smallest t in training and in the likelihood's integral
    likelihood_weighting: bool = False
    # the score network: the DDPM U-Net (paper, CIFAR-10 DDPM++ is larger; 128 at 32²)
    width: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    conditional: bool = False
    p_uncond: float = 0.1
    guidance: float = 0.0
    # sampling
    sampler: Literal["pc", "ode", "heun"] = "pc"
    predictor: Literal["reverse_diffusion", "euler_maruyama"] = "reverse_diffusion"
    corrector_steps: int = 1  # Langevin steps per predictor step (0: none)
    snr: float = 0.16  # the corrector's signal-to-noise ratio (paper, VE on CIFAR-10)
    sample_steps: int = 1000  # predictor steps (paper: N = 1000)
    sample_eps: float = 1e-3  # samplers stop at this t
    ode_tolerance: float = 1e-5  # rtol = atol of the ODE solver, sampling and likelihood
    # sampler heun, and always the exported generator: the probability-flow ODE in this many
    # fixed Heun steps (torch.export cannot trace the adaptive solver); 2 score evaluations each
    heun_steps: int = 50
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.9, 0.999), grad_clip=1.0)
    )

    def __post_init__(self):
        check(self.sde in ("vp", "subvp", "ve"), "sde", f"{self.sde!r}: must be vp, subvp or ve")
        check(0 < self.beta_min < self.beta_max, "beta_max", "need 0 < beta_min < beta_max")
        check(0 < self.sigma_min < self.sigma_max, "sigma_max", "need 0 < sigma_min < sigma_max")
        check(0 < self.eps < 0.1, "eps", f"{self.eps} not in (0, 0.1)")
        check(0 < self.sample_eps < 0.1, "sample_eps", f"{self.sample_eps} not in (0, 0.1)")
        check(self.sample_steps >= 1, "sample_steps", "must be >= 1")
        check(self.heun_steps >= 1, "heun_steps", "must be >= 1")
        check(self.sampler in ("pc", "ode", "heun"), "sampler",
              f"{self.sampler!r}: must be pc, ode or heun")  # fmt: skip
        check(self.corrector_steps >= 0, "corrector_steps", "must be >= 0")
        check(self.snr > 0, "snr", "must be > 0")
        check(0 < self.ode_tolerance < 1, "ode_tolerance", "must be in (0, 1)")
        check(0 <= self.p_uncond < 1, "p_uncond", "must be in [0, 1)")
        check(self.guidance >= 0, "guidance", "must be >= 0")

    def unet_config(self) -> DDPMConfig:
        return DDPMConfig(width=self.width, channel_mult=self.channel_mult,
                          num_res_blocks=self.num_res_blocks,
                          attention_resolutions=self.attention_resolutions,
                          dropout=self.dropout, conditional=self.conditional)  # fmt: skip

    def process(self) -> sdelib.SDE:
        return sdelib.SDE(self.sde, self.beta_min, self.beta_max, self.sigma_min, self.sigma_max)


def score_fn(unet: nn.Module, cfg: ScoreSDEConfig, process: sdelib.SDE,
             labels: torch.Tensor | None) -> sdelib.ScoreFn:  # fmt: skip
    """s(x, t) = −ε_θ(x, 999t, y) / std(t), with classifier-free guidance for a conditional
    model (``labels`` given)."""
    if cfg.conditional and labels is not None:
        eps = guided(unet, labels, unet.null_label, cfg.guidance)
    else:
        eps = lambda x, t: unet(x, t)  # noqa: E731

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, std = process.mean_std(t)
        return -eps(x, t * 999) / sdelib.per_sample(std, x)

    return score


class SDESampler(nn.Module):
    """(z ~ N(0, I) (B, C, H, W), labels) → samples in [−1, 1]: the probability-flow ODE from
    the prior point z·prior_std, deterministic. ``fixed_steps`` None: torchdiffeq's adaptive
    RK45 at ``ode_tolerance`` (``sampler: ode``); an int: that many Heun steps
    (:func:`gm.sde.heun_sample`), which :func:`torch.export.export` can trace: gm's exported
    generator (``heun_steps``)."""

    def __init__(self, unet: nn.Module, cfg: ScoreSDEConfig, fixed_steps: int | None = None):
        super().__init__()
        self.unet, self.cfg, self.fixed_steps = unet, cfg, fixed_steps

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        process = self.cfg.process()
        score = score_fn(self.unet, self.cfg, process, labels)
        if self.fixed_steps is not None:
            x = sdelib.heun_sample(process, score, z * process.prior_std(), self.fixed_steps,
                                   self.cfg.sample_eps)  # fmt: skip
            return x.clamp(-1, 1)
        tol = self.cfg.ode_tolerance
        x = sdelib.ode_sample(process, score, tuple(z.shape), self.cfg.sample_eps, tol, tol,
                              x=z * process.prior_std())  # fmt: skip
        return x.clamp(-1, 1)


class ScoreSDE(GenerativeModel):
    sampler = "unet"
    ema_modules = ("unet",)

    def __init__(self, cfg: ScoreSDEConfig, info: DataInfo):
        super().__init__()
        if cfg.conditional and info.num_classes < 2:
            raise ValueError(f"a class-conditional SDE needs >= 2 classes, got {info.num_classes}")
        self.cfg, self.info = cfg, info
        self.conditional = cfg.conditional
        self.process = cfg.process()
        self.unet = UNet(cfg.unet_config(), info)

    def trainable(self):
        return {"unet": self.unet}

    def phases(self):
        return [Phase("dsm", "unet")]

    def optim_config(self, module):
        return self.cfg.optim

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        x0 = batch.images
        n = x0.shape[0]
        t = torch.rand(n, device=x0.device) * (1 - self.cfg.eps) + self.cfg.eps
        z = torch.randn_like(x0)
        mean, std = self.process.mean_std(t)
        xt = sdelib.per_sample(mean, x0) * x0 + sdelib.per_sample(std, x0) * z
        labels = None
        if self.cfg.conditional:
            labels = drop_labels(batch.labels, self.info.num_classes, self.cfg.p_uncond)
        err = (nets["unet"](xt, t * 999, labels) - z).pow(2).flatten(1).mean(1)
        if self.cfg.likelihood_weighting:
            err = err * self.process.diffusion(t) ** 2 / std**2
        return err.mean(), {}

    def latent_shape(self):
        return (self.info.channels, self.info.resolution, self.info.resolution)

    def generator(self, nets=None):
        """The exported generator: the probability-flow ODE in ``heun_steps`` Heun steps."""
        unet = (nets or {}).get("unet", self.unet)
        return SDESampler(unet, self.cfg, self.cfg.heun_steps)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        unet = (nets or {}).get("unet", self.unet)
        device = next(unet.parameters()).device
        if labels is None and self.conditional:
            labels = self.labels_for(n, self.info.num_classes, device)
        labels = None if labels is None else labels.to(device)
        shape = (n, *self.latent_shape())
        z = torch.randn(shape, generator=generator).to(device)
        if self.cfg.sampler == "ode":
            return SDESampler(unet, self.cfg)(z, labels)
        if self.cfg.sampler == "heun":
            return self.generator(nets)(z, labels)
        score = score_fn(unet, self.cfg, self.process, labels)
        x = sdelib.pc_sample(self.process, score, shape, self.cfg.predictor,
                             self.cfg.corrector_steps, self.cfg.snr, self.cfg.sample_steps,
                             self.cfg.sample_eps, generator, device,
                             x=z * self.process.prior_std())  # fmt: skip
        return x.clamp(-1, 1)

    def bits_per_dim(self, batch: Batch):
        """Exact negative log-likelihood (bits/dim) of each image through the probability-flow
        ODE (Hutchinson–Skilling trace, uniform dequantization), unconditional score."""
        score = score_fn(self.unet, self.cfg, self.process, None)
        tol = self.cfg.ode_tolerance
        return sdelib.bits_per_dim(self.process, score, batch.images, eps=self.cfg.eps,
                                   rtol=tol, atol=tol)  # fmt: skip


@register("sde", ScoreSDEConfig, "Song et al., ICLR 2021 (score-based SDEs: VP, sub-VP, VE)")
def build_sde(cfg: ScoreSDEConfig, info: DataInfo) -> ScoreSDE:
    return ScoreSDE(cfg, info)
