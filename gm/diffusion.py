"""Denoising diffusion (Ho et al., NeurIPS 2020): noise schedules and samplers, stateless and
kept apart from any network.

A :class:`NoiseSchedule` holds β_1..β_T (float64) and everything derived from them; the
forward process is q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) and the posterior q(x_{t−1} | x_t,
x_0) = N(μ̃_t, β̃_t I). Samplers take ``eps(x_t, t) -> ε̂`` (a network, a guided mixture of two
calls, or an oracle in tests) and never own parameters:

- :func:`ddpm_sample`: ancestral sampling, σ_t² = β_t or β̃_t (the paper's two choices);
- :func:`ddim_sample`: DDIM (Song et al., ICLR 2021) on a sub-sequence of timesteps, η = 0
  deterministic, η = 1 ancestral-like;
- :func:`guided`: classifier-free guidance (Ho & Salimans 2021), ε = (1 + w) ε(x, c) − w ε(x, ∅).

Timesteps are 0-based indices 0..T−1 into the schedule (index t is the paper's t + 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NoiseSchedule:
    betas: torch.Tensor  # (T,) float64 in (0, 1)

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or len(b) < 1 or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1)")

    @classmethod
    def linear(cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """The paper's schedule: β linear from 1e-4 to 0.02 over T = 1000 steps."""
        return cls(torch.linspace(beta_start, beta_end, steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, steps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal (2021): ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2),
        β_t = 1 − ᾱ(t)/ᾱ(t−1) clipped at ``max_beta``."""
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return cls((1 - abar[1:] / abar[:-1]).clamp(max=max_beta))

    @classmethod
    def named(cls, name: str, steps: int):
        if name == "linear":
            return cls.linear(steps)
        if name == "cosine":
            return cls.cosine(steps)
        raise ValueError(f"unknown noise schedule {name!r} (linear, cosine)")

    @property
    def steps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, 0)

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped to broadcast over ``like`` (B, ...), in ``like``'s dtype/device."""
        v = values.to(like.device)[t.to(like.device)]
        return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def q_mean_var(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_0)."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0, (1 - abar).expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._at(self.alphas_cumprod, t, xt)
        return (xt - (1 - abar).sqrt() * eps) / abar.sqrt()

    def posterior(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean μ̃_t and variance β̃_t of q(x_{t−1} | x_t, x_0) (t ≥ 1; at t = 0 the
        variance is 0 and the mean is x_0)."""
        abar = self.alphas_cumprod
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        c0 = self._at(self.betas * abar_prev.sqrt() / (1 - abar), t, xt)
        ct = self._at(self.alphas.sqrt() * (1 - abar_prev) / (1 - abar), t, xt)
        var = self._at(self.betas * (1 - abar_prev) / (1 - abar), t, xt)
        return c0 * x0 + ct * xt, var.expand_as(xt)


def drop_labels(labels: torch.Tensor, null: int, p: float) -> torch.Tensor:
    """Classifier-free guidance's training half: each label replaced by ``null`` ("no class")
    with probability ``p`` (Ho & Salimans 2021). (B,) → (B,)."""
    drop = torch.rand(labels.shape[0], device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def guided(eps: Callable[..., torch.Tensor], labels: torch.Tensor, null: int, w: float) -> EpsFn:
    """Classifier-free guidance: ``eps(x, t, labels)`` mixed with its unconditional call
    (``labels`` = ``null``, the label the network was trained to treat as "no class")."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if w == 0:
            return eps(x, t, labels)
        both = eps(torch.cat([x, x]), torch.cat([t, t]),
                   torch.cat([labels, torch.full_like(labels, null)]))  # fmt: skip
        cond, uncond = both.chunk(2)
        return (1 + w) * cond - w * uncond

    return fn


@torch.no_grad()
def ddpm_sample(
    eps: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    variance: str = "beta",
    device: torch.device | str = "cpu",
    clip: bool = True,
) -> torch.Tensor:
    """Ancestral sampling through all T steps: x_{t−1} = μ̃(x_t, x̂_0) + σ_t z, σ_t² = β_t
    (``variance="beta"``) or β̃_t (``"posterior"``); x̂_0 clipped to [−1, 1] when ``clip``."""
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance: {variance!r} is not 'beta' or 'posterior'")
    x = torch.randn(shape, generator=generator).to(device)
    for i in reversed(range(schedule.steps)):
        t = torch.full((shape[0],), i, dtype=torch.long)
        x0 = schedule.predict_x0(x, t, eps(x, t.to(device)))
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, post_var = schedule.posterior(x0, x, t)
        if i == 0:
            return mean
        var = post_var if variance == "posterior" else schedule._at(schedule.betas, t, x)
        z = torch.randn(shape, generator=generator).to(device)
        x = mean + var.sqrt() * z
    return x


def loop_as_scan(
    step: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor],
    x: torch.Tensor,
    xs: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """``for k in range(n): x = step(x, tuple(v[k] for v in xs))`` as one ``scan`` (PyTorch's
    loop operator, ``torch._higher_order_ops.scan``; torch 2.14 has no public name for it).
    :func:`torch.export.export` keeps it a loop: an exported sampler holds its network once,
    not once per step, so exporting ddpm's 20-step DDIM takes 7 s instead of 26 s on 2 CPU
    cores and the graph does not grow with the steps. Eager, it runs the steps in order, but
    8x slower than a Python loop: use it where ``torch.compiler.is_exporting()``. (The SDE's
    Heun sampler exported as a scan took as long as unrolled: symbolic-shape work dominates.)
    ``xs``: tensors of the same length n along dim 0; ``step`` must return a new tensor of
    ``x``'s shape (not ``x`` itself). Networks that differentiate inside a step (SGLD) cannot
    be scanned by torch.export."""
    from torch._higher_order_ops.scan import scan

    def body(carry: torch.Tensor, s: tuple[torch.Tensor, ...]):
        return step(carry, s), ()

    return scan(body, x, xs)[0]


def ddim_timesteps(total: int, steps: int) -> list[int]:
    """The DDIM sub-sequence of ``steps`` of the indices 0..total−1, descending.

    Song et al. (ICLR 2021, appendix D.2), "linear" selection: τ_i = ⌊c·i⌋ for i = 1..S with c
    chosen so that τ_S = T, i.e. c = T/S in the paper's 1-based timesteps; the 0-based indices
    are ⌊i·T/S⌋ − 1. The sequence always starts at T−1 (pure noise, whatever S); from its last
    index the sampler returns its x̂_0 prediction (the step to ᾱ = 1). S = T gives every index.
    Raises ValueError unless 1 <= steps <= total."""
    if not 1 <= steps <= total:
        raise ValueError(f"sampling steps {steps} must be in 1..{total}")
    return [i * total // steps - 1 for i in range(steps, 0, -1)]


@torch.no_grad()
def _predict_x0(x, e, sqrt_a, sqrt_one_minus_a, clip: bool):
    """DDIM's x̂_0 = (x − √(1−ᾱ)·ε)/√ᾱ, clipped to [−1, 1] if ``clip``, and the ε consistent
    with it, (x − √ᾱ·x̂_0)/√(1−ᾱ). The square roots are Python floats or tensors (a scan)."""
    x0 = (x - sqrt_one_minus_a * e) / sqrt_a
    if clip:
        x0 = x0.clamp(-1, 1)
    return x0, (x - sqrt_a * x0) / sqrt_one_minus_a


def ddim_sample(
    eps: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip: bool = True,
    x: torch.Tensor | None = None,
    abar: list[float] | None = None,
    as_scan: bool = False,
) -> torch.Tensor:
    """DDIM over ``steps`` of the schedule's timesteps (η = 0: deterministic). ``abar``: the
    schedule's ᾱ as Python floats, computed once outside a traced region (torch.export of a
    sampler sees constants, not data-dependent ``.item()`` calls). ``as_scan``: the steps as
    one :func:`loop_as_scan` (η = 0 only), what an exported sampler runs; the same arithmetic
    in float32 tensors instead of Python floats."""
    abar = schedule.alphas_cumprod.tolist() if abar is None else abar
    if x is None:
        x = torch.randn(shape, generator=generator).to(device)
    seq = ddim_timesteps(schedule.steps, steps)
    if as_scan:
        if eta != 0:
            raise ValueError(f"ddim_sample: as_scan needs eta 0, got {eta}")
        like = {"dtype": x.dtype, "device": x.device}
        ts = torch.tensor(seq, dtype=torch.long, device=x.device)
        a_t = torch.tensor([abar[i] for i in seq], **like)
        # the last step goes to ᾱ = 1: x = 1·x̂_0 + 0·ε, its x̂_0 exactly
        a_prev = torch.tensor([abar[i] for i in seq[1:]] + [1.0], **like)

        def step(x: torch.Tensor, s: tuple[torch.Tensor, ...]) -> torch.Tensor:
            t, a, ap = s
            x0, e = _predict_x0(x, eps(x, t.expand(x.shape[0])), a.sqrt(), (1 - a).sqrt(), clip)
            return ap.sqrt() * x0 + (1 - ap).sqrt() * e

        return loop_as_scan(step, x, (ts, a_t, a_prev))
    for k, i in enumerate(seq):
        t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
        a = abar[i]
        x0, e = _predict_x0(x, eps(x, t), math.sqrt(a), math.sqrt(1 - a), clip)
        if k == len(seq) - 1:
            return x0
        a_prev = abar[seq[k + 1]]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * e
        if sigma > 0:
            x = x + sigma * torch.randn(shape, generator=generator).to(device)
    return x
