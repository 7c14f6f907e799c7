"""Progressive growing and multi-scale GANs: the structural facts of ProGAN, StyleGAN and
LAPGAN, the growth schedule, and a Ray Train run killed mid-fade-in."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gm.config import from_dict
from gm.errors import ConfigError
from gm.models.growth import (
    EqConv2d,
    EqLinear,
    GrowthConfig,
    LevelSettings,
    growth_at,
    minibatch_stddev,
    schedule,
)
from gm.models.lapgan import reconstruct, residuals, up
from gm.models.losses import r1_loss
from gm.models.progan import ProDiscriminator, ProGAN, ProGANConfig
from gm.models.stylegan import (
    StyleGAN,
    StyleGANConfig,
    StyleLayer,
    mix_styles,
    modulated_conv2d,
    truncate,
)
from gm.train.loop import Trainer
from gm.train.protocol import Batch, DataInfo

INFO = DataInfo(32, 3, 4)


def progan(loss="wgan_gp", r1_every=16, architecture="orig", **growth):
    torch.manual_seed(0)
    g = GrowthConfig(**({"fade_images": 40, "stable_images": 40} | growth))
    cfg = ProGANConfig(latent=16, fmap_base=256, fmap_max=16, growth=g, loss=loss,
                       r1_every=r1_every, architecture=architecture)  # fmt: skip
    return ProGAN(cfg, INFO)


def stylegan(**kw):
    torch.manual_seed(0)
    cfg = {"z_dim": 16, "w_dim": 16, "mapping_layers": 3, "fmap_base": 256, "fmap_max": 16} | kw
    return StyleGAN(from_dict(StyleGANConfig, cfg, "stylegan"), INFO)


def test_alpha_zero_output_is_the_previous_resolution_upsampled_exactly():
    G = progan().G
    z = torch.randn(3, 16)
    for level in (1, 2, 3):
        grown = G(z, level, alpha=0.0)
        previous = F.interpolate(G(z, level - 1, alpha=1.0), scale_factor=2, mode="nearest")
        assert grown.shape[-1] == 4 * 2**level and torch.equal(grown, previous)
        assert not torch.equal(G(z, level, alpha=0.5), previous)  # the new block shows
    for style in ("adain", "demod"):  # StyleGAN upsamples bilinearly; same noise both sides
        S = stylegan(style=style).G
        for level in (1, 2, 3):
            grown = S(z, level, 0.0, noise_gen=torch.Generator().manual_seed(4))
            low = S(z, level - 1, 1.0, noise_gen=torch.Generator().manual_seed(4))
            assert torch.equal(grown, F.interpolate(low, scale_factor=2, mode="bilinear"))


def test_discriminator_fades_in_the_same_way():
    D = progan().D
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    at_zero = D(img, 2, alpha=0.0)
    assert torch.equal(at_zero, D(F.avg_pool2d(img, 2), 1, alpha=1.0))


def test_equalized_lr_layers_have_unit_variance_activations_at_init():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    y = EqLinear(256, 256, gain=1.0)(x)
    assert abs(y.var().item() - 1.0) < 0.05
    y = EqLinear(256, 256, gain=1.0, lr_mul=0.01)(x)  # the mapping network's lr multiplier
    assert abs(y.var().item() - 1.0) < 0.05
    conv = EqConv2d(64, 64, 3, gain=1.0, padding=0)
    y = conv(torch.randn(64, 64, 12, 12))
    assert abs(y.var().item() - 1.0) < 0.05
    # the stored weights are N(0, 1); the He constant is applied at run time
    assert abs(conv.weight.std().item() - 1.0) < 0.02
    assert math.isclose(conv.scale, 1 / math.sqrt(64 * 9))


class Seen(torch.nn.Module):
    """A discriminator that keeps what it is shown (then scores it with the real one)."""

    def __init__(self, D):
        super().__init__()
        self.D, self.inputs = D, []

    def forward(self, x, level, alpha):
        self.inputs.append(x.detach())
        return self.D(x, level, alpha)


@pytest.mark.parametrize(("family", "mode"), [("progan", "nearest"), ("stylegan", "bilinear")])
def test_mid_fade_in_d_sees_reals_upsampled_as_g_fades(family, mode):
    """ProGAN's G fades a new level in over its nearest-upsampled lower output, StyleGAN's
    over its bilinear one; the real images D is shown must be blended the same way."""
    model = progan() if family == "progan" else stylegan()
    model.level.fill_(2)  # 16x16, fading in from 8x8
    model.alpha.fill_(0.0)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    D = Seen(model.D)
    model.loss("D", Batch(images=images, labels=torch.zeros(4, dtype=torch.long)),
               {"G": model.G, "D": D})  # fmt: skip
    low = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode=mode)
    assert torch.equal(D.inputs[0], low)  # the real images come first


def test_minibatch_stddev_appends_one_channel_with_the_group_statistic():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4, 4)
    y = minibatch_stddev(x, group_size=4)
    assert y.shape == (8, 6, 4, 4) and torch.equal(y[:, :5], x)
    for i in range(8):  # sample i's group: samples i % 2, i % 2 + 2, ...
        group = x[i % 2 :: 2]
        expected = group.std(dim=0, unbiased=False).mean()
        assert torch.allclose(y[i, 5], expected.expand(4, 4), atol=1e-5)


def test_style_mixing_uses_two_ws_at_the_crossover():
    w1, w2 = torch.zeros(2, 4), torch.ones(2, 4)
    ws = mix_styles(w1, w2, layers=8, crossover=3)
    assert ws.shape == (2, 8, 4)
    assert torch.equal(ws[:, :3], torch.zeros(2, 3, 4)) and torch.equal(
        ws[:, 3:], torch.ones(2, 5, 4)
    )
    G = stylegan().G
    z1, z2 = torch.randn(2, 16), torch.randn(2, 16)
    mixed = G(z1, 3, z2=z2, crossover=3, noise_gen=torch.Generator().manual_seed(0))
    manual = mix_styles(G.mapping(z1), G.mapping(z2), 8, 3)
    direct = G.synthesis(manual, 3, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, direct)


def test_truncation_at_psi_zero_gives_the_mean_w():
    w_avg = torch.randn(8)
    ws = torch.randn(3, 10, 8)
    t = truncate(ws, w_avg, psi=0.0, cutoff=8)
    assert torch.equal(t[:, :8], w_avg.expand(3, 8, 8)) and torch.equal(t[:, 8:], ws[:, 8:])
    assert torch.equal(truncate(ws, w_avg, psi=1.0, cutoff=8), ws)
    model = stylegan(truncation_psi=0.0, truncation_cutoff=100)
    model.G.w_avg.normal_()
    a = model.sample(2, generator=torch.Generator().manual_seed(0))
    b = model.sample(2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # every latent maps to w_avg (noise strengths start at 0)
    untruncated = stylegan()
    untruncated.G.load_state_dict(model.G.state_dict())
    c = untruncated.sample(2, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


def test_modulated_conv_equals_the_per_sample_demodulated_weights():
    """StyleGAN2 eq. 1 and 3, written as the paper's grouped convolution with one demodulated
    weight per sample, against gm's unfused form (scaled input, shared conv, scaled output)."""
    torch.manual_seed(0)
    b, c_in, c_out = 3, 5, 4
    x, weight = torch.randn(b, c_in, 8, 8), torch.randn(c_out, c_in, 3, 3) / math.sqrt(45)
    s = torch.rand(b, c_in) * 2 + 0.1
    w1 = weight[None] * s[:, None, :, None, None]  # (B, C_out, C_in, 3, 3)
    w2 = w1 * torch.rsqrt(w1.square().sum((2, 3, 4)) + 1e-8)[:, :, None, None, None]
    for per_sample, demodulate in ((w2, True), (w1, False)):
        grouped = F.conv2d(x.reshape(1, b * c_in, 8, 8), per_sample.reshape(-1, c_in, 3, 3),
                           padding=1, groups=b).reshape(b, c_out, 8, 8)  # fmt: skip
        out = modulated_conv2d(x, weight, s, demodulate=demodulate)
        assert out.shape == (b, c_out, 8, 8) and torch.allclose(out, grouped, atol=1e-5)


