"""Paired families: SRGAN/SRResNet, pix2pix, CycleGAN; their data, metrics and the apply CLI."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gm.config import from_dict
from gm.data.config import PairConfig
from gm.data.pairs import build_pairs
from gm.errors import ConfigError, DataError
from gm.registry import families
from gm.train.checkpoint import save_checkpoint
from gm.train.loop import Trainer
from gm.train.protocol import Batch, DataInfo

from .conftest import save
from .test_models_contract import TINY

INFO = DataInfo(resolution=16, channels=3, num_classes=3)


def build(name, info=INFO, **overrides):
    fam = families()[name]
    return fam.build(from_dict(fam.config, TINY[name] | overrides, name), info)


def pair_batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = model.pair_source().scale
    y = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    x = F.avg_pool2d(y, scale) if scale > 1 else torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return Batch(y, torch.zeros(n, dtype=torch.long), inputs=x)


@pytest.fixture
def paired_sets(toy_dataset, tmp_path):
    """The 16x16 toy pyramid as SR pairs (x2, x4) and translation pairs."""
    sr, tr = tmp_path / "sr", tmp_path / "tr"
    build_pairs(toy_dataset, sr, PairConfig(kind="super_resolution", dataset="t", resolution=16))
    build_pairs(toy_dataset, tr, PairConfig(kind="translation", dataset="t", resolution=16))
    return sr, tr


# ---------------------------------------------------------------- super-resolution


@pytest.mark.parametrize("scale", [2, 4])
def test_srresnet_and_srgan_shapes(scale):
    from gm.models.srgan import SRDiscriminator, SRResNet

    g = SRResNet(3, scale, width=8, blocks=2)
    assert g(torch.zeros(2, 3, 8, 8)).shape == (2, 3, 8 * scale, 8 * scale)
    assert len(g.upsample) == int(np.log2(scale))
    assert SRDiscriminator(3, 32, ndf=4, dense=8)(torch.zeros(2, 3, 32, 32)).shape == (2,)
    model = build("srgan", scale=scale)
    x = torch.rand(3, 3, 16 // scale, 16 // scale) * 2 - 1
    out = model.translate(x)
    assert out.shape == (3, 3, 16, 16) and out.abs().max() <= 1


def test_paper_srgan_structure():
    from gm.models.srgan import SRDiscriminator, SRGANConfig, SRResNet

    cfg = SRGANConfig(content_loss="pixel")
    g = SRResNet(3, cfg.scale, cfg.width, cfg.blocks)
    assert len(g.body) == 16 and g.head[0].kernel_size == (9, 9) and g.tail.kernel_size == (9, 9)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 2 * 16 + 1
    d = SRDiscriminator(3, 96, cfg.ndf, cfg.d_dense)
    convs = [m for m in d.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2] * 4
    assert d.head[1].in_features == 512 * 6 * 6 and d.head[1].out_features == 1024


def test_sub_pixel_shuffle_puts_channel_c_r2_plus_i_r_plus_j_at_y_r_plus_i_x_r_plus_j():
    from gm.models.srgan import SubPixelUpsample

    r, ch = 2, 3
    up = SubPixelUpsample(ch, r)
    x = torch.randn(2, ch, 5, 4)
    conv = up.conv(x)  # (2, ch·r², 5, 4)
    expected = torch.empty(2, ch, 5 * r, 4 * r)
    for c in range(ch):
        for i in range(r):
            for j in range(r):
                expected[:, c, i::r, j::r] = conv[:, c * r * r + i * r + j]
    assert torch.equal(up.shuffle(conv), expected)
    assert torch.allclose(up(x), up.act(expected))
    # ICNR: at initialisation every sub-pixel of a channel is the same (no checkerboard)
    y = up(x)
    assert torch.equal(y[..., 0::2, 0::2], y[..., 1::2, 1::2])


def test_bicubic_skip_starts_at_bicubic_and_probe_reports_it(paired_sets):
    from gm.metrics.paired import PairedProbe, bicubic

    sr, _ = paired_sets
    model = build("srgan", bicubic_skip=True)
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.allclose(model.translate(x), bicubic(x, 4), atol=1e-6)
    probe = PairedProbe(sr, model.pair_source())
    m = probe(Trainer(model))
    assert m["psnr"] == pytest.approx(m["psnr_bicubic"], abs=1e-6)
    assert m["psnr_pooled"] == pytest.approx(m["psnr_pooled_bicubic"], abs=1e-6)
    assert m["win_rate"] == 0.0 and 0 < m["ssim"] <= 1
    grid = probe.grid(Trainer(model), n=3)
    rows = min(3, len(probe.inputs))  # input | output | target per test pair
    assert grid.dtype == np.uint8 and grid.shape == (rows * 18 + 2, 3 * 18 + 2, 3)


def test_pooled_psnr_is_capped_for_identical_images_and_falls_with_noise():
    from gm.metrics.paired import to_8bit
    from gm.metrics.quality import PSNR_CAP, psnr_per_image, psnr_pooled

    g = torch.Generator().manual_seed(0)
    y = to_8bit(torch.rand(6, 3, 16, 16, generator=g) * 2 - 1)
    assert psnr_pooled(y, y) == PSNR_CAP and psnr_pooled(y, y, border=2, y_channel=True) == PSNR_CAP
    noisy = [psnr_pooled((y + s * torch.randn(y.shape, generator=g)).clamp(-1, 1), y)
             for s in (0.01, 0.05, 0.2)]  # fmt: skip
    assert noisy[0] > noisy[1] > noisy[2] and noisy[1] == pytest.approx(32, abs=1)
    # one flat image the baseline gets exactly right: per-image means jump, the pooled one not
    flat = torch.zeros(1, 3, 16, 16)
    near = flat + 0.01
    both = torch.cat([y, flat]), torch.cat([(y + 0.01).clamp(-1, 1), flat])
    shifted = torch.cat([(y + 0.01).clamp(-1, 1), near])
    per_a, per_b = psnr_per_image(both[1], both[0]), psnr_per_image(shifted, both[0])
    assert per_a[-1] == PSNR_CAP and per_a.mean() - per_b.mean() > 7  # 54 dB / 7 images
    assert psnr_pooled(both[1], both[0]) - psnr_pooled(shifted, both[0]) < 1  # 10·log10(7/6)


def test_srgan_pretrains_then_goes_adversarial_and_drops_the_lr():
    model = build("srgan", pretrain_steps=2, lr_drop_steps=1)
    trainer = Trainer(model)
    seen = [set(trainer.train_step(pair_batch(model, seed=i))) for i in range(4)]
    assert seen[0] == seen[1] == {"loss/G_mse"}
    assert {"loss/D", "loss/G", "G/content", "G/adversarial"} <= seen[2]
    lrs = [model.lr_factor(s, 10) for s in range(5)]
    assert lrs == [1.0, 1.0, 1.0, 0.1, 0.1]
    assert trainer.optimizers["G"].param_groups[0]["lr"] == pytest.approx(
        0.1 * trainer.base_lr["G"]
    )


def _small_vgg19_file(path):
    """torchvision's vgg19 state dict format, cut after φ2,2 (the loader needs no more)."""
    from torchvision.models import vgg19

    torch.manual_seed(0)
    full = vgg19(weights=None).features[:9].state_dict()
    torch.save({f"features.{k}": v for k, v in full.items()}, path)
    return path


