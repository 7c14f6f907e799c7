"""Score-based SDEs (gm.sde, gm.models.sde; Song et al. 2021): the perturbation kernels match
the SDEs they come from; with the exact score of a Gaussian, predictor–corrector and
probability-flow ODE sampling return its moments, and the ODE's log-likelihood is its
closed-form density; the family trains, samples and reports bits/dim."""

from __future__ import annotations

import math

import pytest
import torch

from gm import sde as sdelib
from gm.config import from_dict
from gm.errors import ConfigError
from gm.models.sde import ScoreSDEConfig
from gm.registry import families
from gm.train.loop import Trainer
from gm.train.protocol import Batch, DataInfo

PROCESSES = {
    "vp": sdelib.SDE("vp"),
    "subvp": sdelib.SDE("subvp"),
    "ve": sdelib.SDE("ve", sigma_min=0.01, sigma_max=5.0),
}
# The ODE starts from (and the likelihood evaluates) the prior N(0, σ_max²), not VE's true
# p_1 = N(μ, s² + σ_max²): σ_max must dwarf the data (the paper: the largest pairwise distance;
# 50 on CIFAR-10), or the mismatch shows (σ_max 5 moves the mean by μ·s/σ_max ≈ 0.04).
WIDE_VE = sdelib.SDE("ve", sigma_min=0.01, sigma_max=50.0)


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_the_perturbation_kernel_is_the_sdes_marginal(kind):
    """Euler–Maruyama paths of dx = f dt + g dw from x_0 = 1 have, at t = 0.3 and 1, the
    kernel's mean and variance (20,000 paths, 1,000 steps)."""
    process = PROCESSES[kind]
    g = torch.Generator().manual_seed(0)
    x = torch.ones(20000, 1)
    steps = 1000
    dt = 1 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt)
        noise = torch.randn(x.shape, generator=g)
        x = x + process.drift(x, t) * dt + process.diffusion(t)[:, None] * math.sqrt(dt) * noise
        if i + 1 in (300, 1000):
            mean, std = process.mean_std(torch.tensor([(i + 1) * dt]))
            assert x.mean().item() == pytest.approx(mean.item(), abs=0.02 + 0.02 * std.item())
            assert x.var().item() == pytest.approx(std.item() ** 2, rel=0.04)


def _gaussian(process: sdelib.SDE, mu: torch.Tensor, s: torch.Tensor):
    """The exact score of p_t when p_0 = N(mu, diag s²): p_t = N(m·mu, m²s² + std²)."""

    def score(x, t):
        m, std = process.mean_std(t)
        var = m[:, None] ** 2 * s**2 + std[:, None] ** 2
        return -(x - m[:, None] * mu) / var

    return score


MU, S = torch.tensor([0.5, -0.3]), torch.tensor([0.3, 0.6])


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_pc_sampling_with_the_exact_score_returns_the_datas_moments(kind, predictor):
    process = PROCESSES[kind]
    g = torch.Generator().manual_seed(1)
    x = sdelib.pc_sample(process, _gaussian(process, MU, S), (4000, 2), predictor,
                         corrector_steps=1, snr=0.16, steps=400, generator=g)  # fmt: skip
    assert torch.allclose(x.mean(0), MU, atol=0.04), x.mean(0)
    assert torch.allclose(x.std(0), S, rtol=0.06), x.std(0)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_the_probability_flow_ode_samples_the_datas_moments(kind):
    process = WIDE_VE if kind == "ve" else PROCESSES[kind]
    g = torch.Generator().manual_seed(2)
    x = sdelib.ode_sample(process, _gaussian(process, MU, S), (4000, 2), rtol=1e-5, atol=1e-5,
                          generator=g)  # fmt: skip
    assert torch.allclose(x.mean(0), MU, atol=0.03), x.mean(0)
    assert torch.allclose(x.std(0), S, rtol=0.04), x.std(0)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_heuns_fixed_steps_follow_the_adaptive_solver(kind):
    """The exported generator's solver: 100 Heun steps land on the adaptive RK45 solution from
    the same prior points, and so sample the data's moments."""
    process = WIDE_VE if kind == "ve" else PROCESSES[kind]
    score = _gaussian(process, MU, S)
    x1 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(3)) * process.prior_std()
    heun = sdelib.heun_sample(process, score, x1, steps=100)
    rk45 = sdelib.ode_sample(process, score, (4000, 2), rtol=1e-5, atol=1e-5, x=x1)
    assert (heun - rk45).abs().max() < 0.02
    assert torch.allclose(heun.mean(0), MU, atol=0.03), heun.mean(0)
    assert torch.allclose(heun.std(0), S, rtol=0.04), heun.std(0)
    with pytest.raises(ValueError, match="steps 0"):
        sdelib.heun_sample(process, score, x1, steps=0)


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_the_ode_log_likelihood_of_a_gaussian_is_its_density(kind):
    """Exact trace, with the true p_1 as the prior: within 2e-4 nats of log N(x; mu, s²);
    with the SDE's N(0, prior_std²) prior (what bits/dim uses) within 1e-2 (VP leaves
    exp(−5)·mu of the mean at t = 1; VE, the data's mean and variance). Hutchinson's
    estimate (one Rademacher probe per copy) is unbiased: its mean over 400 copies is within
    three standard errors."""
    process = WIDE_VE if kind == "ve" else PROCESSES[kind]
    mu, s = MU.double(), S.double()
    score = _gaussian(process, mu, s)
    x = torch.tensor([[0.5, -0.3], [0.9, 0.4], [0.1, -1.2]], dtype=torch.float64)
    closed = torch.distributions.Normal(mu, s).log_prob(x).sum(1)

    def p1(y):
        m, std = process.mean_std(torch.ones(1, dtype=torch.float64))
        return torch.distributions.Normal(m * mu, (m**2 * s**2 + std**2).sqrt()).log_prob(y).sum(1)

    exact = sdelib.ode_log_likelihood(process, score, x, exact_trace=True, prior=p1)
    assert torch.allclose(exact, closed, atol=2e-4), (exact, closed)
    default = sdelib.ode_log_likelihood(process, score, x, exact_trace=True)
    assert torch.allclose(default, closed, atol=1e-2), (default, closed)
    # Rademacher probes are exact on a diagonal Jacobian: a correlated Gaussian for Hutchinson
    cov = torch.tensor([[0.09, 0.12], [0.12, 0.36]], dtype=torch.float64)

    def full_score(y, t):
        m, std = process.mean_std(t)
        cov_t = m[:, None, None] ** 2 * cov + std[:, None, None] ** 2 * torch.eye(2).double()
        return -torch.linalg.solve(cov_t, (y - m[:, None] * mu)[..., None])[..., 0]

    def full_p1(y):
        m, std = process.mean_std(torch.ones(1, dtype=torch.float64))
        cov_1 = m**2 * cov + std**2 * torch.eye(2).double()
        return torch.distributions.MultivariateNormal(m * mu, cov_1).log_prob(y)

    target = torch.distributions.MultivariateNormal(mu, cov).log_prob(x[1])
    copies = x[1:2].expand(400, -1).contiguous()
    g = torch.Generator().manual_seed(3)
    est = sdelib.ode_log_likelihood(process, full_score, copies, rtol=1e-4, atol=1e-4,
                                    prior=full_p1, generator=g)  # fmt: skip
    assert est.std() > 0.01  # a stochastic estimate
    assert est.mean().item() == pytest.approx(target.item(), abs=3 * est.std().item() / 20 + 1e-3)