def test_demodulation_restores_unit_std_whatever_the_style():
    torch.manual_seed(0)
    x, weight = torch.randn(64, 32, 16, 16), torch.randn(16, 32, 3, 3)
    s = torch.rand(64, 32) * 5 + 0.01  # styles far from 1 and varying per sample
    out = modulated_conv2d(x, weight, s)
    std = out[:, :, 1:-1, 1:-1].std((0, 2, 3))  # away from the zero padding
    assert torch.allclose(std, torch.ones(16), atol=0.08)
    # a style scaled as a whole changes nothing: the scale is divided out again
    assert torch.allclose(modulated_conv2d(x, weight, 9 * s), out, atol=1e-4)
    assert modulated_conv2d(x, weight, s, demodulate=False).std() > 5


def test_demod_stylegan_styles_reach_the_image_and_learn():
    model = stylegan(style="demod", mapping_layers=2)
    layers = model.G.synthesis.layers
    assert not layers[0].demod and all(layer.demod for layer in layers[1:])
    assert layers[1].style.weight.shape == (16, 16)  # one scale per input channel
    z = torch.randn(4, 16)
    gen = torch.Generator().manual_seed(3)
    img = model.G(z, 3, noise_gen=gen)
    assert img.shape == (4, 3, 32, 32)
    # the same noise and a different w in the modulated layers only (layer 0 is AdaIN)
    ws = model.G.mapping(z)[:, None].expand(-1, 8, -1).clone()
    ws[:, 1:] = model.G.mapping(torch.randn(4, 16))[:, None]
    other = model.G.synthesis(ws, 3, 1.0, torch.Generator().manual_seed(3))
    assert (img - other).abs().mean() > 1e-3
    trainer = Trainer(model)
    before = {k: v.clone() for k, v in model.G.state_dict().items() if ".style." in k}
    for _ in range(3):
        g = model.growth(trainer.images_seen)
        x = torch.rand(4, 3, g.resolution, g.resolution) * 2 - 1
        logs = trainer.train_step(Batch(x, torch.zeros(4, dtype=torch.long)))
    assert all(math.isfinite(v) for v in logs.values() if isinstance(v, float))
    moved = [k for k, v in model.G.state_dict().items() if k in before and
             not torch.equal(v, before[k])]  # fmt: skip
    assert "synthesis.layers.1.style.weight" in moved


