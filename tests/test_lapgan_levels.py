"""bench/lapgan_levels.py: a LAPGAN's chain scored with real images in place of its coarser
levels' samples."""

from __future__ import annotations

import sys

import pytest
import torch

from gm.config import from_dict
from gm.errors import DataError
from gm.metrics.classifier import ClassifierConfig, save_classifier, train_classifier
from gm.registry import families
from gm.train.checkpoint import save_checkpoint
from gm.train.loop import Trainer
from gm.train.protocol import DataInfo

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from lapgan_levels import level_table, main  # noqa: E402

INFO = DataInfo(16, 1, 10)


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    """A small domain classifier of the digits (its features score every row)."""
    path = tmp_path_factory.mktemp("classifier") / "c.pt"
    ccfg = ClassifierConfig(width=4, features=8, steps=10, batch_size=16)
    net, report = train_classifier(digits, 16, ccfg, progress=False)
    save_classifier(path, net, ccfg, report)
    return path


def checkpoint(tmp_path, family: str, model: dict):
    fam = families()[family]
    cfg = from_dict(fam.config, model, family)
    trainer = Trainer(fam.build(cfg, INFO))
    return tmp_path / f"{family}.pt", trainer, cfg


def test_each_level_is_scored_from_real_input_and_a_zero_residual_adds_nothing(
    digits, classifier, tmp_path, capsys
):
    path, trainer, cfg = checkpoint(
        tmp_path, "lapgan", {"levels": 3, "z_dim": 8, "coarse_hidden": 16, "width": 8}
    )
    last = trainer.model.nets["G16"].net[-1]  # G16's output conv: a zero residual
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    save_checkpoint(path, "lapgan", cfg, INFO, trainer.state_dict())

    args = [str(path), "--dataset", str(digits), "--classifier", str(classifier)]
    main([*args, "--samples", "60"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["chain", "FID"]
    rows = dict(level_table(path, digits, classifier, samples=60))
    assert [line.rsplit(None, 1)[0].strip() for line in lines[1:]] == list(rows) == [
        "real 16",
        "real 8, upsampled", "real 8 → G16",
        "real 4, upsampled", "real 4 → G8 → G16",
        "G4, upsampled", "G4 → G8 → G16",
    ]  # fmt: skip
    assert all(v >= 0 for v in rows.values())
    # G16 adds nothing: from real 8x8 images its chain is their upsampling, to the digit
    assert rows["real 8 → G16"] == rows["real 8, upsampled"]
    # G8 (untouched) adds its residual on the way from 4x4
    assert rows["real 4 → G8 → G16"] != rows["real 4, upsampled"]
    # the sampler's images are not the real ones
    assert rows["G4 → G8 → G16"] > rows["real 16"]

    other, trainer, cfg = checkpoint(tmp_path, "dcgan", {"ngf": 8, "ndf": 8})
    save_checkpoint(other, "dcgan", cfg, INFO, trainer.state_dict())
    with pytest.raises(DataError, match="dcgan.pt: a dcgan checkpoint, not a lapgan one"):
        main([str(other), *args[1:]])


def test_the_coarsest_level_alone_is_seeded_and_its_variants_train(digits, classifier, capsys):
    from lapgan_coarse import main as coarse

    args = ["--dataset", str(digits), "--classifier", str(classifier), "--top", "16",
            "--steps", "3", "--batch-size", "8", "--samples", "40"]  # fmt: skip
    first, again = coarse(args), coarse(args)
    assert first["fid"] == again["fid"] and first["fid"] > 0  # seeded: the same run twice
    assert first["fid_real"] < first["fid"]  # real coarse images beat 3 steps of training
    variant = coarse([*args, "--conv", "4", "--updates", "2", "--ema", "0.9", "--r1", "1",
                      "--spectral-norm"])  # fmt: skip
    assert variant["settings"]["conv"] == 4 and variant["fid"] != first["fid"]
    assert variant["fid_real"] == first["fid_real"]  # the same real images and features
    assert "FID" in capsys.readouterr().out
