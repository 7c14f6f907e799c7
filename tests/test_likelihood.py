"""Likelihood models: the normalizing flow is invertible and its log-determinant is the
brute-force Jacobian's; its bits/dim is a code length of the 8-bit data."""

from __future__ import annotations

import math

import pytest
import torch

from gm.models.flow import Flow, FlowConfig, squeeze, unsqueeze
from gm.train.protocol import Batch, DataInfo


def random_flow(levels=2, steps=2, res=4, ch=1, seed=0) -> Flow:
    """A flow whose couplings and actnorms are not at their identity initialization."""
    torch.manual_seed(seed)
    model = Flow(FlowConfig(levels=levels, steps=steps, hidden=6), DataInfo(res, ch, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_squeeze_is_a_permutation_and_unsqueeze_its_inverse():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    y = squeeze(x)
    assert y.shape == (2, 12, 2, 2)
    assert torch.equal(unsqueeze(y), x)
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)


def test_flow_inverse_of_forward_is_the_identity():
    model = random_flow(res=8, ch=3)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    latents, _ = model.flow(x)
    assert [tuple(v.shape[1:]) for v in latents] == model.flow.shapes
    assert torch.allclose(model.flow.inverse(latents), x, atol=1e-10)


def test_log_determinant_matches_the_brute_force_jacobian():
    model = random_flow(res=4, ch=1)  # 16 dimensions: the full 16x16 Jacobian is cheap

    def f(flat):
        latents, _ = model.flow(flat.reshape(1, 1, 4, 4))
        return torch.cat([v.flatten() for v in latents])

    for seed in range(3):
        x = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        jac = torch.autograd.functional.jacobian(f, x)
        _, brute = torch.linalg.slogdet(jac)
        _, logdet = model.flow(x.reshape(1, 1, 4, 4))
        assert torch.allclose(logdet[0], brute, atol=1e-9), (logdet, brute)


def test_log_density_includes_the_logit_transform_exactly():
    """log p_y(y) = log N(f(logit(y))) + log|det ∂(f∘logit)/∂y|: brute force over y."""
    model = random_flow(res=4, ch=1)
    y = torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def g(flat):
        z, _ = model.to_logit(flat.reshape(1, 1, 4, 4))
        latents, _ = model.flow(z)
        return torch.cat([v.flatten() for v in latents])

    _, logdet = torch.linalg.slogdet(torch.autograd.functional.jacobian(g, y))
    u = g(y)
    expected = -0.5 * (u**2).sum() - 8 * math.log(2 * math.pi) + logdet
    assert torch.allclose(model.log_prob_y(y.reshape(1, 1, 4, 4))[0], expected, atol=1e-9)


def test_bits_per_dim_is_a_code_length_of_8_bit_data():
    """Fitting a constant image lowers its bits/dim by more than 2 bits, and the code length
    stays positive (the dequantization bound is an upper bound of -log2 P >= 0)."""
    torch.manual_seed(0)
    model = Flow(FlowConfig(levels=1, steps=2, hidden=8), DataInfo(8, 1, 1))
    batch = Batch(torch.full((16, 1, 8, 8), 0.2), torch.zeros(16, dtype=torch.long))
    before = model.bits_per_dim(batch).mean().item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss, _ = model.loss("nll", batch, {"flow": model.flow})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.bits_per_dim(batch).mean().item()
    assert after < before - 2
    assert after > 0


def test_aae_regularization_moves_the_encoder_only_and_matches_the_prior():
    """The regularization phase changes the encoder and leaves the decoder; after training,
    the codes of the data have roughly the prior's mean and spread (the paper's point),
    which reconstruction alone does not give."""
    from gm.models.aae import AAEConfig, AdversarialAutoencoder
    from gm.train.loop import Trainer

    info = DataInfo(16, 1, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1
    batch = Batch(x, torch.arange(64) % 2)

    def train(phases):
        torch.manual_seed(0)
        model = AdversarialAutoencoder(AAEConfig(z_dim=2, width=8, d_hidden=64), info)
        model.phases = lambda: [p for p in AdversarialAutoencoder.phases(model) if p.name in phases]
        trainer = Trainer(model)
        for _ in range(300):
            trainer.train_step(batch)
        model.eval()
        with torch.no_grad():
            return model, model.ae.encode(x)

    torch.manual_seed(0)
    model = AdversarialAutoencoder(AAEConfig(z_dim=2, width=8, d_hidden=16), info)
    trainer = Trainer(model)
    dec = [p.detach().clone() for p in model.ae.decoder_net.parameters()]
    enc = [p.detach().clone() for p in model.ae.encoder.parameters()]
    model.phases = lambda: [p for p in AdversarialAutoencoder.phases(model) if p.name == "reg"]
    trainer.train_step(batch)
    assert all(torch.equal(a, b) for a, b in zip(dec, model.ae.decoder_net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(enc, model.ae.encoder.parameters()))

    _, plain = train({"recon"})
    _, regular = train({"recon", "Dz", "reg"})

    def gap(codes):  # distance of the codes' moments from N(0, I)'s
        return (codes.mean(0).abs().max() + (codes.std(0) - 1).abs().max()).item()

    assert gap(regular) < 0.5 < gap(plain), (gap(regular), gap(plain))


def test_discretized_logistic_mixture_sums_to_one_over_the_256_levels():
    from gm.models.hvae import dmol_log_prob

    g = torch.Generator().manual_seed(0)
    k, c = 3, 2
    params = torch.randn(1, k * (1 + 2 * c), 1, 1, generator=g, dtype=torch.float64)
    params[:, k + k * c :] = params[:, k + k * c :] * 0.5 - 2  # moderate scales
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    grid = torch.cartesian_prod(levels, levels)  # every (channel 0, channel 1) pair
    x = grid.T.reshape(1, 2, 1, -1).permute(3, 1, 0, 2).reshape(-1, 2, 1, 1)
    logp = dmol_log_prob(x, params.expand(len(x), -1, -1, -1), k)
    assert torch.logsumexp(logp, 0).exp().item() == pytest.approx(1.0, abs=1e-6)


def test_hvae_elbo_is_below_the_importance_weighted_bound():
    """log p(x) ≥ IWAE_k ≥ ELBO (Burda et al. 2016): averaged over images and samples, the
    64-sample bound is above the mean ELBO, and both are finite."""
    from gm.models.hvae import HVAE, HVAEConfig

    torch.manual_seed(0)
    cfg = HVAEConfig(width=8, z_channels=2, scales=2, groups_per_scale=2, mixtures=2)
    model = HVAE(cfg, DataInfo(8, 1, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.round(torch.rand(4, 1, 8, 8, generator=g) * 255) / 127.5 - 1
    with torch.no_grad():  # perturb the zero-initialized posteriors: q differs from the prior
        for conv in model.vae.posterior:
            conv.weight.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        elbo, iw = model.log_likelihood_bounds(x, k=64)
    assert torch.isfinite(elbo).all() and torch.isfinite(iw).all()
    assert (iw > elbo).all(), (iw, elbo)
    # the bound's bits/dim is the negative ELBO's: the same number the trainer reports
    bpd = model.bits_per_dim(Batch(x, torch.zeros(4, dtype=torch.long)))
    assert bpd.shape == (4,) and (bpd > 0).all()


def test_hvae_kl_warm_up_rises_linearly_to_one():
    from gm.models.hvae import HVAE, HVAEConfig

    model = HVAE(HVAEConfig(width=8, z_channels=2, kl_warmup_steps=10), DataInfo(8, 1, 1))
    seen = []
    for step in (0, 5, 10, 20):
        model.on_progress(step, 0)
        seen.append(model.beta.item())
    assert seen == [0.0, 0.5, 1.0, 1.0]
