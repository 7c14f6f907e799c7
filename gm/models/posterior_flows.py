"""Normalizing flows in a VAE's approximate posterior (Rezende & Mohamed, ICML 2015; Kingma,
Salimans, Jozefowicz, Chen, Sutskever & Welling, NeurIPS 2016).

A sample of the base posterior z₀ ~ q₀(z|x) = N(μ, diag σ²) goes through K invertible maps,
z_K = f_K ∘ … ∘ f_1(z₀), so that

    log q_K(z_K | x) = log q₀(z₀ | x) − Σ_k log |det ∂f_k/∂z_{k−1}|

and the ELBO's KL term becomes the one-sample estimate log q₀(z₀) − Σ log|det| − log p(z_K).
The flows' parameters are amortized: each step reads the encoder's features h (B, H), as in
van den Berg et al. (UAI 2018) for planar flows and Kingma et al. for IAF's context.

- :class:`PlanarFlow`: f(z) = z + û tanh(wᵀz + b), log|det| = log|1 + ûᵀ ψ(z)|,
  ψ = tanh'(wᵀz + b) w; û = u + (m(wᵀu) − wᵀu) w/‖w‖², m(a) = −1 + softplus(a), which keeps
  wᵀû ≥ −1 so f is invertible (Rezende & Mohamed, appendix A.1).
- :class:`RadialFlow`: f(z) = z + β h(α, r)(z − z₀'), r = ‖z − z₀'‖, h = 1/(α + r),
  log|det| = (d − 1) log(1 + βh) + log(1 + βh + βh'r); α = softplus(α̃) > 0 and
  β = −α + softplus(β̃) ≥ −α keep it invertible (appendix A.2).
- :class:`IAFStep`: z' = σ ⊙ z + (1 − σ) ⊙ m with [m, s] = MADE(z, h), σ = sigmoid(s + 1)
  (Kingma et al.'s numerically stable LSTM-style update), log|det| = Σ log σ; the dimensions
  are reversed between steps. The MADE (Germain et al., ICML 2015) masks make m_i, s_i depend
  on z_<i only, so the Jacobian is triangular.

All maps take z (B, D) and h (B, H) and return (z', log|det| (B,)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _near_identity(params: nn.Linear) -> None:
    """Start an amortized step close to the identity whatever the size of the encoder's
    features (thousands of conv activations): outputs of order 0.01, not exactly 0 (planar's
    u = w = 0 is a saddle with no gradient)."""
    nn.init.normal_(params.weight, std=0.01 / params.in_features**0.5)
    nn.init.normal_(params.bias, std=0.01)


class PlanarFlow(nn.Module):
    def __init__(self, dim: int, context: int):
        super().__init__()
        self.dim = dim
        self.params = nn.Linear(context, 2 * dim + 1)  # u, w, b from h
        _near_identity(self.params)

    def step_parameters(self, h: torch.Tensor):
        """(û, w, b) of each sample's step, û constrained so that wᵀû ≥ −1."""
        u, w, b = self.params(h).split([self.dim, self.dim, 1], dim=1)
        wu = (w * u).sum(1, keepdim=True)
        u_hat = u + (F.softplus(wu) - 1 - wu) * w / (w.pow(2).sum(1, keepdim=True) + 1e-8)
        return u_hat, w, b

    def forward(self, z: torch.Tensor, h: torch.Tensor):
        u_hat, w, b = self.step_parameters(h)
        a = (w * z).sum(1, keepdim=True) + b
        t = torch.tanh(a)
        psi = (1 - t.pow(2)) * w
        logdet = torch.log((1 + (u_hat * psi).sum(1)).abs().clamp_min(1e-12))
        return z + u_hat * t, logdet


class RadialFlow(nn.Module):
    def __init__(self, dim: int, context: int):
        super().__init__()
        self.dim = dim
        self.params = nn.Linear(context, dim + 2)  # z₀', α̃, β̃ from h
        _near_identity(self.params)

    def forward(self, z: torch.Tensor, h: torch.Tensor):
        z0, a, b = self.params(h).split([self.dim, 1, 1], dim=1)
        alpha = F.softplus(a)
        beta = -alpha + F.softplus(b)
        diff = z - z0
        r = diff.norm(dim=1, keepdim=True)
        hr = 1 / (alpha + r)
        bh = beta * hr
        logdet = (self.dim - 1) * torch.log1p(bh) + torch.log1p(bh - beta * hr.pow(2) * r)
        return z + bh * diff, logdet.squeeze(1)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE)."""

    def __init__(self, cin: int, cout: int, mask: torch.Tensor):
        super().__init__(cin, cout)
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    def __init__(self, dim: int, context: int, hidden: int = 0, reverse: bool = False):
        super().__init__()
        hidden = hidden or 2 * dim
        self.dim, self.reverse = dim, reverse
        degrees_in = torch.arange(1, dim + 1)
        degrees_h = torch.arange(hidden) % max(dim - 1, 1) + 1  # 1 … D−1
        self.inp = MaskedLinear(dim, hidden, degrees_h[:, None] >= degrees_in[None, :])
        self.ctx = nn.Linear(context, hidden)
        self.mid = MaskedLinear(hidden, hidden, degrees_h[:, None] >= degrees_h[None, :])
        out_mask = degrees_in[:, None] > degrees_h[None, :]  # output i sees hidden of degree < i
        self.out = MaskedLinear(hidden, 2 * dim, torch.cat([out_mask, out_mask]))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, h: torch.Tensor):
        if self.reverse:
            z = z.flip(1)
        a = F.elu(self.inp(z) + self.ctx(h))
        a = F.elu(self.mid(a))
        m, s = self.out(a).chunk(2, dim=1)
        gate = torch.sigmoid(s + 1.0)
        out = gate * z + (1 - gate) * m
        logdet = F.logsigmoid(s + 1.0).sum(1)
        if self.reverse:
            out = out.flip(1)
        return out, logdet


FLOWS = {"planar": PlanarFlow, "radial": RadialFlow, "iaf": IAFStep}


class PosteriorFlow(nn.Module):
    """K steps of one kind; (z₀ (B, D), h (B, H)) → (z_K, Σ log|det| (B,)).

    The steps read a bounded context c = tanh(W h + b) (B, ``CONTEXT``) rather than the
    encoder's raw features: with thousands of unnormalized conv activations, one Adam step on
    a step's parameter layer would move u, w by O(lr·Σ|h|) ≈ 1 and the flow would throw z_K
    far into the prior's tail (seen: the KL term grew to 5,000 nats in 200 steps)."""

    CONTEXT = 64

    def __init__(self, kind: str, length: int, dim: int, context: int):
        super().__init__()
        self.context = nn.Sequential(nn.Linear(context, self.CONTEXT), nn.Tanh())
        c = self.CONTEXT
        if kind == "iaf":
            steps = [IAFStep(dim, c, reverse=bool(k % 2)) for k in range(length)]
        else:
            steps = [FLOWS[kind](dim, c) for _ in range(length)]
        self.steps = nn.ModuleList(steps)

    def forward(self, z: torch.Tensor, h: torch.Tensor):
        h = self.context(h)
        total = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for step in self.steps:
            z, logdet = step(z, h)
            total = total + logdet
        return z, total


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag exp(log_var)) summed over the last dimension, (B,)."""
    return -0.5 * ((z - mu).pow(2) / log_var.exp() + log_var + math.log(2 * math.pi)).sum(1)
