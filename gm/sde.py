"""Score-based generative modeling through SDEs (Song, Sohl-Dickstein, Kingma, Kumar, Ermon &
Poole, ICLR 2021): the forward SDEs, their perturbation kernels, the reverse-time samplers and
the probability-flow ODE with its exact log-likelihood. Stateless: the model family is
:mod:`gm.models.sde`.

Forward SDE dx = f(x, t) dt + g(t) dw on t ∈ [0, 1]; every SDE here is affine, so
p_{0t}(x_t | x_0) = N(mean(t)·x_0, std(t)² I):

- **VP** (β_min 0.1, β_max 20): f = −½β(t)x, g = √β(t), β(t) = β_min + t(β_max − β_min);
  mean = exp(−¼t²(β_max − β_min) − ½tβ_min), std = √(1 − mean²). The continuous DDPM.
- **sub-VP**: the same drift, g = √(β(t)(1 − e^{−2∫₀ᵗβ})), std = 1 − mean².
- **VE** (σ_min 0.01, σ_max ≈ the largest pairwise distance of the data): f = 0,
  g = σ(t)√(2 log(σ_max/σ_min)), σ(t) = σ_min(σ_max/σ_min)ᵗ; mean = 1,
  std = √(σ(t)² − σ_min²) (exact; the paper's code uses σ(t)).

A score function is ``score(x, t) → ∇ₓ log p_t(x)`` with x (B, …) and t (B,).

- :func:`pc_sample`: predictor–corrector sampling; predictor Euler–Maruyama or reverse
  diffusion, corrector Langevin with step 2α(r‖z‖/‖s‖)² at signal-to-noise ratio r (paper:
  0.16 for VE on CIFAR-10), α = 1 − β(t)Δt for VP/sub-VP and 1 for VE.
- :func:`ode_sample`: the probability-flow ODE dx/dt = f − ½g²s, solved with torchdiffeq's
  adaptive RK45 (dopri5; paper: rtol = atol = 1e-5).
- :func:`ode_log_likelihood`: log p_0(x) = log p_1(x(1)) + ∫₀¹ ∇·(f − ½g²s) dt, the
  divergence by the Hutchinson–Skilling estimator εᵀ(∂F/∂x)ε (Rademacher ε), or exactly for
  small dimensions; :func:`bits_per_dim` with uniform dequantization of 8-bit data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …) to broadcast against ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class SDE:
    """One of the paper's forward SDEs; all methods take t (B,) in [0, 1]."""

    kind: Literal["vp", "subvp", "ve"] = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self):
        if self.kind not in ("vp", "subvp", "ve"):
            raise ValueError(f"SDE kind {self.kind!r}: must be vp, subvp or ve")
        if self.kind == "ve" and not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("VE SDE needs 0 < sigma_min < sigma_max")
        if self.kind != "ve" and not 0 < self.beta_min < self.beta_max:
            raise ValueError("VP SDEs need 0 < beta_min < beta_max")

    # -- the SDE and its perturbation kernel ---------------------------------------------------

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_mean(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "ve":
            return torch.zeros_like(x)
        return -0.5 * per_sample(self.beta(t), x) * x

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t), (B,)."""
        if self.kind == "ve":
            return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        if self.kind == "vp":
            return self.beta(t).sqrt()
        discount = 1 - torch.exp(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
        return (self.beta(t) * discount).sqrt()

    def mean_std(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The perturbation kernel's mean factor and std, each (B,): x_t = mean·x_0 + std·z."""
        if self.kind == "ve":
            var = self.sigma(t) ** 2 - self.sigma_min**2
            return torch.ones_like(t), var.clamp(min=0).sqrt()
        log_mean = self._log_mean(t)
        mean = torch.exp(log_mean)
        if self.kind == "vp":
            return mean, (-torch.expm1(2 * log_mean)).sqrt()
        return mean, -torch.expm1(2 * log_mean)

    def prior_std(self) -> float:
        """Std of the prior p_1 the samplers start from (N(0, prior_std² I))."""
        if self.kind == "ve":
            return self.sigma_max
        return 1.0

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, prior_std² I) per sample, (B,)."""
        d = x[0].numel()
        s = self.prior_std()
        return (
            -0.5 * (x.flatten(1).pow(2).sum(1) / s**2)
            - d * math.log(s)
            - 0.5 * d * math.log(2 * math.pi)
        )

    def discretize(
        self, x: torch.Tensor, t: torch.Tensor, dt: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_i, G_i (B,)) of the forward chain x_t = x_{t−dt} + f_i + G_i z (the reverse
        diffusion predictor's, paper appendix E): VE σ(t)² − σ(t−dt)² of added variance; VP the
        exact transition x_t = a·x_{t−dt} + √(1 − a²) z, a = mean(t)/mean(t − dt) (Song et al.'s
        √(1 − β(t)dt) to first order, and valid for any step); sub-VP Euler's (f dt, g √dt)."""
        prev = (t - dt).clamp(min=0)
        if self.kind == "ve":
            var = self.sigma(t) ** 2 - torch.where(t > dt, self.sigma(prev) ** 2, 0 * t)
            return torch.zeros_like(x), var.clamp(min=0).sqrt()
        if self.kind == "vp":
            a = torch.exp(self._log_mean(t) - self._log_mean(prev))
            return (per_sample(a, x) - 1) * x, (1 - a**2).clamp(min=0).sqrt()
        return self.drift(x, t) * dt, self.diffusion(t) * math.sqrt(dt)

    def langevin_alpha(self, t: torch.Tensor, dt: float) -> torch.Tensor:
        """α_i of the Langevin corrector's step: 1 for VE, 1 − β(t)dt (clamped) otherwise."""
        if self.kind == "ve":
            return torch.ones_like(t)
        return (1 - self.beta(t) * dt).clamp(min=1e-3)


