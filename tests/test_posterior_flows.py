"""Normalizing flows in the CVAE's posterior (gm.models.posterior_flows): each flow's
log-determinant equals the brute-force Jacobian's, the maps stay invertible, IAF is
autoregressive, a flow of length 0 is exactly the plain CVAE, an identity flow's Monte-Carlo KL
matches the closed form, and a CVAE with each flow trains and restores."""

from __future__ import annotations

import pytest
import torch

from gm.config import from_dict
from gm.errors import ConfigError
from gm.models.cvae import ConditionalVAE, CVAEConfig, PosteriorFlowConfig
from gm.models.posterior_flows import IAFStep, PlanarFlow, PosteriorFlow, RadialFlow
from gm.train.protocol import Batch, DataInfo

KINDS = ("planar", "radial", "iaf")


def _randomized(flow: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The flow with weights far from its near-identity initialization."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return flow


@pytest.mark.parametrize("kind", KINDS)
def test_log_determinant_equals_the_brute_force_jacobians(kind):
    torch.manual_seed(0)
    dim, ctx = 5, 3
    flow = _randomized(PosteriorFlow(kind, 3, dim, ctx), seed=1).double()
    z, h = torch.randn(6, dim, dtype=torch.float64), torch.randn(6, ctx, dtype=torch.float64)
    out, logdet = flow(z, h)
    assert out.shape == z.shape and logdet.shape == (6,)
    assert not torch.allclose(out, z)  # not the identity
    for i in range(6):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: flow(v[None], h[i : i + 1])[0][0],
                                                 z[i])  # fmt: skip
        sign, brute = torch.linalg.slogdet(jac)
        assert sign != 0
        # relative too: a saturated IAF gate gives log-determinants near -28, where slogdet of
        # the brute-force Jacobian keeps ~1e-10 of relative precision (seen: 2.4e-9 apart)
        assert logdet[i].item() == pytest.approx(brute.item(), rel=1e-8, abs=1e-9)


def test_planar_and_radial_parameters_keep_the_maps_invertible():
    g = torch.Generator().manual_seed(2)
    planar = _randomized(PlanarFlow(4, 2), seed=3).double()
    h = torch.randn(500, 2, generator=g, dtype=torch.float64) * 5
    with torch.no_grad():
        u_hat, w, _ = planar.step_parameters(h)
        wu = (w * u_hat).sum(1)
    assert float(wu.min()) >= -1 - 1e-9 and float(wu.min()) < 0  # Rezende & Mohamed, A.1
    radial = _randomized(RadialFlow(4, 2), seed=4)
    h = h.float()
    # invertible ⇔ the radial profile is monotone: r ↦ r(1 + βh(r)) increases along any ray
    z0 = radial.params(h[:1]).split([4, 1, 1], dim=1)[0]
    ray = torch.linspace(0, 20, 400)[:, None] * torch.tensor([[1.0, 0.5, -0.3, 0.2]])
    out, _ = radial(z0 + ray, h[:1].expand(400, -1))
    dist = (out - z0).norm(dim=1)
    assert bool((dist[1:] >= dist[:-1] - 1e-6).all())


def test_iaf_steps_are_autoregressive_and_alternate_the_order():
    step = _randomized(IAFStep(4, 2), seed=5).double()
    z, h = torch.randn(4, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: step(v[None], h)[0][0], z)
    assert torch.equal(jac.triu(1), torch.zeros_like(jac))  # output i: inputs ≤ i only
    back = _randomized(IAFStep(4, 2, reverse=True), seed=5).double()
    jac = torch.autograd.functional.jacobian(lambda v: back(v[None], h)[0][0], z)
    assert torch.equal(jac.tril(-1), torch.zeros_like(jac))


def _vae(flow: dict | None, seed: int = 0) -> ConditionalVAE:
    torch.manual_seed(seed)
    raw = {"z_dim": 4, "width": 8, "embed_dim": 4}
    if flow is not None:
        raw["posterior_flow"] = flow
    return ConditionalVAE(from_dict(CVAEConfig, raw, "cvae"), DataInfo(16, 1, 3))


def _batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, (8, 1, 16, 16), generator=g).float() / 127.5 - 1).clamp(-1, 1)
    return Batch(x, torch.arange(8) % 3)


def test_a_flow_of_length_0_is_exactly_the_plain_cvae():
    plain, zero = _vae(None), _vae({"kind": "planar", "length": 0})
    assert plain.vae.flow is None and zero.vae.flow is None
    a, b = plain.state_dict(), zero.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(7)
    la, _ = plain.loss("elbo", _batch(), {"vae": plain.vae})
    torch.manual_seed(7)
    lb, _ = zero.loss("elbo", _batch(), {"vae": zero.vae})
    assert torch.equal(la, lb)


def test_an_identity_flow_gives_the_closed_form_kl_on_average():
    """Planar steps whose parameters are 0 are the identity with log|det| 0: the ELBO's
    Monte-Carlo KL then averages to the closed-form KL of the Gaussian posterior."""
    model = _vae({"kind": "planar", "length": 2})
    with torch.no_grad():
        for p in model.vae.flow.parameters():
            p.zero_()
    model.vae.eval()
    x, y = _batch().images[:1].expand(4000, -1, -1, -1), torch.zeros(4000, dtype=torch.long)
    with torch.no_grad():
        mu, log_var = model.vae.encode(x[:1], y[:1])
        exact = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum().item()
        torch.manual_seed(0)
        _, kl = model.vae(x, y)
    assert kl.mean().item() == pytest.approx(exact, abs=4 * kl.std().item() / 4000**0.5 + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cvae_with_a_posterior_flow_trains_and_restores(kind):
    model = _vae({"kind": kind, "length": 2})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = _batch()
    losses = []
    for _ in range(40):
        torch.manual_seed(len(losses))
        loss, metrics = model.loss("elbo", batch, {"vae": model.vae})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]) and "bits_per_dim" in metrics
    flow_grads = [p.grad for p in model.vae.flow.parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in flow_grads)
    clone = _vae({"kind": kind, "length": 2}, seed=1)
    clone.load_state_dict(model.state_dict())
    model.vae.eval(), clone.vae.eval()
    torch.manual_seed(3)
    a = model.bits_per_dim(batch)
    torch.manual_seed(3)
    assert torch.equal(a, clone.bits_per_dim(batch))


def test_bad_posterior_flow_settings_name_the_key():
    with pytest.raises(ConfigError, match="posterior_flow.kind"):
        from_dict(CVAEConfig, {"posterior_flow": {"kind": "maf", "length": 2}}, "cvae")
    with pytest.raises(ConfigError, match="posterior_flow.length"):
        from_dict(CVAEConfig, {"posterior_flow": {"kind": "iaf", "length": -1}}, "cvae")
    assert PosteriorFlowConfig().length == 0
