"""DDPM schedules and samplers (gm.diffusion): the forward process has the documented mean
and variance, the posterior is the Gaussian the paper derives, and the samplers land on the
data when the noise prediction is exact."""

from __future__ import annotations

import math

import pytest
import torch

from gm.diffusion import (
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    guided,
)


def test_linear_schedule_is_the_papers():
    s = NoiseSchedule.linear()
    assert s.steps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # ᾱ_T is tiny: x_T is (almost) pure noise (the paper: L_T ≈ 1e-5 bits/dim)
    assert s.alphas_cumprod[-1].item() < 5e-5


def test_cosine_schedule_follows_its_formula_and_ends_in_noise():
    s = NoiseSchedule.cosine(1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 250, 500, 900):
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-6)
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())
    assert s.alphas_cumprod[-1].item() < 1e-4 and s.betas.max().item() <= 0.999


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_process_at_t_has_the_documented_mean_and_variance(name):
    s = NoiseSchedule.named(name, 1000)
    x0 = torch.tensor([0.7, -0.3, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for t in (0, 100, 500, 999):
        n = 200_000
        tt = torch.full((n,), t)
        xt = s.q_sample(x0.expand(n, 3), tt, torch.randn(n, 3, generator=g, dtype=torch.float64))
        mean, var = s.q_mean_var(x0.expand(1, 3), tt[:1])
        abar = s.alphas_cumprod[t].item()
        assert torch.allclose(mean[0], math.sqrt(abar) * x0)
        assert var[0, 0].item() == pytest.approx(1 - abar)
        se = math.sqrt((1 - abar) / n)
        assert torch.allclose(xt.mean(0), mean[0], atol=5 * se + 1e-12)
        assert torch.allclose(xt.var(0), var[0], rtol=0.02, atol=1e-12)


def test_posterior_is_the_product_of_the_two_gaussians():
    """q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0): multiply the two densities
    in closed form (precisions add) and compare with the schedule's μ̃_t, β̃_t."""
    s = NoiseSchedule.linear(100)
    x0, xt = torch.tensor([[0.4]], dtype=torch.float64), torch.tensor([[-1.1]], dtype=torch.float64)
    for t in (1, 10, 99):
        a, b = s.alphas[t].item(), s.betas[t].item()
        abar_prev = s.alphas_cumprod[t - 1].item()
        # x_t | x_{t-1} ~ N(√a x_{t-1}, b): as a density in x_{t-1}, mean x_t/√a, variance b/a
        prec = a / b + 1 / (1 - abar_prev)
        mean = (a / b * (xt.item() / math.sqrt(a)) + math.sqrt(abar_prev) * x0.item()
                / (1 - abar_prev)) / prec  # fmt: skip
        mu, var = s.posterior(x0, xt, torch.tensor([t]))
        assert mu.item() == pytest.approx(mean, rel=1e-9)
        assert var.item() == pytest.approx(1 / prec, rel=1e-9)


def oracle(s: NoiseSchedule, x0: torch.Tensor):
    """ε̂ that is exactly the noise separating x_t from the known x_0."""

    def eps(x, t):
        abar = s._at(s.alphas_cumprod, t, x)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    return eps


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_sampling_with_exact_noise_prediction_returns_the_data(variance):
    s = NoiseSchedule.linear(200)
    x0 = torch.tensor([[0.5, -0.25], [0.9, 0.0]])
    g = torch.Generator().manual_seed(1)
    out = ddpm_sample(oracle(s, x0), s, (2, 2), generator=g, variance=variance)
    assert torch.allclose(out, x0, atol=1e-5)


def test_ddim_is_deterministic_and_exact_with_exact_noise_prediction():
    s = NoiseSchedule.cosine(1000)
    x0 = torch.tensor([[0.3, -0.8, 0.1]])
    start = torch.randn(1, 3, generator=torch.Generator().manual_seed(2))
    a = ddim_sample(oracle(s, x0), s, (1, 3), steps=20, x=start.clone())
    b = ddim_sample(oracle(s, x0), s, (1, 3), steps=20, x=start.clone())
    assert torch.equal(a, b) and torch.allclose(a, x0, atol=1e-5)
    assert ddim_timesteps(1000, 5) == [999, 799, 599, 399, 199]
    with pytest.raises(ValueError, match="must be in 1..1000"):
        ddim_timesteps(1000, 0)


def test_ddim_as_one_scan_is_the_loop():
    s = NoiseSchedule.cosine(1000)
    x0 = torch.tensor([[0.3, -0.8, 0.1], [0.9, 0.5, -0.2]])
    start = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    a = ddim_sample(oracle(s, x0), s, (2, 3), steps=7, x=start.clone())
    b = ddim_sample(oracle(s, x0), s, (2, 3), steps=7, x=start.clone(), as_scan=True)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(b, x0, atol=1e-5)
    with pytest.raises(ValueError, match="as_scan needs eta 0, got 0.5"):
        ddim_sample(oracle(s, x0), s, (2, 3), steps=7, eta=0.5, x=start, as_scan=True)


def test_exported_ddpm_sampler_holds_its_unet_once_whatever_the_steps():
    """torch.export of the DDIM generator: the steps are one scan, so the graph (and the
    export's time) does not grow with sample_steps; the exported program is the eager loop."""
    from gm.config import from_dict
    from gm.registry import families
    from gm.train.protocol import DataInfo

    from .test_models_contract import TINY

    fam, info = families()["ddpm"], DataInfo(8, 1, 3)
    z, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)
    nodes = []
    for steps in (2, 6):
        torch.manual_seed(0)
        cfg = from_dict(fam.config, TINY["ddpm"] | {"sample_steps": steps}, "ddpm")
        gen = fam.build(cfg, info).eval().generator().eval()
        program = torch.export.export(gen, (z, labels))
        nodes.append(len(program.graph.nodes))
        assert any("scan" in str(n.target) for n in program.graph.nodes)
        with torch.no_grad():
            assert torch.allclose(program.module()(z, labels), gen(z, labels), atol=1e-5)
    assert nodes[0] == nodes[1]


@pytest.mark.parametrize("total", [1000, 37])
def test_ddim_timesteps_follow_the_papers_linear_selection_for_every_step_count(total):
    # Song et al. 2021, D.2: tau_i = floor(c i), i = 1..S, tau_S = T (1-based) -> index - 1.
    for steps in range(1, total + 1):
        seq = ddim_timesteps(total, steps)
        assert len(seq) == steps and seq[0] == total - 1, steps
        assert seq == sorted(set(seq), reverse=True), steps  # strictly descending
        assert seq == [math.floor(i * total / steps) - 1 for i in range(steps, 0, -1)], steps
        gaps = {a - b for a, b in zip(seq, seq[1:])} | {seq[-1] + 1}  # incl. the step to t=0
        assert gaps <= {total // steps, -(-total // steps)}, steps  # even spacing
    assert ddim_timesteps(total, total) == list(range(total - 1, -1, -1))


def gaussian_oracle(s: NoiseSchedule, sigma: float):
    """The exact ε-predictor for data x0 ~ N(0, σ² I): E[ε | x_t] = √(1−ᾱ) x_t / (ᾱσ² + 1 − ᾱ)."""
    abar = s.alphas_cumprod

    def eps(x, t):
        a = abar[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * x / (a * sigma**2 + 1 - a)

    return eps


def test_one_step_ddim_starts_from_pure_noise_and_gives_the_posterior_mean():
    # The old spacing ran one step at t = 0: the "sample" was the input noise (std 1.0 for
    # data of std 0.5). Starting at T-1, one step returns E[x0 | x_T], in closed form.
    s, sigma = NoiseSchedule.linear(1000), 0.5
    start = torch.randn(8, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = ddim_sample(gaussian_oracle(s, sigma), s, (8, 4096), steps=1, x=start.clone(), clip=False)
    a = s.alphas_cumprod[-1].item()
    assert torch.allclose(out, start * math.sqrt(a) * sigma**2 / (a * sigma**2 + 1 - a))
    assert out.std().item() < 0.01


def test_ddim_with_the_exact_score_of_gaussian_data_converges_to_its_variance():
    # The discretized probability-flow ODE: the std rises toward σ as the steps grow
    # (0.37 at 10 steps, 0.47 at 50, 0.49 at T on this schedule).
    s, sigma = NoiseSchedule.linear(1000), 0.5
    start = torch.randn(8, 4096, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    stds = []
    for steps in (1, 10, 50, 200, 1000):
        out = ddim_sample(gaussian_oracle(s, sigma), s, (8, 4096), steps, x=start, clip=False)
        stds.append(out.std().item())
        assert abs(out.mean().item()) < 0.01
    assert stds == sorted(stds) and stds[-1] == pytest.approx(sigma, rel=0.02)


def test_classifier_free_guidance_mixes_the_two_predictions():
    def eps(x, t, labels):  # a "network" whose prediction is its label
        return labels.to(x.dtype).reshape(-1, 1).expand_as(x)

    labels = torch.tensor([3, 5])
    x, t = torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    assert torch.equal(guided(eps, labels, null=0, w=0.0)(x, t)[:, 0], torch.tensor([3.0, 5.0]))
    mixed = guided(eps, labels, null=0, w=2.0)(x, t)[:, 0]  # (1 + w)·c − w·0
    assert torch.equal(mixed, torch.tensor([9.0, 15.0]))
