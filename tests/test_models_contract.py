"""The contract every registered model family keeps (one tiny config each)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gm.config import from_dict
from gm.errors import DataError
from gm.registry import families
from gm.train.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from gm.train.loop import Trainer, set_rng_state
from gm.train.protocol import Batch, DataInfo

TINY = {
    "dcgan": {"z_dim": 8, "ngf": 8, "ndf": 8},
    "cgan": {"z_dim": 8, "ngf": 8, "ndf": 8, "embed_dim": 4},
    "cvae": {"z_dim": 4, "width": 8, "embed_dim": 4},
    # growing models pass 4 -> 8 -> 16 within the tests' few steps of 6 images
    "progan": {"latent": 8, "fmap_base": 64, "fmap_max": 8,
               "growth": {"fade_images": 12, "stable_images": 12}},
    "stylegan": {"z_dim": 8, "w_dim": 8, "mapping_layers": 2, "fmap_base": 64, "fmap_max": 8,
                 "r1_every": 5, "growth": {"start_resolution": 4, "fade_images": 12,
                                           "stable_images": 12}},
    "lapgan": {"levels": 3, "z_dim": 8, "coarse_hidden": 16, "width": 8},
    "aae": {"z_dim": 4, "width": 8, "d_hidden": 16, "conditional": True, "embed_dim": 4},
    "hvae": {"width": 8, "z_channels": 2, "scales": 2, "groups_per_scale": 2, "mixtures": 2,
             "kl_warmup_steps": 4},
    "codec": {"hyperprior": False, "n": 8, "m": 8},
    "ebm": {"width": 4, "blocks": 2, "sgld_steps": 3, "buffer_size": 20, "sample_steps": 3},
    "flow": {"levels": 2, "steps": 2, "hidden": 8},
    "ddpm": {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [8], "dropout": 0.0, "timesteps": 20, "sample_steps": 5,
             "conditional": True, "guidance": 1.0},
    "sde": {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
            "dropout": 0.0, "sample_steps": 5, "conditional": True, "ode_tolerance": 1e-3,
            "heun_steps": 3},
    # paired families (16x16 targets; SR from 4x4 inputs)
    "srgan": {"scale": 4, "width": 8, "blocks": 2, "ndf": 4, "d_dense": 8,
              "content_loss": "pixel", "pretrain_steps": 0},
    "pix2pix": {"ngf": 4, "ndf": 4, "d_layers": 2},
    "cyclegan": {"ngf": 4, "ndf": 4, "blocks": 1, "pool_size": 3, "d_layers": 2},
}  # fmt: skip
INFO = DataInfo(resolution=16, channels=3, num_classes=3)


def test_every_family_has_a_tiny_config():
    assert set(families()) == set(TINY)


def make(name, ema_beta=0.0, seed=0, channels_last=False):
    torch.manual_seed(seed)
    fam = families()[name]
    cfg = from_dict(fam.config, TINY[name], name)
    model = fam.build(cfg, INFO)
    return Trainer(model, ema_beta=ema_beta, channels_last=channels_last), cfg


def batch(seed=1, n=6, trainer=None):
    """Images at the trainer's current phase resolution, with the pyramid levels it reads
    (2x2 means here; the pyramid dataset in training)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, INFO.channels, INFO.resolution, INFO.resolution, generator=g) * 2 - 1
    images = torch.round((images + 1) * 127.5) / 127.5 - 1  # on the 8-bit grid
    levels, inputs = {}, None
    if trainer is not None:
        model = trainer.model
        grow = model.growth(trainer.images_seen)
        if grow is not None:
            images = F.adaptive_avg_pool2d(images, grow.resolution)
        levels = {r: F.adaptive_avg_pool2d(images, r) for r in model.pyramid_levels()}
        src = model.pair_source()
        if src is not None:  # SR: the 2x2-mean LR; translation: another image
            inputs = F.avg_pool2d(images, src.scale) if src.scale > 1 else images.flip(0)
    return Batch(images, torch.arange(n) % INFO.num_classes, levels, inputs)


def generate(trainer, n: int, seed: int) -> torch.Tensor:
    """What a family makes: samples, or a paired family's outputs for seeded inputs."""
    src = trainer.model.pair_source()
    if src is None:
        return trainer.sample(n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    side = INFO.resolution // src.scale
    x = torch.rand(n, INFO.channels, side, side, generator=g) * 2 - 1
    trainer.model.eval()
    return trainer.model.translate(x, trainer.sampling_nets())


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_phase_trains_only_its_module(name):
    trainer, _ = make(name)
    model = trainer.model
    for phase in model.phases():
        nets = trainer._nets_for(phase.module)
        for m in trainer.modules.values():
            m.zero_grad(set_to_none=True)
        loss, _ = model.loss(phase.name, batch(trainer=trainer), nets)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        for mod_name, module in trainer.modules.items():
            grads = [p.grad for p in module.parameters()]
            if mod_name == phase.module:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), phase
            else:
                assert all(g is None for g in grads), (phase, mod_name)