# -- samplers -----------------------------------------------------------------------------------


def pc_sample(
    sde: SDE,
    score: ScoreFn,
    shape: tuple[int, ...],
    predictor: Literal["euler_maruyama", "reverse_diffusion"] = "reverse_diffusion",
    corrector_steps: int = 1,
    snr: float = 0.16,
    steps: int = 1000,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x: torch.Tensor | None = None,
    denoise: bool = True,
) -> torch.Tensor:
    """Predictor–corrector sampling of the reverse-time SDE dx = [f − g²s]dt + g dw̄ from the
    prior at t = 1 down to t = eps in ``steps`` steps (paper: 1000); ``corrector_steps``
    Langevin steps per step (0: predictor only). With ``denoise`` the last step returns the
    predictor's mean (no noise), as the paper does. Returns (B, …)."""

    def randn(like):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    if x is None:
        x = torch.randn(shape, generator=generator).to(device) * sde.prior_std()
    ts = torch.linspace(1.0, eps, steps, device=x.device)
    dt = (1.0 - eps) / steps
    for i, t_now in enumerate(ts):
        t = torch.full((x.shape[0],), float(t_now), device=x.device)
        for _ in range(corrector_steps):
            grad = score(x, t)
            z = randn(x)
            g_norm = grad.flatten(1).norm(dim=1).mean()
            z_norm = z.flatten(1).norm(dim=1).mean()
            step = 2 * sde.langevin_alpha(t, dt) * (snr * z_norm / g_norm.clamp(min=1e-12)) ** 2
            x = x + per_sample(step, x) * grad + per_sample((2 * step).sqrt(), x) * z
        last = denoise and i == steps - 1
        if predictor == "euler_maruyama":
            g = sde.diffusion(t)
            mean = x - (sde.drift(x, t) - per_sample(g**2, x) * score(x, t)) * dt
            x = mean if last else mean + per_sample(g, x) * math.sqrt(dt) * randn(x)
        else:
            f, big_g = sde.discretize(x, t, dt)
            mean = x - f + per_sample(big_g**2, x) * score(x, t)
            x = mean if last else mean + per_sample(big_g, x) * randn(x)
    return x