def test_an_unknown_style_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="style"):
        stylegan(style="adaln")
    with pytest.raises(ConfigError, match=r"style: 'adaln' is not one of 'adain' \| 'demod'"):
        StyleLayer(8, 8, 8, style="adaln")  # built outside a config
    with pytest.raises(ConfigError, match=r"architecture: 'skip' is not one of 'orig' \| 'resnet'"):
        ProDiscriminator(32, 3, lambda r: 8, architecture="skip")


def test_r1_is_the_squared_input_gradient_scaled_by_the_lazy_interval():
    w = torch.randn(3, 8, 8)
    D = lambda x: (x * w).flatten(1).sum(1) + 5.0  # noqa: E731  ∇ₓD = w
    loss, r1 = r1_loss(D, torch.randn(4, 3, 8, 8), gamma=10.0, every=4)
    assert r1 == pytest.approx(w.pow(2).sum().item(), rel=1e-5)
    assert loss.item() == pytest.approx(r1 * 10.0 / 2 * 4, rel=1e-5)


def test_progan_logistic_loss_is_non_saturating_with_a_lazy_r1_phase():
    model = progan(loss="logistic", r1_every=2)
    assert [(p.name, p.every) for p in model.phases()] == [("D", 1), ("Dreg", 2), ("G", 1)]
    assert [p.name for p in progan().phases()] == ["D", "G"]  # the paper's WGAN-GP
    G, D, nets = model.G, model.D, model.trainable()
    batch = Batch(torch.rand(4, 3, 4, 4) * 2 - 1, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(5)
    loss_d, extra = model.loss("D", batch, nets)
    torch.manual_seed(5)
    fake = G(torch.randn(4, 16), 0, 1.0)
    d_real, d_fake = D(batch.images, 0, 1.0), D(fake, 0, 1.0)
    expected = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    assert torch.allclose(loss_d, expected) and "gp" not in extra and "D_real" in extra
    torch.manual_seed(6)
    loss_g, _ = model.loss("G", batch, nets)
    torch.manual_seed(6)
    d_fake = D(G(torch.randn(4, 16), 0, 1.0), 0, 1.0)
    assert torch.allclose(loss_g, F.softplus(-d_fake).mean())
    torch.manual_seed(7)
    untouched = torch.randn(8)
    torch.manual_seed(7)  # the R1 phase draws no latents (with no augmentation: no draws)
    _, extra = model.loss("Dreg", batch, nets)
    assert torch.equal(torch.randn(8), untouched) and extra["r1"] > 0
    trainer = Trainer(model)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    logs = [trainer.train_step(batch) for _ in range(3)]
    r1 = [log.get("Dreg/r1") for log in logs]
    assert r1[0] > 0 and r1[1] is None and r1[2] > 0  # steps 0 and 2 of every 2
    assert all(math.isfinite(v) for log in logs for v in log.values() if isinstance(v, float))
    assert any(not torch.equal(v, before[k]) for k, v in D.state_dict().items())


def test_resnet_discriminator_carries_the_image_through_its_skips():
    orig, resnet = progan().D, progan(architecture="resnet").D
    assert not any("skips" in k for k in orig.state_dict())  # old checkpoints still load
    assert [tuple(s.weight.shape) for s in resnet.skips] == [(16, 16, 1, 1)] * 2 + [(16, 8, 1, 1)]
    assert all(s.bias is None for s in resnet.skips)
    img, other = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for D in (orig, resnet):  # blocks that output nothing: only a skip reaches the head
            for conv1, conv2 in D.blocks:
                for conv in (conv1, conv2):
                    conv.weight.zero_()
        assert torch.equal(orig(img, 3), orig(other, 3))
        assert not torch.allclose(resnet(img, 3), resnet(other, 3))
    # StyleGAN uses the same D; it trains through the skips
    model = stylegan(architecture="resnet")
    trainer = Trainer(model)
    before = model.D.skips[0].weight.clone()
    for _ in range(2):
        g = model.growth(trainer.images_seen)
        x = torch.rand(4, 3, g.resolution, g.resolution) * 2 - 1
        logs = trainer.train_step(Batch(x, torch.zeros(4, dtype=torch.long)))
    assert all(math.isfinite(v) for v in logs.values() if isinstance(v, float))
    assert not torch.equal(model.D.skips[0].weight, before)  # 8x8 -> 4x4, in use from the start


@pytest.mark.parametrize(
    ("key", "value"),
    [("loss", "hinge"), ("r1_every", 0), ("r1_gamma", -1), ("architecture", "skip")],
)
def test_progan_bad_loss_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        from_dict(ProGANConfig, {key: value}, "progan")


def test_laplacian_pyramid_of_the_dataset_reconstructs_the_image(toy_dataset):
    from gm.data.readers import ImageDataset

    levels = [ImageDataset(toy_dataset, r, split=None).tensors()[0] for r in (16, 8, 4)]
    h = residuals(levels)  # from the dataset's own levels, fine to coarse
    assert [x.shape[-1] for x in h] == [16, 8]
    again = reconstruct(levels[-1], list(reversed(h)))
    assert torch.allclose(again, levels[0], atol=1e-5)
    assert not torch.allclose(up(levels[1]), levels[0], atol=1e-3)  # the residuals matter


def test_lapgan_samples_run_coarse_to_fine():
    from gm.models.lapgan import LAPGAN, LAPGANConfig

    torch.manual_seed(0)
    model = LAPGAN(LAPGANConfig(levels=3, z_dim=8, coarse_hidden=16, width=8), INFO).eval()
    assert model.pyramid_levels() == (16, 8)
    assert model.latent_shape() == (8 + 16 * 16 + 32 * 32,)
    z = torch.randn(2, *model.latent_shape())
    with torch.no_grad():
        out = model.generator()(z)
        n = model.nets
        x8 = n["G8"](z[:, :8])  # the coarsest image, then a residual per finer level
        x16 = (up(x8) + n["G16"](z[:, 8 : 8 + 256].view(2, 1, 16, 16), up(x8))).clamp(-1, 1)
        x32 = (up(x16) + n["G32"](z[:, 8 + 256 :].view(2, 1, 32, 32), up(x16))).clamp(-1, 1)
        refined = model.generator().refine(x16, z[:, 8 + 256 :].view(2, 1, 32, 32))
    assert out.shape == (2, 3, 32, 32) and torch.equal(out, x32)
    assert torch.equal(refined, x32)  # one level up the chain, as bench/lapgan_levels.py uses it


def lapgan_batch(b: int = 4) -> Batch:
    """A batch of random 32×32 images with their 16×16 and 8×8 levels (2×2 means)."""
    x = torch.rand(b, 3, 32, 32) * 2 - 1
    levels = {16: F.avg_pool2d(x, 2), 8: F.avg_pool2d(x, 4)}
    return Batch(x, torch.zeros(b, dtype=torch.long), levels=levels)


def test_lapgan_samples_from_an_ema_of_every_level_generator():
    from gm.models.lapgan import LAPGAN, LAPGANConfig

    torch.manual_seed(0)
    model = LAPGAN(LAPGANConfig(levels=3, z_dim=8, coarse_hidden=16, width=8), INFO)
    trainer = Trainer(model, ema_beta=0.5)
    assert set(trainer.ema) == {"G8", "G16", "G32"}
    batch = lapgan_batch()
    for _ in range(3):
        trainer.train_step(batch)
    for name in trainer.ema:  # the copies trail the trained weights
        ema, live = trainer.ema[name].module.state_dict(), model.nets[name].state_dict()
        assert any(not torch.equal(ema[k], live[k]) for k in live), name
    with_ema = trainer.sample(4, seed=2)
    model.eval()
    without = model.sample(4, generator=torch.Generator().manual_seed(2))
    assert with_ema.shape == (4, 3, 32, 32) and not torch.equal(with_ema, without)


def test_lapgan_conv_coarse_level_updated_several_times_per_step():
    from gm.models.lapgan import LAPGAN, ConvCoarseD, ConvCoarseG, LAPGANConfig

    for res in (4, 8, 16):  # the pair spans any power-of-two coarsest level
        g, d = ConvCoarseG(8, res, 3, 4), ConvCoarseD(res, 3, 4)
        assert g(torch.randn(2, 8)).shape == (2, 3, res, res)
        assert d(torch.rand(2, 3, res, res)).shape == (2,)
    torch.manual_seed(0)
    cfg = LAPGANConfig(levels=3, z_dim=8, width=8, coarse="conv", coarse_width=4, coarse_updates=3)
    model = LAPGAN(cfg, INFO)
    assert isinstance(model.nets["G8"], ConvCoarseG) and isinstance(model.nets["D8"], ConvCoarseD)
    assert [p.name for p in model.phases()] == ["D8", "G8"] * 3 + ["D16", "G16", "D32", "G32"]
    trainer = Trainer(model)
    before = {k: v.clone() for k, v in model.nets["G8"].state_dict().items()}
    metrics = trainer.train_step(lapgan_batch())
    steps = {name: max(int(s["step"]) for s in opt.state.values())
             for name, opt in trainer.optimizers.items()}  # fmt: skip
    assert steps == {"G8": 3, "D8": 3, "G16": 1, "D16": 1, "G32": 1, "D32": 1}
    assert {"loss/D8", "loss/G8", "loss/G32"} <= set(metrics)
    after = model.nets["G8"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)
    model.eval()
    assert model.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"coarse: 'cnn' is not one of 'mlp' \| 'conv'"):
        from_dict(LAPGANConfig, {"coarse": "cnn"})
    with pytest.raises(ConfigError, match="coarse: 'cnn'"):
        LAPGANConfig(coarse="cnn")  # built outside a params file
    with pytest.raises(ConfigError, match="coarse_updates: must be >= 1"):
        LAPGANConfig(coarse_updates=0)


