"""The energy-based model (gm.models.ebm, Du & Mordatch 2019): SGLD samples the right Gaussian
from a known quadratic energy; contrastive divergence lowers the energy of data relative to
samples; the replay buffer is in the checkpoint, so a resumed run continues exactly; bad
settings name the key."""

from __future__ import annotations

import pytest
import torch

from gm.config import from_dict
from gm.errors import ConfigError
from gm.metrics.quality import energy_roc_auc
from gm.models.ebm import EBMConfig, EnergyBasedModel, sgld
from gm.train.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from gm.train.loop import Trainer, set_rng_state
from gm.train.protocol import Batch, DataInfo


def test_sgld_on_a_quadratic_energy_samples_its_gaussian():
    """E(x) = ½ Σ (x − μ)² / s²: the update x ← x − λ∇E + σε is Langevin dynamics for
    exp(−E/T), T = σ²/(2λ); as a discrete chain (an AR(1) process) its stationary variance is
    exactly s²T / (1 − λ/(2s²)). 8,000 chains of 500 steps give that mean and variance."""
    mu, s = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.5])
    step, noise = 0.02, 0.2  # T = 0.04 / 0.04 = 1

    def energy(x):
        return (0.5 * ((x - mu) / s).pow(2)).sum(1)

    def variance(temperature):
        return s.pow(2) * temperature / (1 - step / (2 * s.pow(2)))

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8000, 2, generator=g) * 3
    x = sgld(energy, x0, 500, step, noise, bounds=None, generator=g)
    assert torch.allclose(x.mean(0), mu, atol=0.04), x.mean(0)
    assert torch.allclose(x.var(0), variance(1.0), rtol=0.05), (x.var(0), variance(1.0))
    colder = sgld(energy, x0, 500, step, noise / 2, bounds=None, generator=g)
    assert torch.allclose(colder.var(0), variance(0.25), rtol=0.05)
    assert not torch.allclose(colder.var(0), variance(1.0), rtol=0.5)


def _blobs(n: int, seed: int) -> Batch:
    """Class 0: a bright left half; class 1: a bright right half (8×8, 1 channel, [−1, 1])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 8, 8), -0.8) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.arange(n) % 2
    x[labels == 0, :, :, :4] += 1.4
    x[labels == 1, :, :, 4:] += 1.4
    return Batch(x.clamp(-1, 1), labels)


def _ebm(seed: int = 0, **kw) -> Trainer:
    torch.manual_seed(seed)
    raw = {"width": 8, "blocks": 2, "sgld_steps": 10, "buffer_size": 64, "sample_steps": 30,
           "optim": {"lr": 1e-3, "betas": [0.0, 0.999]}} | kw  # fmt: skip
    cfg = from_dict(EBMConfig, raw, "ebm")
    return Trainer(EnergyBasedModel(cfg, DataInfo(8, 1, 2)))


def test_training_lowers_the_energy_of_data_relative_to_samples_and_noise():
    trainer = _ebm()
    model = trainer.model
    cd = []
    for i in range(60):
        metrics = trainer.train_step(_blobs(16, i))
        cd.append(metrics["cd/cd"])  # E(data) − E(SGLD samples)
    assert sum(cd[20:]) / 40 < -0.01, cd
    test = _blobs(128, 1000)
    noise = torch.rand(128, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        e_data = model.energy(test.images, test.labels)
        e_noise = model.energy(noise, test.labels)
        e_wrong = model.energy(test.images, 1 - test.labels)
    auc = energy_roc_auc(e_data, e_noise)  # P(E(data) < E(noise)): the OOD metric
    assert auc == pytest.approx(float((e_data[:, None] < e_noise[None, :]).float().mean()))
    assert auc > 0.6, auc
    assert e_data.mean() < e_wrong.mean() - 0.02  # the class-conditional energy knows the class
    # the buffer holds the chains' ends: moved away from the uniform noise it started as
    assert not torch.equal(model.buffer_x, _ebm().model.buffer_x)
    # samples from noise take their class's shape: a bright left half for 0, right for 1
    x = model.sample(8, labels=torch.tensor([0] * 4 + [1] * 4),
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert x.shape == (8, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    left_minus_right = x[..., :4].mean((1, 2, 3)) - x[..., 4:].mean((1, 2, 3))
    assert bool((left_minus_right[:4] > 0.5).all() and (left_minus_right[4:] < -0.5).all())


def test_the_replay_buffer_is_in_the_checkpoint_and_a_resumed_run_continues_exactly(tmp_path):
    trainer = _ebm()
    for i in range(3):
        trainer.train_step(_blobs(8, i))
    path = tmp_path / "ebm.pt"
    save_checkpoint(path, "ebm", trainer.model.cfg, trainer.model.info, trainer.state_dict())
    payload = load_checkpoint(path, family="ebm")
    model, _, _ = build_from_checkpoint(payload)
    resumed = Trainer(model)
    resumed.load_state_dict(payload["trainer"])
    assert torch.equal(resumed.model.buffer_x, trainer.model.buffer_x)
    assert torch.equal(resumed.model.buffer_y, trainer.model.buffer_y)
    # both trainers share this process's RNG: each continues from the checkpoint's state
    set_rng_state(payload["trainer"]["rng"])
    a = [trainer.train_step(_blobs(8, i)) for i in range(3, 5)]
    set_rng_state(payload["trainer"]["rng"])
    b = [resumed.train_step(_blobs(8, i)) for i in range(3, 5)]
    assert a == b
    assert torch.equal(resumed.model.buffer_x, trainer.model.buffer_x)
    for (k, v), (_, w) in zip(trainer.model.state_dict().items(),
                              resumed.model.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(v, w), k


def test_bad_ebm_settings_name_the_key():
    with pytest.raises(ConfigError, match="ebm.reinit_prob"):
        from_dict(EBMConfig, {"reinit_prob": 1.5}, "ebm")
    with pytest.raises(ConfigError, match="ebm.sgld_steps"):
        from_dict(EBMConfig, {"sgld_steps": 0}, "ebm")
    with pytest.raises(ValueError, match="conditional EBM needs >= 2 classes"):
        EnergyBasedModel(EBMConfig(width=4, blocks=1, buffer_size=4), DataInfo(8, 1, 1))


def test_the_ood_metric_is_the_roc_auc_of_energies():
    low, high = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert energy_roc_auc(low, high) == 1.0  # every OOD image has a higher energy
    assert energy_roc_auc(high, low) == 0.0
    assert energy_roc_auc(torch.ones(4), torch.ones(4)) == 0.5  # ties: chance


def test_the_summary_table_shows_ood_auc_for_energy_models_only():
    from pipelines.summary import rank, table

    ex = {"sha256": "ab" * 32, "path": "clf.pt", "resize": "none"}
    evals = rank([
        {"name": "ebm", "family": "ebm", "dataset": "digits", "step": 5, "fid": 9.0,
         "ood_auc_noise": 0.987, "ood_auc_shuffled": 0.612, "extractor": ex},
        {"name": "sde", "family": "sde", "dataset": "digits", "step": 5, "fid": 3.0,
         "bits_per_dim": 2.5, "extractor": ex},
    ])  # fmt: skip
    text = table(evals)
    rows = {line.split("|")[3].strip(): line for line in text.splitlines() if "| digits |" in line}
    assert "| 0.987 | 0.612 |" in rows["ebm"]
    assert rows["sde"].rstrip().endswith("| 2.5 | – | – |")
    assert "OOD AUC noise" in text.splitlines()[0] and "pixels shuffled" in text