def test_vgg19_content_loss_from_local_weights(tmp_path):
    from gm.models.srgan import load_vgg19_features, vgg19_cut

    assert vgg19_cut("5_4") == 36 and vgg19_cut("2_2") == 9
    path = _small_vgg19_file(tmp_path / "vgg19.pth")
    model = build("srgan", content_loss="vgg19", vgg19_weights=str(path), vgg_layer="2_2",
                  pretrain_steps=0)  # fmt: skip
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert float(model.content(x, x)) == 0.0
    assert float(model.content(x, -x)) > 0
    feats = load_vgg19_features(path, "2_2")
    state = torch.load(path, weights_only=True)
    assert torch.equal(feats[7].weight, state["features.7.weight"])
    assert not any(p.requires_grad for p in feats.parameters())
    with pytest.raises(DataError, match=r"no 'features.10.weight'.*φ3_1"):
        load_vgg19_features(path, "3_1")
    (tmp_path / "junk.pth").write_bytes(b"not torch")
    with pytest.raises(DataError, match="junk.pth: not a VGG19 state dict"):
        load_vgg19_features(tmp_path / "junk.pth", "2_2")


def test_content_loss_choice_is_explicit(tmp_path):
    from gm.models.srgan import SRGANConfig
    from gm.train.job import check_local_files

    with pytest.raises(ConfigError, match="vgg19_weights: content_loss 'vgg19' needs"):
        from_dict(SRGANConfig, {}, "model")
    cfg = from_dict(SRGANConfig, {"vgg19_weights": str(tmp_path / "missing.pth")}, "model")
    with pytest.raises(ConfigError, match=r"train.sr.model.vgg19_weights: .*missing.pth: no such"):
        check_local_files(cfg, "train.sr.model")
    path = _small_vgg19_file(tmp_path / "v.pth")
    cfg = from_dict(SRGANConfig, {"vgg19_weights": str(path)}, "model")
    assert set(check_local_files(cfg, "m")) == {"vgg19_weights"}
    assert check_local_files(SRGANConfig(content_loss="pixel"), "m") == {}


