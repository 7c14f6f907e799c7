"""Each kind of bad or unusual input: handled by its documented policy or rejected by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gm.data.config import DatasetConfig
from gm.data.images import BadImage, decode, fit_square
from gm.data.prepare import prepare_dataset
from gm.errors import DataError

from .conftest import random_rgb, save

WHITE = (255, 255, 255)


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgba_is_composited_onto_the_background():
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200
    a[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    out = decode(encoded(Image.fromarray(a, "RGBA")), 3, (10, 20, 30))
    assert out.shape == (4, 4, 3)
    assert (out[:2] == [200, 0, 0]).all() and (out[2:] == [10, 20, 30]).all()


def test_grayscale_becomes_rgb_and_rgb_becomes_luma():
    g = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rgb = decode(encoded(Image.fromarray(g, "L")), 3, WHITE)
    assert rgb.shape == (4, 4, 3) and (rgb == g[..., None]).all()
    color = np.zeros((2, 2, 3), np.uint8)
    color[..., 1] = 255
    luma = decode(encoded(Image.fromarray(color)), 1, WHITE)
    assert luma.shape == (2, 2, 1) and int(luma[0, 0, 0]) == 150  # 0.587 * 255


def test_16_bit_is_mapped_linearly_to_8_bit():
    a = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    out = decode(encoded(Image.fromarray(a)), 1, WHITE)
    assert out[..., 0].tolist() == [[0, 100], [255, 7]]


def test_cmyk_palette_and_bilevel_inputs():
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    assert (decode(encoded(cmyk, "JPEG", quality=95), 3, WHITE)[1, 1] > [200, -1, -1]).all()
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    pal.info["transparency"] = 0  # index 0 is transparent → background
    assert decode(encoded(pal), 3, (1, 2, 3))[0, 0].tolist() == [1, 2, 3]
    bw = Image.new("1", (2, 2), 1)
    assert decode(encoded(bw), 1, WHITE)[0, 0, 0] == 255


def test_float_images_are_rejected(tmp_path):
    path = tmp_path / "f.tiff"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(BadImage, match="floating-point"):
        decode(str(path), 3, WHITE)


def test_corrupt_truncated_and_non_image_files(rng):
    good = encoded(Image.fromarray(random_rgb(rng, 16)))
    with pytest.raises(BadImage, match="corrupt or truncated"):
        decode(good[: len(good) // 2], 3, WHITE)
    with pytest.raises(BadImage, match="not an image"):
        decode(b"hello, I am text", 3, WHITE)
    with pytest.raises(BadImage) as e:
        decode(good[:20] + b"\x00" * 50 + good[70:], 3, WHITE)
    assert e.value.kind == "invalid"


@pytest.mark.parametrize("fit", ["center_crop", "pad"])
def test_non_square_policies(fit):
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :2] = 100  # left two columns: cropped away by center_crop, kept by pad
    cfg = DatasetConfig(top_resolution=4, fit=fit, background=(9, 9, 9), resample="box")
    (sq,) = fit_square(a, cfg)
    if fit == "center_crop":
        assert (sq.pixels == 0).all()
    else:  # padded to 8x8 (two rows of 9 above and below), then box-resized to 4x4
        assert sq.pixels.shape == (4, 4, 3)
        assert sq.pixels[0, 0, 0] == 9 and sq.pixels[3, 3, 0] == 9
        assert sq.pixels[1, 0, 0] == 100 and sq.pixels[1, 2, 0] == 0


def test_reject_and_tile_policies():
    a = np.arange(6 * 9 * 3, dtype=np.uint8).reshape(6, 9, 3)
    with pytest.raises(BadImage, match=r"not square \(9x6\)"):
        list(fit_square(a, DatasetConfig(top_resolution=4, fit="reject")))
    tiles = list(fit_square(a, DatasetConfig(top_resolution=4, fit="tile")))
    assert [t.suffix for t in tiles] == ["#r0c0", "#r0c1"]
    # centred grid: rows 1..4, columns 0..7 (one column of remainder, split as 0 left)
    assert (tiles[1].pixels == a[1:5, 4:8]).all()


def test_undersize_policies():
    a = np.full((8, 8, 3), 50, np.uint8)
    with pytest.raises(BadImage) as e:
        list(fit_square(a, DatasetConfig(top_resolution=16)))
    assert e.value.kind == "undersize"
    (sq,) = fit_square(a, DatasetConfig(top_resolution=16, undersize="upscale"))
    assert sq.pixels.shape == (16, 16, 3) and (sq.pixels == 50).all()


def truncated_png(path, rng):
    save(path, random_rgb(rng, 8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_bad_files_are_skipped_and_listed(tmp_path, rng):
    raw = tmp_path / "raw"
    for i in range(3):
        save(raw / "a" / f"{i}.png", random_rgb(rng, 8))
    save(raw / "a" / "small.png", random_rgb(rng, 4))
    save(raw / "a" / "wide.png", random_rgb(rng, 8, 16))
    (raw / "a" / "notes.txt").write_text("not an image")
    truncated_png(raw / "a" / "broken.png", rng)
    (raw / "a" / "garbage.jpg").write_bytes(b"\xff\xd8" + b"\x00" * 30)
    (raw / "a" / ".DS_Store").write_bytes(b"\x00\x01")
    (raw / "stray.png").write_bytes((raw / "a" / "0.png").read_bytes())
    cfg = DatasetConfig(top_resolution=8, fit="reject")
    m = prepare_dataset(raw, tmp_path / "out", cfg, progress=False)
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert m["num_images"] == 3
    assert set(skipped) == {
        "a/small.png",
        "a/wide.png",
        "a/notes.txt",
        "a/broken.png",
        "a/garbage.jpg",
        "stray.png",
    }
    assert "smaller" in skipped["a/small.png"] and "not square" in skipped["a/wide.png"]
    assert "not an image file" in skipped["a/notes.txt"]
    assert "corrupt or truncated" in skipped["a/broken.png"]
    assert "not an image" in skipped["a/garbage.jpg"]
    assert "outside a class folder" in skipped["stray.png"]


@pytest.mark.parametrize(
    "setting, culprit",
    [({"on_invalid": "error"}, "a/broken.png"), ({"undersize": "error"}, "a/small.png")],
)
def test_error_policy_names_the_file_and_writes_nothing(tmp_path, rng, setting, culprit):
    raw = tmp_path / "raw"
    save(raw / "a" / "0.png", random_rgb(rng, 8))
    save(raw / "a" / "small.png", random_rgb(rng, 4))
    truncated_png(raw / "a" / "broken.png", rng)
    out = tmp_path / "out"
    cfg = DatasetConfig(top_resolution=8, **setting)
    with pytest.raises(DataError, match=culprit):
        prepare_dataset(raw, out, cfg, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_empty_class_folder_is_an_error_or_dropped(tmp_path, rng):
    raw = tmp_path / "raw"
    save(raw / "a" / "0.png", random_rgb(rng, 8))
    save(raw / "c" / "0.png", random_rgb(rng, 8))
    (raw / "b").mkdir()
    with pytest.raises(DataError, match=r"raw/b: class folder has no usable image"):
        prepare_dataset(raw, tmp_path / "out", DatasetConfig(top_resolution=8), progress=False)
    assert not (tmp_path / "out").exists()
    m = prepare_dataset(
        raw, tmp_path / "out", DatasetConfig(top_resolution=8, empty_class="drop"), progress=False
    )
    assert m["classes"] == ["a", "c"] and m["dropped_classes"] == ["b"]


def test_missing_raw_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nope: raw data folder does not exist"):
        prepare_dataset(tmp_path / "nope", tmp_path / "out", DatasetConfig(), progress=False)
