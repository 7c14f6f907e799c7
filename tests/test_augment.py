"""Augmentation of what D sees (gm.augment): ADA's pipeline and its p controller, DiffAugment,
dataset x-flip; wired into DCGAN/cGAN (model.augment), p kept in checkpoints."""

from __future__ import annotations

import pytest
import torch

from gm.augment import Augment, ada_augment, diff_augment, mirror, rot90
from gm.config import from_dict
from gm.errors import ConfigError
from gm.registry import families
from gm.train.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from gm.train.loop import Trainer, set_rng_state
from gm.train.protocol import Batch

from .test_models_contract import INFO, TINY, batch


def images(n=16, c=3, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g) * 2 - 1


@pytest.mark.parametrize("c", [1, 3])
def test_ada_pipeline_is_the_identity_at_p_0_and_differentiable_at_p_1(c):
    x = images(c=c).requires_grad_(True)
    assert torch.equal(ada_augment(x, 0.0), x)
    torch.manual_seed(0)
    y = ada_augment(x, 1.0)
    assert y.shape == x.shape and (y - x).abs().mean() > 0.1
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # G gets gradients through it


def test_ada_geometry_resamples_within_the_image_values_and_cutout_blanks_a_square():
    """x-flip, rot90, integer translation and scaling resample bilinearly with reflection
    padding (convex combinations of input pixels): no value leaves the input's range."""
    from gm.augment import _cutout, ada_geometric

    x = images(n=64, c=1, side=8, seed=3)
    torch.manual_seed(1)
    y = ada_geometric(x, 1.0)
    assert not torch.equal(y, x) and torch.equal(ada_geometric(x, 0.0), x)
    assert (y.amin((1, 2, 3)) >= x.amin((1, 2, 3)) - 1e-6).all()
    assert (y.amax((1, 2, 3)) <= x.amax((1, 2, 3)) + 1e-6).all()
    none = torch.zeros(64, dtype=torch.bool)
    assert torch.equal(_cutout(x, none), x)
    assert (_cutout(x, ~none) == 0).flatten(1).sum(1).min() >= 4  # at least a corner quarter


def test_diffaugment_changes_every_image_and_passes_gradients():
    x = images().requires_grad_(True)
    torch.manual_seed(0)
    y = diff_augment(x)
    assert y.shape == x.shape
    assert all((y[i] - x[i]).abs().max() > 0 for i in range(x.shape[0]))
    assert ((y == 0).flatten(1).float().mean(1) >= 1 / 16).all()  # cutout, clipped at a corner
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def test_ada_controller_steers_p_by_the_sign_heuristic():
    aug = Augment("ada", target=0.6, kimg=0.01, interval=2)  # 10 images for p 0 -> 1
    for _ in range(2):
        aug.observe(torch.ones(4))  # r_t = 1 > 0.6: D overfits, raise p
    assert float(aug.p) == pytest.approx(8 / 10) and float(aug.r_t) == 1.0
    aug.observe(torch.ones(4))
    assert float(aug.p) == pytest.approx(0.8)  # adjusted every `interval` observations only
    aug.observe(torch.ones(4))
    assert float(aug.p) == 1.0  # clamped
    for _ in range(2):
        aug.observe(-torch.ones(4))
    assert float(aug.p) == pytest.approx(0.2) and aug.stats() == {"p": aug.p.item(), "r_t": -1}


def test_augment_keys_are_checked_and_refused_where_there_is_no_discriminator():
    fam = families()
    with pytest.raises(ConfigError, match="dcgan.model.ada_target.*not in"):
        from_dict(fam["dcgan"].config, {"augment": "ada", "ada_target": 1.5}, "dcgan.model")
    with pytest.raises(ConfigError, match="cgan.model.augment.*'flip'"):
        from_dict(fam["cgan"].config, {"augment": "flip"}, "cgan.model")
    with pytest.raises(ConfigError, match="cvae.model.*augment"):
        from_dict(fam["cvae"].config, {"augment": "ada"}, "cvae.model")


def make_ada(name="cgan", kind="ada", target=0.6):
    fam = families()[name]
    cfg = from_dict(fam.config, TINY[name] | {"augment": kind, "ada_kimg": 0.05,
                                              "ada_interval": 1, "ada_target": target},
                    name)  # fmt: skip
    torch.manual_seed(0)
    return Trainer(fam.build(cfg, INFO), ema_beta=0.9), cfg


ADVERSARIAL = ["dcgan", "cgan", "progan", "stylegan", "lapgan", "srgan", "pix2pix", "cyclegan"]


def ada_p(metrics: dict) -> tuple[float, bool]:
    """The last ADA p a step logged (LAPGAN logs it under each level's D phase: D4/ada_p ...)
    and whether r_t was logged beside it."""
    keys = [k for k in metrics if k.endswith("/ada_p")]  # in phase order: the last is newest
    assert keys, sorted(metrics)
    return metrics[keys[-1]], keys[-1].replace("ada_p", "ada_r_t") in metrics


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_ada_training_logs_p_and_a_checkpoint_resumes_with_the_same_p(name, tmp_path):
    # the tiny growing models change resolution every few steps: a lower target for them
    trainer, cfg = make_ada(name, target=0.6 if name in ("dcgan", "cgan") else 0.2)
    for _ in range(80):  # one batch over and over: D overfits it, r_t > target, p rises
        m = trainer.train_step(batch(seed=0, trainer=trainer))
        if ada_p(m)[0] > 0:
            break
    p = trainer.model.augment.p.clone()
    logged, with_r_t = ada_p(m)
    assert logged == float(p) and 0 < float(p) <= 1 and with_r_t
    save_checkpoint(tmp_path / "c.pt", name, cfg, INFO, trainer.state_dict())
    payload = load_checkpoint(tmp_path / "c.pt", family=name)
    model, _, _ = build_from_checkpoint(payload)
    resumed = Trainer(model, ema_beta=0.9)
    resumed.load_state_dict(payload["trainer"])
    assert torch.equal(resumed.model.augment.p, p)
    a = resumed.train_step(batch(seed=9, trainer=resumed))
    set_rng_state(payload["trainer"]["rng"])
    b = trainer.train_step(batch(seed=9, trainer=trainer))
    assert a == b  # the same p, the same augmentations, the same step