def test_the_schedule_switches_resolution_at_the_image_counts():
    cfg = GrowthConfig(
        start_resolution=8, fade_images=100, stable_images=200,
        per_resolution={16: LevelSettings(batch_size=8, lr=0.002, fade_images=50)},
    )  # fmt: skip
    phases = schedule(cfg, 32)
    assert [(g.resolution, g.alpha, n) for g, n in phases] == [
        (8, 1.0, 200), (16, 0.0, 50), (16, 1.0, 200), (32, 0.0, 100), (32, 1.0, 200),
    ]  # fmt: skip
    assert growth_at(phases, 199).resolution == 8 and growth_at(phases, 200).resolution == 16
    assert growth_at(phases, 225).alpha == 0.5 and growth_at(phases, 225).batch_size == 8
    assert growth_at(phases, 225).lr == 0.002 and growth_at(phases, 450).resolution == 32
    assert growth_at(phases, 500).alpha == 0.5 and growth_at(phases, 10**9).index == 4
    assert schedule(GrowthConfig(progressive=False), 32) == []


def test_trainer_sets_phase_lr_and_resets_optimizers_at_a_new_phase():
    per = {8: LevelSettings(lr=0.005)}
    model = progan(stable_images=8, fade_images=8, reset_optimizers=True, per_resolution=per)
    trainer = Trainer(model)
    seen = []
    for _ in range(4):
        g = model.growth(trainer.images_seen)
        x = torch.rand(4, 3, g.resolution, g.resolution) * 2 - 1
        trainer.train_step(Batch(x, torch.zeros(4, dtype=torch.long)))
        opt = trainer.optimizers["G"]
        adam_steps = int(opt.state[model.G.dense.weight]["step"])  # a weight used at all levels
        seen.append((g.index, opt.param_groups[0]["lr"], adam_steps))
    # 2 steps at 4x4 (lr 1e-3), then the 8x8 fade-in (lr 0.005) with fresh Adam state
    assert seen == [(0, 1e-3, 1), (0, 1e-3, 2), (1, 0.005, 1), (1, 0.005, 2)]
    assert trainer.growth_index == 1


