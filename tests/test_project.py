"""`gm project`: StyleGAN2's projector into W (gm.project) on small generators made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gm.cli import main
from gm.config import from_dict
from gm.models.stylegan import StyleGANConfig, StyleGenerator, num_layers
from gm.project import ProjectConfig, _noise_regularizer, project
from gm.train.checkpoint import save_checkpoint

from .test_models_contract import INFO, make

CFG = from_dict(StyleGANConfig, {"z_dim": 8, "w_dim": 8, "mapping_layers": 2, "fmap_base": 64,
                                 "fmap_max": 16}, "stylegan")  # fmt: skip


def generator(seed: int) -> StyleGenerator:
    """An untrained generator whose images lie in [-1, 1], as a trained one's do."""
    torch.manual_seed(seed)
    G = StyleGenerator(CFG, 16, 3).eval()
    with torch.no_grad():
        for to_rgb in G.synthesis.to_rgb:
            to_rgb.weight.mul_(0.15)
    return G


def drawn(G: StyleGenerator, seed: int) -> torch.Tensor:
    """One sample of ``G`` at 16x16 (level 2), its latent and noise inputs from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = G.mapping(torch.randn(1, 8, generator=g))
        noises = [torch.randn(1, 1, 4 * 2 ** (i // 2), 4 * 2 ** (i // 2), generator=g)
                  for i in range(num_layers(2))]  # fmt: skip
        return G.synthesis(w[:, None].expand(-1, num_layers(2), -1), 2, 1.0, noises=noises)[0]


def test_a_generator_reconstructs_its_own_samples_far_closer_than_another_one_does():
    """Attribution: a sample of G projects into G far closer than into another generator, and
    the other way round; the distance falls as the steps run; a seed gives one answer."""
    G, other = generator(0), generator(1)
    cfg = ProjectConfig(steps=150, w_avg_samples=2000, lr=0.05, seed=0)
    for seed in (10, 11):
        for maker, stranger in ((G, other), (other, G)):
            target = drawn(maker, seed)
            own, cross = project(maker, 2, 1.0, target, cfg), project(stranger, 2, 1.0, target, cfg)
            assert own.distance < 0.25 * cross.distance, (seed, own.distance, cross.distance)
            assert own.history[-1] < 0.5 * own.history[0]
    p = project(G, 2, 1.0, drawn(G, 10), cfg)
    assert p.image.shape == (3, 16, 16) and p.w.shape == (8,)
    assert [tuple(n.shape[-2:]) for n in p.noises][::2] == [(4, 4), (8, 8), (16, 16)]
    assert all(abs(float(n.std()) - 1) < 0.05 for n in p.noises)  # renormalized each step
    again = project(G, 2, 1.0, drawn(G, 10), cfg)
    assert torch.equal(again.w, p.w) and again.distance == p.distance
    with pytest.raises(Exception, match="the image is 8x8, the generator draws 16x16"):
        project(G, 2, 1.0, torch.zeros(3, 8, 8), cfg)


def test_noise_regularizer_is_small_for_white_noise_and_large_for_structure():
    g = torch.Generator().manual_seed(0)
    white = [torch.randn(1, 1, 32, 32, generator=g)]
    smooth = [torch.ones(1, 1, 32, 32)]  # fully correlated: the image could hide in it
    assert float(_noise_regularizer(white)) < 0.01 < float(_noise_regularizer(smooth))


def test_gm_project_writes_target_and_reconstruction_and_refuses_bad_input(tmp_path, capsys):
    trainer, cfg = make("stylegan")
    ckpt = tmp_path / "stylegan.pt"
    save_checkpoint(ckpt, "stylegan", cfg, INFO, trainer.state_dict())
    image = tmp_path / "in.png"
    Image.fromarray(np.full((24, 24, 3), 120, np.uint8)).save(image)
    out = tmp_path / "proj.png"
    args = ["project", str(image), "--model", str(ckpt), "--out", str(out), "--steps", "20"]
    assert main([*args, "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["distance_mse"] >= 0 and row["steps"] == 20 and row["reconstruction"] == str(out)
    side = 4 * 2 ** int(trainer.model.level)  # the checkpoint's current resolution
    assert np.asarray(Image.open(out)).shape == (side + 4, 2 * side + 6, 3)  # 2 images, padding
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["project", str(bad), "--model", str(ckpt), "--out", str(tmp_path / "x.png")]) == 2
    assert "bad.png: not an image" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    dc, dcfg = make("dcgan")
    save_checkpoint(tmp_path / "dcgan.pt", "dcgan", dcfg, INFO, dc.state_dict())
    assert main(["project", str(image), "--model", str(tmp_path / "dcgan.pt"),
                 "--out", str(tmp_path / "y.png")]) == 2  # fmt: skip
    assert "a dcgan checkpoint; projection needs a StyleGAN" in capsys.readouterr().err