def test_mirror_flips_half_the_batch_the_same_way_at_the_same_step():
    x = images(n=64)
    b = Batch(x, torch.zeros(64, dtype=torch.long), {8: x[:, :, ::2, ::2]}, x.clone())
    one, two = mirror(b, seed=0, step=5), mirror(b, seed=0, step=5)
    assert torch.equal(one.images, two.images)  # deterministic: resume sees the same batch
    flipped = [not torch.equal(one.images[i], x[i]) for i in range(64)]
    assert 16 < sum(flipped) < 48
    for i in range(64):
        want = x[i].flip(-1) if flipped[i] else x[i]
        assert torch.equal(one.images[i], want) and torch.equal(one.inputs[i], want)
        assert torch.equal(one.levels[8][i], b.levels[8][i].flip(-1) if flipped[i]
                           else b.levels[8][i])  # fmt: skip
    assert not torch.equal(mirror(b, seed=0, step=6).images, one.images)


def test_rot90_turns_each_image_its_own_way_the_same_at_the_same_step():
    x = images(n=64)
    b = Batch(x, torch.arange(64), {8: x[:, :, ::2, ::2]}, x[:, :, ::4, ::4])  # an SR pair
    one = rot90(b, seed=0, step=5)
    assert torch.equal(rot90(b, seed=0, step=5).images, one.images)  # resume: the same batch
    assert torch.equal(one.labels, b.labels)
    turns = []
    for i in range(64):
        (k,) = [k for k in range(4) if torch.equal(one.images[i], x[i].rot90(k, (-2, -1)))]
        turns.append(k)
        assert torch.equal(one.inputs[i], b.inputs[i].rot90(k, (-2, -1)))  # its input alike
        assert torch.equal(one.levels[8][i], b.levels[8][i].rot90(k, (-2, -1)))
    assert all(6 < turns.count(k) < 26 for k in range(4)), turns  # each turn, uniformly
    assert not torch.equal(rot90(b, seed=0, step=6).images, one.images)
    # independent of mirror's flips at the same (seed, step): all 8 symmetries occur
    both = rot90(mirror(b, seed=0, step=5), seed=0, step=5).images
    seen = set()
    for i in range(64):
        for flip in (False, True):
            for k in range(4):
                if torch.equal(both[i], (x[i].flip(-1) if flip else x[i]).rot90(k, (-2, -1))):
                    seen.add((flip, k))
    assert len(seen) == 8, seen
    with pytest.raises(ValueError, match="run.rot90: 16x8 images are not square"):
        rot90(Batch(torch.zeros(2, 3, 16, 8), torch.zeros(2)), seed=0, step=0)


@pytest.mark.parametrize("name", ["dcgan", "progan", "stylegan", "lapgan", "srgan", "pix2pix",
                                  "cyclegan"])  # fmt: skip
def test_diffaugment_trains_every_phase(name):
    trainer, _ = make_ada(name, "diffaug")
    first = trainer.train_step(batch(seed=0, trainer=trainer))
    for i in range(7):
        last = trainer.train_step(batch(seed=i, trainer=trainer))
    for m in (first, last):  # loss/D…, loss/G… (LAPGAN: one per level; StyleGAN: + Dreg)
        assert {k[5] for k in m if k.startswith("loss/")} == {"D", "G"}
    assert not any(k.endswith("ada_p") for k in last)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("kind", ["ada", "diffaug"])
def test_aligned_images_get_the_same_transform_image_by_image(kind):
    """pix2pix's (input, output) and LAPGAN's (image, low-pass band) are shown to D
    transformed alike: equal inputs stay equal, each image differently from the others."""
    from gm.augment import same_draws

    aug = Augment(kind)
    aug.p.fill_(1.0)
    x = images(n=8, c=3, side=16, seed=4)
    torch.manual_seed(0)
    a, b = same_draws(aug, x, x.clone())
    assert torch.equal(a, b) and not torch.equal(a, x)
    c, d = same_draws(aug, x, x.clone())
    assert torch.equal(c, d) and not torch.equal(c, a)  # the next call draws anew
    same = x[:1].expand(8, -1, -1, -1).contiguous()  # one image 8 times: 8 transforms
    e, f = same_draws(aug, same, same.clone())
    assert torch.equal(e, f) and not all(torch.equal(e[0], e[i]) for i in range(1, 8))


def test_without_augment_the_paired_discriminators_see_the_tensors_themselves():
    """augment: none (the default) keeps the pipeline's numbers: nothing is resampled."""
    for name in ("lapgan", "pix2pix", "cyclegan"):
        trainer, _ = make_ada(name, "none")
        assert trainer.model.augment is None
        x = images(n=4, c=3, side=16)
        one, two = trainer.model.augmented_pair(x, -x)
        assert one is x and torch.equal(two, -x)