# ---------------------------------------------------------------- translation


def test_paper_pix2pix_unet_and_patchgan():
    from gm.models.paired import PatchGAN, receptive_field
    from gm.models.pix2pix import UNet

    g = UNet(3, 3, depth=8, ngf=64)
    widths = [next(m for m in layer if isinstance(m, nn.Conv2d)).out_channels for layer in g.down]
    assert widths == [64, 128, 256, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.Dropout) for m in g.modules()) == 3
    assert g(torch.zeros(1, 3, 256, 256)).shape == (1, 3, 256, 256)
    d = PatchGAN(6, 64, 3)
    assert receptive_field(3) == 70
    assert d(torch.zeros(1, 6, 256, 256)).shape == (1, 1, 30, 30)


def test_cycle_loss_is_zero_when_both_generators_are_identity():
    model = build("cyclegan")
    model.G.ab, model.G.ba = nn.Identity(), nn.Identity()
    _, extra = model.loss("G", pair_batch(model), {"G": model.G, "D": model.D})
    assert extra["cycle"] == 0.0 and extra["identity"] == 0.0
    trained = build("cyclegan")
    _, extra = trained.loss("G", pair_batch(trained), {"G": trained.G, "D": trained.D})
    assert extra["cycle"] > 0


def test_history_buffer_returns_past_images_with_probability_half():
    from gm.models.paired import ImagePool

    torch.manual_seed(0)
    pool = ImagePool(50, (1, 1, 1))
    first = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling: every new image comes back as is
    returned_past = 0
    n = 4000
    seen = set(first.flatten().tolist())
    for k in range(n // 10):
        new = -(1.0 + torch.arange(10, dtype=torch.float32) + 10 * k).view(10, 1, 1, 1)
        out = pool.query(new)
        for got, fresh in zip(out.flatten().tolist(), new.flatten().tolist(), strict=True):
            if got != fresh:  # a swapped-in image: one generated before this one
                assert got in seen
                returned_past += 1
            seen.add(fresh)
    share = returned_past / n
    assert abs(share - 0.5) < 4 * (0.25 / n) ** 0.5  # binomial: within 4 standard deviations
    # a checkpoint keeps the history
    clone = ImagePool(50, (1, 1, 1))
    clone.load_state_dict(pool.state_dict())
    assert torch.equal(clone.images, pool.images) and int(clone.count) == 50


def test_cyclegan_lr_is_constant_then_decays_linearly_to_zero():
    model = build("cyclegan", decay_start=0.5)
    f = [model.lr_factor(s, 100) for s in range(100)]
    assert f[:51] == [1.0] * 51 and all(a > b for a, b in zip(f[50:], f[51:], strict=False))
    assert 0 < f[-1] < 0.05
    trainer = Trainer(model, total_steps=4)
    for i in range(4):
        trainer.train_step(pair_batch(model, seed=i))
    assert trainer.optimizers["G"].param_groups[0]["lr"] == pytest.approx(
        trainer.base_lr["G"] * model.lr_factor(3, 4)
    )


def test_translation_probe_against_identity_and_cycle(paired_sets):
    from gm.metrics.paired import PairedProbe

    _, tr = paired_sets
    model = build("cyclegan")
    probe = PairedProbe(tr, model.pair_source())
    m = probe(Trainer(model))
    assert set(m) == {"l1", "psnr", "ssim", "l1_identity", "psnr_identity", "ssim_identity",
                      "cycle_l1"}  # fmt: skip
    assert m["cycle_l1"] > 0 and m["l1"] != m["l1_identity"]
    model.G.ab, model.G.ba = nn.Identity(), nn.Identity()
    m = probe(SimpleNamespace(model=model, sampling_nets=dict))  # what a probe reads of a trainer
    assert m["l1"] == pytest.approx(m["l1_identity"], abs=1e-6) and m["cycle_l1"] == 0.0
    assert "cycle_l1" not in PairedProbe(tr, model.pair_source())(Trainer(build("pix2pix")))


# ---------------------------------------------------------------- data and engine


def test_paired_batches_are_aligned_and_unpaired_ones_come_from_each_domain(paired_sets):
    from gm.data.readers import DomainImages, PairedDataset, to_unit_range
    from gm.train.protocol import PairSource
    from gm.train.ray_train import RunSettings, _paired_batches

    sr, tr = paired_sets
    run = RunSettings(batch_size=5)
    trainer = Trainer(build("srgan"))
    b = next(_paired_batches(sr, PairSource("x4.parquet", "lr", "hr", 4), run, 0, 1, trainer))
    data = PairedDataset(sr / "x4.parquet", ("lr", "hr"), "train")
    lr, hr, _ = data.batch(slice(None))
    for x, y in zip(b.inputs, b.images, strict=True):  # each LR row is its HR row's pair
        i = int(torch.nonzero((hr == y).flatten(1).all(1))[0])
        assert torch.equal(lr[i], x)
    src = PairSource("aligned.parquet", "a", "b", unpaired_file="unpaired.parquet")
    b = next(_paired_batches(tr, src, run, 0, 1, Trainer(build("cyclegan"))))
    side_a = to_unit_range(DomainImages(tr / "unpaired.parquet", "A").pixels)
    side_b = to_unit_range(DomainImages(tr / "unpaired.parquet", "B").pixels)
    assert all((side_a == x).flatten(1).all(1).any() for x in b.inputs)
    assert all((side_b == y).flatten(1).all(1).any() for y in b.images)
    with pytest.raises(DataError, match="no image of domain 'C'"):
        DomainImages(tr / "unpaired.parquet", "C")


def test_paired_dataset_digest_follows_its_files(paired_sets, tmp_path):
    import json

    from gm.tracking import dataset_digest

    sr, tr = paired_sets
    d_sr, kind = dataset_digest(tmp_path, sr)
    assert kind == "content" and len(d_sr) == 64 and d_sr != dataset_digest(tmp_path, tr)[0]
    m = json.loads((sr / "manifest.json").read_text())
    m["files"]["x4.parquet"]["sha256"] = "0" * 64  # another x4 file: another digest
    (sr / "manifest.json").write_text(json.dumps(m))
    assert dataset_digest(tmp_path, sr)[0] != d_sr


def test_train_paired_params_are_checked():
    from gm.params import parse

    base = {
        "datasets": {"photos": {"top_resolution": 32}},
        "pairs": {
            "sr": {
                "kind": "super_resolution",
                "dataset": "photos",
                "resolution": 32,
                "scales": [2],
            },  # fmt: skip
            "tr": {"kind": "translation", "dataset": "photos", "resolution": 32},
        },
    }
    ok = {"family": "srgan", "pairs": "sr", "model": {"scale": 2, "content_loss": "pixel"}}
    assert parse(base | {"train_paired": {"s": ok}}).train_paired["s"].pairs == "sr"
    bad = {
        "model.scale: 4 is not one of pairs.sr.scales": ok | {"model": {"content_loss": "pixel"}},
        "pairs: tr holds translation pairs; srgan needs super_resolution": ok | {"pairs": "tr"},
        "pairs: 'nope' is not a key of pairs": ok | {"pairs": "nope"},
        "family: dcgan does not train from pairs": {"family": "dcgan", "pairs": "tr"},
    }
    for message, job in bad.items():
        with pytest.raises(ConfigError, match=f"train_paired.s.{message}"):
            parse(base | {"train_paired": {"s": job}})
    with pytest.raises(ConfigError, match="train.p.family: pix2pix trains from translation"):
        parse(base | {"train": {"p": {"family": "pix2pix", "dataset": "photos"}}})


# ---------------------------------------------------------------- gm upscale / gm translate


def test_tiles_stitch_to_the_whole_image_result():
    from gm.apply import Translator, apply_tiled, receptive_radius
    from gm.metrics.paired import bicubic

    radius = receptive_radius(lambda x: bicubic(x, 4), 3, 4)
    assert radius == 2  # bicubic: 4 taps, two on each side
    t = Translator(lambda x: bicubic(x, 4), scale=4, tile=2, channels=3, kind="x", name="bicubic",
                   radius=radius)  # fmt: skip
    image = torch.rand(3, 13, 21) * 2 - 1  # not a multiple of the tile
    out = apply_tiled(t, image)
    assert out.shape == (3, 52, 84)
    assert torch.allclose(out, bicubic(image[None], 4)[0], atol=1e-5)


def test_receptive_radius_is_the_architectures_whatever_the_weights():
    # A gradient through the actual weights missed what a zero-initialized trunk (the default
    # SRGAN with its bicubic skip) or a closed ReLU hides: 2 pixels instead of 24.
    from torch import nn

    from gm.apply import receptive_radius, tiling

    stack = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 3, 5, padding=2))  # fmt: skip
    for p in stack.parameters():
        torch.nn.init.zeros_(p)
    assert receptive_radius(stack, 3, 1) == 1 + 1 + 2
    assert receptive_radius(nn.Sequential(nn.Conv2d(3, 3, 3), nn.InstanceNorm2d(3)), 3, 1) is None
    fam = families()["srgan"]
    cfg = from_dict(fam.config, TINY["srgan"] | {"bicubic_skip": True}, "srgan")
    fresh = Trainer(fam.build(cfg, INFO))
    with torch.no_grad():
        for p in fresh.model.G.body.parameters():
            p.zero_()
    trained = trained_looking(Trainer(fam.build(cfg, INFO)))
    radii = [tiling(t.model.translators()["generator"], 3, 4, 4)[1] for t in (fresh, trained)]
    assert radii[0] == radii[1] and radii[0] > 8, radii