@pytest.mark.parametrize("name", sorted(TINY))
def test_sample_shape_and_range(name):
    trainer, _ = make(name)
    x = generate(trainer, 5, seed=3)
    assert x.shape == (5, INFO.channels, INFO.resolution, INFO.resolution)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, generate(trainer, 5, seed=3))


@pytest.mark.parametrize("name", sorted(TINY))
def test_training_moves_the_loss(name):
    trainer, _ = make(name)
    first = trainer.train_step(batch(trainer=trainer))
    for _ in range(15):
        last = trainer.train_step(batch(trainer=trainer))
    assert set(first) == set(last) and trainer.step == 16 and trainer.images_seen == 16 * 6
    key = f"loss/{trainer.model.phases()[0].name}"
    assert last[key] != first[key]
    if name == "cvae":  # a likelihood model fitting one batch must improve
        assert last[key] < first[key]


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpoint_round_trip_continues_exactly(name, tmp_path):
    trainer, cfg = make(name, ema_beta=0.9)
    for i in range(3):
        trainer.train_step(batch(seed=i, trainer=trainer))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, name, cfg, INFO, trainer.state_dict())

    payload = load_checkpoint(path, family=name)
    model, cfg2, info2 = build_from_checkpoint(payload)
    assert cfg2 == cfg and info2 == INFO
    resumed = Trainer(model, ema_beta=0.9)
    resumed.load_state_dict(payload["trainer"])
    assert resumed.step == 3 and resumed.images_seen == 18
    for (k, a), (_, b) in zip(
        trainer.model.state_dict().items(), resumed.model.state_dict().items()
    ):
        assert torch.equal(a, b), k
    assert torch.equal(generate(trainer, 4, seed=7), generate(resumed, 4, seed=7))
    # From the restored RNG state the next step draws the same noise and lands on identical
    # weights. (Both trainers share this process's global RNG, so restore it before each.)
    set_rng_state(payload["trainer"]["rng"])
    trainer.train_step(batch(seed=9, trainer=trainer))
    set_rng_state(payload["trainer"]["rng"])
    resumed.train_step(batch(seed=9, trainer=resumed))
    for (k, a), (_, b) in zip(
        trainer.model.state_dict().items(), resumed.model.state_dict().items()
    ):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", sorted(TINY))
def test_channels_last_trains_the_same_model_in_nhwc(name, tmp_path):
    """run.channels_last (the default): 4-D weights in NHWC, and a checkpoint that a contiguous
    model restores value for value and that computes the same samples up to summation order.
    (Training draws differ: ``randn_like`` and dropout fill an NHWC tensor in its own order.)"""
    plain, cfg = make(name)
    nhwc, _ = make(name, channels_last=True)
    convs = [(k, p) for k, p in nhwc.model.named_parameters() if p.dim() == 4]
    assert convs, "no convolution weights"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for _, p in convs)
    assert not all(p.is_contiguous(memory_format=torch.channels_last)
                   for p in plain.model.parameters() if p.dim() == 4)  # fmt: skip
    for i in range(2):
        metrics = nhwc.train_step(batch(seed=i, trainer=nhwc))
        assert metrics.keys() == plain.train_step(batch(seed=i, trainer=plain)).keys()
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert all(p.is_contiguous(memory_format=torch.channels_last) for _, p in convs)
    save_checkpoint(tmp_path / "c.pt", name, cfg, INFO, nhwc.state_dict())
    model, _, _ = build_from_checkpoint(load_checkpoint(tmp_path / "c.pt", family=name))
    restored = Trainer(model)
    restored.load_state_dict(load_checkpoint(tmp_path / "c.pt", family=name)["trainer"])
    for (k, x), (_, y) in zip(nhwc.model.state_dict().items(),
                              restored.model.state_dict().items()):  # fmt: skip
        assert torch.equal(x, y), k
    assert torch.allclose(generate(nhwc, 4, seed=7), generate(restored, 4, seed=7), atol=1e-4)


@pytest.mark.parametrize("name", [n for n in sorted(TINY) if make(n)[0].model.conditional])
def test_conditional_samples_differ_by_class(name):
    trainer, _ = make(name)
    for _ in range(2):  # zero-initialised output layers (DDPM) pass gradient on from step 2
        trainer.train_step(batch())
    a = trainer.sample(3, labels=torch.zeros(3, dtype=torch.long), seed=5)
    b = trainer.sample(3, labels=torch.ones(3, dtype=torch.long), seed=5)
    assert a.shape == b.shape and not torch.equal(a, b)  # the label reaches the output