def test_checkpoint_with_per_resolution_overrides_rebuilds_the_same_config(tmp_path):
    # the checkpoint keeps the config as JSON, whose object keys are strings: {8: …} → {"8": …}
    from gm.train.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint

    per = {8: LevelSettings(batch_size=2, lr=0.005), 16: LevelSettings(fade_images=24)}
    model = progan(reset_optimizers=True, per_resolution=per)
    save_checkpoint(tmp_path / "c.pt", "progan", model.cfg, INFO, Trainer(model).state_dict())
    rebuilt, _, _ = build_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert rebuilt.cfg == model.cfg
    assert rebuilt.cfg.growth.per_resolution[8].lr == 0.005
    assert rebuilt.growth(10**9).index == model.growth(10**9).index


def test_checkpoint_mid_fade_in_restores_alpha_and_resolution(tmp_path):
    from gm.train.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint

    model = progan()
    trainer = Trainer(model, ema_beta=0.9)
    for _ in range(14):  # 4x4: 40 images; 8x8 fade-in: 40 images
        g = model.growth(trainer.images_seen)
        x = torch.rand(4, 3, g.resolution, g.resolution) * 2 - 1
        trainer.train_step(Batch(x, torch.zeros(4, dtype=torch.long)))
    assert model.resolution == 8 and 0 < float(model.alpha) < 1
    cfg = model.cfg
    save_checkpoint(tmp_path / "c.pt", "progan", cfg, INFO, trainer.state_dict())
    payload = load_checkpoint(tmp_path / "c.pt")
    assert float(payload["trainer"]["model"]["alpha"]) == float(model.alpha)
    rebuilt, _, _ = build_from_checkpoint(payload)
    resumed = Trainer(rebuilt, ema_beta=0.9)
    resumed.load_state_dict(payload["trainer"])
    assert rebuilt.resolution == 8 and float(rebuilt.alpha) == float(model.alpha)
    assert resumed.growth_index == trainer.growth_index == 1
    assert torch.equal(trainer.sample(4, seed=1), resumed.sample(4, seed=1))