def trained_looking(trainer, seed=0):
    """Perturb every weight and batch-norm statistic of a freshly built model, so no layer is
    at its initial (often symmetric or zero) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return trainer


@pytest.mark.parametrize("family", ["srgan", "pix2pix", "cyclegan"])
def test_tiled_output_equals_one_whole_image_pass_for_every_paired_family(tmp_path, family):
    # A fixed 4-pixel margin left SRGAN's tiles up to 1.8 grey levels off a whole-image pass.
    from gm.apply import _windows, apply_tiled, load_translator

    fam = families()[family]
    cfg = from_dict(fam.config, TINY[family], family)
    trainer = trained_looking(Trainer(fam.build(cfg, INFO)))
    ckpt = tmp_path / f"{family}.pt"
    save_checkpoint(ckpt, family, cfg, INFO, trainer.state_dict())
    kind = fam.pairs
    for reverse in (False, True) if family == "cyclegan" else (False,):
        t = load_translator(str(ckpt), kind, reverse)
        assert t.tile == INFO.resolution // t.scale and not t.fixed
        net = list(trainer.model.eval().translators(trainer.sampling_nets()).values())[reverse]
        h, w = 150, 101  # several windows, and not a multiple of the alignment
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
        a = t.align
        padded = torch.nn.functional.pad(image[None], (0, -w % a, 0, -h % a), mode="replicate")
        with torch.no_grad():
            whole = net(padded)[0, :, : h * t.scale, : w * t.scale]
        tiled = apply_tiled(t, image)
        assert tiled.shape == whole.shape
        # Float rounding only: a tile's convolutions may take other CPU kernels than the whole
        # image's (2.7e-4 seen on one CPU, 0 on another); a wrong margin is 1e-2 and more.
        assert (tiled - whole).abs().max().item() < 1e-3
        assert whole.std().item() > 0.05  # a non-trivial output
        if t.radius is None:  # instance norm: every output pixel sees the whole image
            assert family == "cyclegan"
        else:
            margin = -(-t.radius // a) * a
            window = max(t.tile, 4 * margin, 2 * margin + a)
            assert len(_windows(-(-h // a) * a, -(-window // a) * a, margin)) > 1  # tiled
            # the margin matters: a quarter-tile margin (the old rule) is not exact
            from dataclasses import replace

            rough = apply_tiled(replace(t, radius=t.tile // 4, align=max(a, 1)), image)
            assert (rough - whole).abs().max().item() > 1e-3


def test_upscale_folder_with_a_corrupt_file_processes_the_rest(tmp_path, capsys):
    from gm.cli import main

    model = build("srgan")
    trainer = Trainer(model)
    fam = families()["srgan"]
    cfg = from_dict(fam.config, TINY["srgan"], "srgan")
    ckpt = tmp_path / "sr.pt"
    save_checkpoint(ckpt, "srgan", cfg, INFO, trainer.state_dict())
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    save(folder / "a.png", rng.integers(0, 256, (13, 21, 3), dtype=np.uint8))
    save(folder / "sub" / "b.jpg", rng.integers(0, 256, (7, 5, 3), dtype=np.uint8))
    save(folder / "grey.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["upscale", str(folder), "-o", str(out), "--model", str(ckpt), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 of 4 image(s) failed" in err and "broken.png" in err and "notes.txt" in err
    from PIL import Image

    assert Image.open(out / "a.png").size == (84, 52)
    assert Image.open(out / "sub" / "b.png").size == (20, 28)
    assert Image.open(out / "grey.png").mode == "RGB"
    assert not (out / "broken.png").exists()
    assert not list(out.rglob("*.tmp*"))
    # a generative (non-paired) checkpoint is refused with the reason
    dc = families()["dcgan"]
    dcfg = from_dict(dc.config, TINY["dcgan"], "dcgan")
    save_checkpoint(
        tmp_path / "dc.pt", "dcgan", dcfg, INFO, Trainer(dc.build(dcfg, INFO)).state_dict()
    )
    code = main(["upscale", str(folder / "a.png"), "-o", str(tmp_path / "x.png"), "--model",
                 str(tmp_path / "dc.pt")])  # fmt: skip
    assert (
        code == 2
        and "a dcgan checkpoint; this command needs one of: srgan" in capsys.readouterr().err
    )
    code = main(["translate", str(folder / "a.png"), "-o", str(tmp_path / "x.png"), "--model",
                 str(ckpt), "--reverse"])  # fmt: skip
    assert code == 2 and "pix2pix" in capsys.readouterr().err


def test_a_paired_checkpoint_is_not_evaluated_by_sampling(tmp_path):
    from gm.metrics.evaluate import EvalConfig, evaluate_checkpoint

    fam = families()["pix2pix"]
    cfg = from_dict(fam.config, TINY["pix2pix"], "pix2pix")
    save_checkpoint(tmp_path / "p.pt", "pix2pix", cfg, INFO, Trainer(build("pix2pix")).state_dict())
    with pytest.raises(DataError, match="p.pt: a pix2pix model translates images"):
        evaluate_checkpoint(tmp_path / "p.pt", tmp_path / "none.pt", tmp_path, EvalConfig())


# ---------------------------------------------------------------- end to end (Ray, MLflow)


@pytest.mark.slow
def test_paired_jobs_train_evaluate_and_log_their_generators(
    ray_local, project, monkeypatch, tmp_path, capsys
):
    """SRGAN and CycleGAN through run_job: test-pair metrics beside their baselines in
    metrics.json, history.csv and MLflow, comparison grids, the generators as MLflow models
    (both of CycleGAN's) that `gm upscale` / `gm translate` apply by URI."""
    import mlflow
    from mlflow import MlflowClient
    from PIL import Image

    from gm.cli import main
    from gm.train.job import TrainConfig, run_job
    from gm.train.ray_train import RunSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pyramid = project / "datasets/pyramid/toy"
    sr, tr = project / "datasets/pairs/sr", project / "datasets/pairs/tr"
    build_pairs(pyramid, sr, PairConfig(kind="super_resolution", dataset="toy", resolution=16))
    build_pairs(pyramid, tr, PairConfig(kind="translation", dataset="toy", resolution=16))
    run = RunSettings(steps=4, batch_size=4, checkpoint_every=2)
    srgan = TINY["srgan"] | {"pretrain_steps": 2}
    m = run_job("sr", TrainConfig("srgan", pairs="sr", model=srgan, run=run), sr,
                project / "models/sr", project, progress=False)  # fmt: skip
    for key in ("psnr", "psnr_bicubic", "ssim", "ssim_bicubic", "psnr_pooled", "win_rate"):
        assert isinstance(m[key], float), key
    header = (project / "models/sr/history.csv").read_text().splitlines()[0].split(",")
    assert {"psnr", "psnr_bicubic", "loss/G_mse", "loss/D"} <= set(header)
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri)
    r = client.get_run(m["mlflow_run_id"])
    assert r.data.params["model.content_loss"] == "pixel" and r.data.params["dataset"] == "sr"
    assert [x.step for x in client.get_metric_history(r.info.run_id, "psnr_bicubic")] == [2, 4]
    images = [f.path for f in client.list_artifacts(r.info.run_id, "images")]
    assert len([f for f in images if f.endswith(".png")]) == 2  # a comparison grid per checkpoint
    grid = np.asarray(Image.open(project / "models/sr/samples.png"))
    assert grid.shape[1] == 3 * 18 + 2  # input | output | target

    m2 = run_job("cg", TrainConfig("cyclegan", pairs="tr", model=TINY["cyclegan"], run=run), tr,
                 project / "models/cg", project, progress=False)  # fmt: skip
    assert {"l1", "l1_identity", "psnr", "psnr_identity", "cycle_l1"} <= set(m2)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    for direction in ("generator_ab", "generator_ba"):  # both CycleGAN generators are models
        info = mlflow.models.get_model_info(f"runs:/{m2['mlflow_run_id']}/{direction}")
        assert info.metadata["family"] == "cyclegan" and info.metadata["input_resolution"] == 16
        # instance norm: each output pixel sees the whole image; two stride-2 convolutions
        assert info.metadata["receptive_radius"] == -1 and info.metadata["alignment"] == 4
    image = tmp_path / "in.png"
    save(image, np.random.default_rng(1).integers(0, 256, (10, 7, 3), dtype=np.uint8))
    out = tmp_path / "up.png"
    args = ["upscale", str(image), "-o", str(out), "--quiet"]
    assert main([*args, "--model", f"runs:/{r.info.run_id}/generator"]) == 0
    assert Image.open(out).size == (28, 40)
    # the same model from the checkpoint gives the same pixels (the exported graph is G)
    assert main([*args[:3], str(tmp_path / "ck.png"), "--quiet", "--model",
                 str(project / "models/sr/checkpoint.pt")]) == 0  # fmt: skip
    a = np.asarray(Image.open(out), dtype=int)
    b = np.asarray(Image.open(tmp_path / "ck.png"), dtype=int)
    assert np.abs(a - b).max() <= 1
    for direction in ("generator_ab", "generator_ba"):
        dest = tmp_path / f"{direction}.png"
        uri_model = f"runs:/{m2['mlflow_run_id']}/{direction}"
        assert main(["translate", str(image), "-o", str(dest), "--model", uri_model]) == 0
        assert Image.open(dest).size == (7, 10)
    capsys.readouterr()
    assert main(["upscale", str(image), "-o", str(out), "--model",
                 f"runs:/{m2['mlflow_run_id']}/generator_ab"]) == 2  # fmt: skip
    assert "not a super_resolution model" in capsys.readouterr().err