def _flow(sde: SDE, score: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's velocity f − ½g²s."""
    return sde.drift(x, t) - 0.5 * per_sample(sde.diffusion(t) ** 2, x) * score(x, t)


def ode_sample(
    sde: SDE,
    score: ScoreFn,
    shape: tuple[int, ...],
    eps: float = 1e-3,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from the prior at t = 1 to t = eps with torchdiffeq
    (deterministic given the starting noise). Returns (B, …)."""
    from torchdiffeq import odeint

    if x is None:
        x = torch.randn(shape, generator=generator).to(device) * sde.prior_std()

    def velocity(t_scalar, y):
        with torch.no_grad():
            t = torch.full((y.shape[0],), float(t_scalar), device=y.device)
            return _flow(sde, score, y, t)

    times = torch.tensor([1.0, eps], device=x.device, dtype=x.dtype)
    # step_t: the adaptive solver lands on eps instead of stepping past it (t < 0 is outside
    # the SDE's domain) and interpolating back
    return odeint(velocity, x, times, rtol=rtol, atol=atol, method=method,
                  options={"step_t": times[1:]})[-1]  # fmt: skip


def heun_sample(
    sde: SDE, score: ScoreFn, x: torch.Tensor, steps: int, eps: float = 1e-3
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``x`` (B, …), a point of the prior at t = 1, to
    t = eps with ``steps`` fixed steps of Heun's method (2·steps score evaluations) on a
    uniform grid in t (Karras et al., NeurIPS 2022, use Heun as the ODE sampler). The step
    count does not depend on the data, so :func:`torch.export.export` can trace it, unlike
    :func:`ode_sample`'s adaptive solver: this is the sampler of gm's exported generator.
    Returns (B, …)."""
    if steps < 1:
        raise ValueError(f"steps {steps}: must be >= 1")
    grid = torch.linspace(1.0, eps, steps + 1).tolist()  # plain floats: nothing to trace
    b = x.shape[0]
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        h = t1 - t0
        d0 = _flow(sde, score, x, x.new_full((b,), t0))
        x_euler = x + h * d0
        d1 = _flow(sde, score, x_euler, x.new_full((b,), t1))
        x = x + 0.5 * h * (d0 + d1)
    return x


def ode_log_likelihood(
    sde: SDE,
    score: ScoreFn,
    x: torch.Tensor,
    eps: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    exact_trace: bool = False,
    generator: torch.Generator | None = None,
    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """log p_0(x) per sample (B,) in nats, through the probability-flow ODE from t = eps to 1:
    log p_0(x) = log p_1(x(1)) + ∫ ∇·v dt. The divergence is Hutchinson–Skilling's
    εᵀ(∂v/∂x)ε with one Rademacher ε per sample fixed along the path (unbiased), or the exact
    trace (one vector–Jacobian product per dimension: small data only). log p_1 is the SDE's
    prior N(0, prior_std² I) unless ``prior`` (x (B, …) → (B,)) is given: the true p_1 differs
    from it slightly (VP: by the mean exp(−5)·x_0 left at t = 1), which bounds the accuracy."""
    from torchdiffeq import odeint

    b, d = x.shape[0], x[0].numel()
    noise = (torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1) if not exact_trace \
        else None  # fmt: skip

    def divergence(y, t):
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            v = _flow(sde, score, y, t)
            if exact_trace:
                flat = v.flatten(1)
                div = torch.zeros(b, device=y.device, dtype=y.dtype)
                for k in range(d):
                    (g,) = torch.autograd.grad(flat[:, k].sum(), y, retain_graph=k < d - 1)
                    div = div + g.flatten(1)[:, k]
            else:
                (g,) = torch.autograd.grad((v * noise).sum(), y)
                div = (g * noise).flatten(1).sum(1)
        return v.detach(), div.detach()

    def dynamics(t_scalar, state):
        y, _ = state
        t = torch.full((b,), float(t_scalar), device=y.device, dtype=y.dtype)
        v, div = divergence(y, t)
        return v, div

    times = torch.tensor([eps, 1.0], device=x.device, dtype=x.dtype)
    y1, delta = odeint(dynamics, (x, torch.zeros(b, device=x.device, dtype=x.dtype)), times,
                       rtol=rtol, atol=atol, method=method,
                       options={"step_t": times[1:]})  # fmt: skip
    return (prior or sde.prior_log_prob)(y1[-1]) + delta[-1]


def bits_per_dim(
    sde: SDE,
    score: ScoreFn,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    **ode_kwargs,
) -> torch.Tensor:
    """Negative log-likelihood in bits per dimension of 8-bit images given in [−1, 1] (B,),
    with uniform dequantization (x + u)/256, u ~ U[0, 1): an upper bound on the discrete
    model's code length, as the paper reports it."""
    levels = torch.round((images + 1) * 127.5)
    u = torch.rand(images.shape, generator=generator).to(images)
    x01 = (levels + u) / 256
    x = x01 * 2 - 1  # the model's space: density picks up a factor 2^D from [0, 1]
    d = images[0].numel()
    log_p01 = ode_log_likelihood(sde, score, x, generator=generator, **ode_kwargs) + d * math.log(2)
    return -log_p01 / (d * math.log(2)) + 8