@pytest.mark.slow
def test_ray_run_killed_mid_fade_in_resumes_at_the_same_alpha(ray_local, toy_dataset, tmp_path):
    from gm.train.checkpoint import load_checkpoint
    from gm.train.ray_train import CHECKPOINT_FILE, RunSettings, fit

    model = {"latent": 8, "fmap_base": 64, "fmap_max": 8,
             "growth": {"fade_images": 32, "stable_images": 16}}  # fmt: skip
    # 4x4: images 0-15, 8x8 fade: 16-47, 8x8: 48-63, 16x16 fade: 64-95 ...; 4 images a step
    run = RunSettings(steps=20, batch_size=4, checkpoint_every=3, max_failures=2, data="stream")
    info = {"resolution": 16, "channels": 3, "num_classes": 3}
    result = fit(
        "progan", model, run, toy_dataset, info, tmp_path / "runs", "grow",
        fault_injection={"step": 8, "marker": str(tmp_path / "killed")},
    )  # fmt: skip
    assert (tmp_path / "killed").exists()
    with result.checkpoint.as_directory() as d:
        payload = load_checkpoint(f"{d}/{CHECKPOINT_FILE}")
    assert payload["extra"]["resumed_from"] == 6  # mid 8x8 fade-in (step 6: alpha 0.125)
    # step k trains at images 4(k-1): 8x8 fade-in at steps 5-12, stable 13-16, 16x16 from 17
    history = {row["step"]: row for row in payload["extra"]["history"]}
    assert history[9]["resolution"] == 8 and history[12]["resolution"] == 8
    assert history[9]["alpha"] == pytest.approx((0.25 + 0.375 + 0.5) / 3)  # steps 7-9
    assert history[20]["resolution"] == 16 and history[20]["phase"] == 3
    assert int(payload["trainer"]["model"]["level"]) == 2 and payload["trainer"]["step"] == 20
    # and it lands on exactly the weights of the same run without a fault, read in memory
    run = RunSettings(steps=20, batch_size=4, checkpoint_every=3, max_failures=2, data="memory")
    clean = fit("progan", model, run, toy_dataset, info, tmp_path / "runs", "clean")
    with clean.checkpoint.as_directory() as d:
        reference = load_checkpoint(f"{d}/{CHECKPOINT_FILE}")
    for k, v in reference["trainer"]["model"].items():
        assert torch.equal(v, payload["trainer"]["model"][k]), k


