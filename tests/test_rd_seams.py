"""bench/rd_seams.py: the same tiles coded in place and permuted, to measure what the rd
stage's mosaics (tiles that were never neighbours side by side) cost each codec."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from gm.data.config import DatasetConfig, SplitConfig
from gm.data.prepare import prepare_dataset
from gm.train.checkpoint import save_checkpoint
from gm.train.loop import Trainer

from .conftest import REPO, save
from .test_rd import fitted_codec, smooth_images

sys.path.insert(0, str(REPO / "bench"))
from rd_seams import main, psnr_at, seam_mosaics, seam_table  # noqa: E402


def tiles_of(image: np.ndarray, source: str, t: int = 64):
    ids, tiles = [], []
    for r in range(image.shape[0] // t):
        for c in range(image.shape[1] // t):
            ids.append(f"{source}#r{r}c{c}")
            tiles.append(image[r * t : (r + 1) * t, c * t : (c + 1) * t])
    return ids, tiles


def test_blocks_of_adjacent_tiles_are_found_and_permuted_without_a_tile_in_place():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (128, 256, 3), dtype=np.uint8)
    ids, tiles = tiles_of(photo, "p.png")
    ids += ["q.png#r0c0", "whole.png"]  # a lone tile and an untiled image: no block
    tiles += [tiles[0], tiles[1]]
    in_place, permuted, sources = seam_mosaics(ids, tiles, 128)
    assert sources == ["p.png", "p.png"]
    assert np.array_equal(in_place[0], photo[:, :128])
    assert np.array_equal(in_place[1], photo[:, 128:])
    for a, b in zip(in_place, permuted, strict=True):
        quads = [x[i : i + 64, j : j + 64] for x in (a, b) for i in (0, 64) for j in (0, 64)]
        same = [[np.array_equal(p, q) for q in quads[4:]] for p in quads[:4]]
        assert all(sum(row) == 1 for row in same)  # the same four tiles ...
        assert not any(same[i][i] for i in range(4))  # ... none of them in its place
    with pytest.raises(ValueError, match="do not tile 100x100"):
        seam_mosaics(ids, tiles, 100)
    curve = [(0.1, 20.0), (0.4, 30.0)]
    assert psnr_at(curve, 0.2) == pytest.approx(25.0)  # halfway in log bpp
    assert math.isnan(psnr_at(curve, 0.05)) and math.isnan(psnr_at(curve, 1.0))


def test_every_codec_codes_both_arrangements_and_block_codecs_pay_no_bits_for_seams(
    tmp_path, capsys
):
    model = fitted_codec(0.01)
    model.eval()
    ids, tiles = [], []
    for k, im in enumerate(smooth_images(2, 256, 5)):
        i, t = tiles_of(im, f"s{k}.png")
        ids, tiles = ids + i, tiles + t
    in_place, permuted, _ = seam_mosaics(ids, tiles, 256)
    rows = {(r["codec"], r["arrangement"]): r for r in seam_table(model, in_place, permuted)}
    assert set(rows) == {(c, a) for c in ("learned", "jpeg 60", "webp 50", "jpeg2000 25")
                         for a in ("in place", "permuted")}  # fmt: skip
    assert all(r["bpp"] > 0 and r["psnr"] > 0 for r in rows.values())
    jpeg_a, jpeg_b = rows[("jpeg 60", "in place")], rows[("jpeg 60", "permuted")]
    assert jpeg_b["bpp"] == pytest.approx(jpeg_a["bpp"], rel=0.03)  # its blocks end on seams
    # WebP's intra prediction and loop filter reach across them: the same pixels lose quality
    assert rows[("webp 50", "permuted")]["psnr"] < rows[("webp 50", "in place")]["psnr"] - 1

    # the script on a prepared dataset of one photo, through a checkpoint file
    save(tmp_path / "raw" / "photo.png", smooth_images(1, 256, 9)[0][:128])
    cfg = DatasetConfig(top_resolution=64, fit="tile", split=SplitConfig(1.0, 0.0, 0.0))
    prepare_dataset(tmp_path / "raw", tmp_path / "ds", cfg, progress=False)
    ck = tmp_path / "codec.pt"
    save_checkpoint(ck, "codec", model.cfg, model.info, Trainer(model).state_dict())
    assert main([str(ck), "--dataset", str(tmp_path / "ds"), "--side", "128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 mosaics of 128x128 from 1 sources")
    assert "learned        bits x" in out