def test_bits_per_dim_dequantizes_8_bit_images():
    """bits/dim of 8-bit images is −log₂ p01(x01)/D + 8 at the dequantized x01 = (k + u)/256,
    and p01 is the model's density on [−1, 1] times 2^D: for p_0 = N(0, 0.8² I) (exact
    score and true p_1), −log₂ N(2·x01 − 1)/D + 7."""
    process = sdelib.SDE("vp")
    mu, s = torch.zeros(2, dtype=torch.float64), torch.full((2,), 0.8, dtype=torch.float64)

    def p1(y):
        m, std = process.mean_std(torch.ones(1, dtype=torch.float64))
        return torch.distributions.Normal(0.0, (m**2 * s**2 + std**2).sqrt()).log_prob(y).sum(1)

    images = torch.tensor([[0.0, 0.5], [-1.0, 1.0]], dtype=torch.float64)
    images = torch.round((images + 1) * 127.5) / 127.5 - 1
    bpd = sdelib.bits_per_dim(process, _gaussian(process, mu, s), images, exact_trace=True,
                              prior=p1, generator=torch.Generator().manual_seed(0))  # fmt: skip
    u = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)).double()
    x = (torch.round((images + 1) * 127.5) + u) / 256 * 2 - 1
    expected = -torch.distributions.Normal(mu, s).log_prob(x).sum(1) / (2 * math.log(2)) + 7
    assert torch.allclose(bpd, expected, atol=1e-3), (bpd, expected)


TINY = {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
        "dropout": 0.0, "sample_steps": 6, "conditional": True, "ode_tolerance": 1e-3,
        "heun_steps": 4}  # fmt: skip


def _model(**kw):
    torch.manual_seed(0)
    cfg = from_dict(ScoreSDEConfig, TINY | kw, "sde")
    return Trainer(families()["sde"].build(cfg, DataInfo(8, 1, 2)))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.round((torch.rand(8, 1, 8, 8, generator=g) * 0.4 - 0.2 + 0.5) * 127.5) / 127.5 - 1
    return Batch(x, torch.arange(8) % 2)


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_the_family_trains_samples_with_every_sampler_and_reports_bits_per_dim(kind):
    trainer = _model(sde=kind, sigma_max=4.0, likelihood_weighting=kind == "subvp")
    losses = [trainer.train_step(_batch(i))["loss/dsm"] for i in range(25)]
    assert sum(losses[-5:]) < sum(losses[:5])
    model = trainer.model
    for sampler in ("pc", "ode", "heun"):
        object.__setattr__(model.cfg, "sampler", sampler)
        x = model.sample(
            3, labels=torch.tensor([0, 1, 0]), generator=torch.Generator().manual_seed(0)
        )
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1
    model.eval()
    torch.manual_seed(0)
    bpd = model.bits_per_dim(_batch(99))
    assert bpd.shape == (8,) and torch.isfinite(bpd).all() and (bpd > 0).all()


def test_bad_sde_settings_name_the_key():
    with pytest.raises(ConfigError, match="sde.sde"):
        from_dict(ScoreSDEConfig, {"sde": "cld"}, "sde")
    with pytest.raises(ConfigError, match="sde.sigma_max"):
        from_dict(ScoreSDEConfig, {"sigma_min": 1.0, "sigma_max": 0.5}, "sde")
    with pytest.raises(ConfigError, match="sde.sampler"):
        from_dict(ScoreSDEConfig, {"sampler": "ddim"}, "sde")
    with pytest.raises(ConfigError, match="sde.heun_steps"):
        from_dict(ScoreSDEConfig, {"heun_steps": 0}, "sde")
    with pytest.raises(ConfigError, match="sde.snr"):
        from_dict(ScoreSDEConfig, {"snr": 0}, "sde")