@pytest.mark.slow
def test_ddp_growth_streaming_switches_levels(ray_local, toy_dataset, tmp_path):
    """Two DDP workers (unused blocks allowed, gradient penalty through DDP) streaming each
    phase's level (run.data: stream); StyleGAN's lazy R1 phase included."""
    from gm.train.checkpoint import load_checkpoint
    from gm.train.ray_train import CHECKPOINT_FILE, RunSettings, fit

    info = {"resolution": 16, "channels": 3, "num_classes": 3}
    run = RunSettings(steps=6, batch_size=2, checkpoint_every=2, num_workers=2, data="stream",
                      max_failures=0)  # fmt: skip
    for family, model in {
        "progan": {"latent": 8, "fmap_base": 64, "fmap_max": 8,
                   "growth": {"start_resolution": 8, "fade_images": 8, "stable_images": 8}},
        "stylegan": {"z_dim": 8, "w_dim": 8, "mapping_layers": 2, "fmap_base": 64,
                     "fmap_max": 8, "r1_every": 2,  # starts at 8x8 unless told otherwise
                     "growth": {"fade_images": 8, "stable_images": 8}},
    }.items():  # fmt: skip
        result = fit(family, model, run, toy_dataset, info, tmp_path / "r", family)
        with result.checkpoint.as_directory() as d:
            payload = load_checkpoint(f"{d}/{CHECKPOINT_FILE}")
        history = {row["step"]: row for row in payload["extra"]["history"]}
        # 4 images a step over both workers: 8x8 until image 8 (steps 1-2), then 16x16
        assert history[2]["resolution"] == 8 and history[4]["resolution"] == 16, family
        assert history[4]["alpha"] == 0.25 and history[6]["alpha"] == 1.0, family
        assert payload["extra"]["images_seen_total"] == 24
