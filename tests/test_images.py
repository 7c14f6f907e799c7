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


def png(width: int, height: int, bit_depth: int, idat: bytes) -> bytes:
    """A greyscale PNG file's bytes from its IHDR fields and compressed IDAT data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))  # fmt: skip


def png_header_only(path, width: int, height: int, bit_depth: int = 1) -> bytes:
    """A small PNG whose IHDR declares ``width`` x ``height`` greyscale pixels, with a token
    IDAT: what a decompression bomb looks like to a reader of its header."""
    import zlib

    data = png(width, height, bit_depth, zlib.compress(b"\x00" * 48_000, 9))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def constant_png(width: int, height: int) -> bytes:
    """A valid all-zero 8-bit greyscale PNG of any size, built row by row (no full array)."""
    import zlib

    z, row = zlib.compressobj(9), b"\x00" * (width + 1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return png(width, height, 8, idat)


def test_an_image_over_the_documented_limit_is_refused_from_its_header(tmp_path):
    # 20000x20000 is above twice Pillow's own limit: Pillow raised DecompressionBombError,
    # which escaped as a traceback. The limit is gm's 16384 per side, named with the size.
    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert len(bomb) < 100_000
    with pytest.raises(BadImage, match=r"20000x20000 pixels, above the 16384x16384 limit"):
        decode(bomb, 1, WHITE)
    with pytest.raises(BadImage, match="16400x8"):
        decode(png_header_only(tmp_path / "wide.png", 16400, 8), 1, WHITE)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's guard is restored for other code


def test_an_image_between_pillows_limit_and_gms_decodes():
    # 9500x9500 is above Pillow's ~89.5 Mpx warning threshold (reported as "corrupt or
    # truncated" before) but within the documented 16384x16384.
    out = decode(constant_png(9500, 9500), 1, WHITE)
    assert out.shape == (9500, 9500, 1) and int(out.max()) == 0


def test_any_exception_of_the_decoder_is_a_bad_image_with_its_reason(monkeypatch, rng):
    from PIL import PngImagePlugin

    def broken(self):
        raise ZeroDivisionError("a decoder bug")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    with pytest.raises(BadImage, match=r"cannot be decoded \(ZeroDivisionError: a decoder bug\)"):
        decode(encoded(Image.fromarray(random_rgb(rng, 4))), 3, WHITE)


def test_an_unreadable_file_is_a_bad_image_naming_the_cause(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(BadImage, match="cannot be read"):
        decode(str(tmp_path / "dir.png"), 3, WHITE)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_prepare_follows_on_invalid_for_an_oversize_image(tmp_path, rng, policy):
    raw = tmp_path / "raw"
    for i in range(3):
        save(raw / "a" / f"{i}.png", random_rgb(rng, 8))
    png_header_only(raw / "a" / "bomb.png", 20000, 20000)
    cfg = DatasetConfig(top_resolution=8, on_invalid=policy)
    if policy == "error":
        with pytest.raises(DataError, match=r"a/bomb.png: too large.*20000x20000"):
            prepare_dataset(raw, tmp_path / "out", cfg, progress=False)
        assert not (tmp_path / "out").exists()
        return
    m = prepare_dataset(raw, tmp_path / "out", cfg, progress=False)
    assert m["num_images"] == 3
    assert [(s["path"], "20000x20000" in s["reason"]) for s in m["skipped"]] == [
        ("a/bomb.png", True)
    ]


def test_the_cli_decoder_applies_the_same_rules(tmp_path):
    from gm.apply import read_image

    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(DataError, match=r"bomb.png: too large: the header declares 20000x20000"):
        read_image(tmp_path / "bomb.png", 3)


@pytest.mark.parametrize(
    "mode, array, key, channels, kept",
    [
        # greyscale with a tRNS grey key: 0 is transparent
        ("L", np.array([[0, 7], [0, 200]], np.uint8), 0, 1, [7, 200]),
        # RGB with a tRNS colour key; a pixel one level off the key stays
        ("RGB", np.array([[[10, 20, 30], [10, 20, 31]], [[10, 20, 30], [0, 0, 0]]], np.uint8),
         (10, 20, 30), 3, [[10, 20, 31], [0, 0, 0]]),
        # 16-bit greyscale with a 16-bit key
        ("I;16", np.array([[1000, 257 * 9], [1000, 65535]], np.uint16), 1000, 1, [9, 255]),
    ],
)  # fmt: skip
def test_png_colour_key_transparency_becomes_the_background(mode, array, key, channels, kept):
    im = Image.fromarray(array)
    assert im.mode == mode
    out = decode(encoded(im, transparency=key), channels, (255, 255, 255))
    transparent = out[:, 0]  # the keyed pixels are the left column
    assert (transparent == 255).all(), out
    assert out[:, 1].reshape(2, -1).squeeze().tolist() == kept


def test_bilevel_colour_key_and_a_coloured_background_on_grey():
    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((1, 0), 1)
    out = decode(encoded(bw, transparency=0), 3, (10, 20, 30))  # black is transparent
    assert out[0].tolist() == [[10, 20, 30], [255, 255, 255]]
    grey = Image.fromarray(np.array([[5, 6]], np.uint8), "L")
    luma = decode(encoded(grey, transparency=5), 1, (10, 20, 30))  # 601 luma of the colour
    assert luma[0, :, 0].tolist() == [(10 * 299 + 20 * 587 + 30 * 114 + 500) // 1000, 6]


def test_an_empty_dataset_folder_is_named_as_such(tmp_path):
    # It was taken for one class named after itself: "data/empty/empty: class folder has no
    # usable image; ... remove the folder, or set empty_class: drop", a path that does not exist.
    raw = tmp_path / "empty"
    raw.mkdir()
    (raw / ".hidden").write_bytes(b"")
    for empty_class in ("error", "drop"):
        cfg = DatasetConfig(top_resolution=8, empty_class=empty_class)
        with pytest.raises(DataError) as e:
            prepare_dataset(raw, tmp_path / "out", cfg, progress=False)
        assert str(e.value).startswith(f"{raw}: the dataset folder is empty")
        assert "empty/empty" not in str(e.value) and "empty_class" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_flat_folder_without_a_usable_image_names_the_folder(tmp_path):
    raw = tmp_path / "flat"
    raw.mkdir()
    (raw / "notes.txt").write_text("x")
    (raw / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        prepare_dataset(raw, tmp_path / "out", DatasetConfig(top_resolution=8), progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{raw}: the dataset folder has no usable image (2 skipped")
    assert "flat/flat" not in msg and "class folder" not in msg