def test_bad_checkpoints_are_named(tmp_path):
    trainer, cfg = make("dcgan")
    path = tmp_path / "c.pt"
    save_checkpoint(path, "dcgan", cfg, INFO, trainer.state_dict())
    with pytest.raises(DataError, match="checkpoint of model 'dcgan', not 'cvae'"):
        load_checkpoint(path, family="cvae")
    data = path.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.pt: truncated or corrupt checkpoint"):
        load_checkpoint(tmp_path / "t.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a gm checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_paper_dcgan_generator_at_64():
    from gm.models.dcgan import DCGANConfig, DCGANGenerator

    cfg = DCGANConfig()
    g = DCGANGenerator(cfg.z_dim, 64, 3, cfg.ngf)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.in_channels for c in convs] == [100, 1024, 512, 256, 128]
    assert [c.out_channels for c in convs] == [1024, 512, 256, 128, 3]
    assert not any(isinstance(m, torch.nn.Linear) for m in g.modules())
    bns = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 4  # every layer but the output
    out = g(torch.randn(2, 100))
    assert out.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("name", sorted(TINY))
def test_generator_maps_latents_and_labels_to_images(name):
    trainer, _ = make(name)
    model = trainer.model.eval()
    src = model.pair_source()
    with torch.no_grad():
        if src is None:
            z = torch.randn(5, *model.latent_shape())
            outputs = [model.generator()(z, torch.arange(5) % INFO.num_classes)]
        else:  # paired: every exported translator maps input images to output images
            side = INFO.resolution // src.scale
            x = torch.rand(5, INFO.channels, side, side) * 4 - 2  # clamped on the way out
            outputs = [t(x) for t in model.translators().values()]
            assert len(outputs) == (2 if model.two_way else 1)
    for x in outputs:
        assert x.shape == (5, INFO.channels, INFO.resolution, INFO.resolution)
        assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("name", [n for n in sorted(TINY) if not make(n)[0].model.pair_source()])
def test_generator_exports_with_a_dynamic_batch(name):
    """What MLflow logs (gm.train.job.log_models): torch.export of the generator traced at
    one batch size runs at another and gives the eager module's images (noise drawn inside,
    as the EBM's Langevin chains do, from the same seed)."""
    from torch.export import Dim

    trainer, _ = make(name)
    model = trainer.model.eval()
    gen = model.generator().eval()
    z, y = torch.randn(3, *model.latent_shape()), torch.arange(3) % INFO.num_classes
    program = torch.export.export(gen, (z, y), dynamic_shapes=({0: Dim.AUTO}, {0: Dim.AUTO}))
    z5, y5 = torch.randn(5, *model.latent_shape()), torch.arange(5) % INFO.num_classes
    torch.manual_seed(7)
    eager = gen(z5, y5)
    torch.manual_seed(7)
    exported = program.module()(z5, y5)
    assert exported.shape == (5, INFO.channels, INFO.resolution, INFO.resolution)
    torch.testing.assert_close(exported, eager, atol=1e-5, rtol=1e-4)


def test_trainer_from_checkpoint_restores_weights_and_leaves_the_rng(tmp_path):
    from gm.train.checkpoint import trainer_from_checkpoint

    trainer, cfg = make("cgan", ema_beta=0.9)
    trainer.train_step(batch())
    save_checkpoint(tmp_path / "c.pt", "cgan", cfg, INFO, trainer.state_dict())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    restored, info = trainer_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert torch.equal(torch.get_rng_state(), before) and info == INFO
    assert restored.step == 1 and set(restored.ema) == {"G"}
    assert torch.equal(trainer.sample(3, seed=4), restored.sample(3, seed=4))  # EMA weights too


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_phase_trains_under_float16_autocast(name):
    """What `run.amp` does on CUDA, here on CPU: every loss and gradient stays finite in mixed
    float16/float32 (no dtype clash where a float32 buffer meets a float16 activation, no
    likelihood underflowing to 0), through every growth phase of a growing family."""
    trainer, _ = make(name, ema_beta=0.9)
    with torch.autocast("cpu", dtype=torch.float16):
        for i in range(8):  # growing families: 4 -> 8 (fade) -> 8 -> 16 (fade) ...
            metrics = trainer.train_step(batch(seed=i, trainer=trainer))
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if "loss" in k)
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
    if trainer.model.growth(trainer.images_seen) is not None:
        assert trainer.model.growth(trainer.images_seen).resolution == INFO.resolution


def test_fade_mixes_float16_and_float32_as_cuda_autocast_hands_them():
    """CUDA autocast upsamples in float32 while convolutions give float16 (CPU autocast does
    not, so the test above cannot see it): the fade-in of growing models takes both."""
    from gm.models.progan import fade

    low, high = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4, dtype=torch.float16)
    mixed = fade(low, high, 0.25)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, torch.full_like(mixed, 0.25))
    assert fade(high, low, 0.5).dtype == torch.float32
