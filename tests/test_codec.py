"""The learned codec's real bitstreams (gm.codec, gm.models.codec): decoding gives exactly the
model's quantized reconstruction; the file size matches the likelihood estimate; foreign,
truncated and corrupted files and files of another model are refused with clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from gm import codec as coding
from gm.errors import DataError
from gm.models.codec import Codec, CodecConfig
from gm.train.protocol import Batch, DataInfo, OptimConfig


def trained(hyperprior: bool, seed: int = 0, steps: int = 30) -> tuple[Codec, torch.Tensor]:
    """A small codec fitted for a few steps to smooth random images (so its densities are
    not the initial ones), and a test image it never saw."""
    torch.manual_seed(seed)
    optim = OptimConfig(lr=1e-3, betas=(0.9, 0.999))
    cfg = CodecConfig(hyperprior=hyperprior, n=16, m=24, lmbda=0.01, optim=optim)
    model = Codec(cfg, DataInfo(64, 3, 1))
    g = torch.Generator().manual_seed(seed)

    def images(n):
        low = torch.rand(n, 3, 8, 8, generator=g)
        return torch.nn.functional.interpolate(low, size=64, mode="bilinear") * 2 - 1

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss, _ = model.loss("rd", Batch(images(8), torch.zeros(8, dtype=torch.long)),
                             {"codec": model.codec})  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.freeze()
    return model, (images(1)[0] + 1) / 2


@pytest.fixture(scope="module", params=[False, True], ids=["factorized", "hyperprior"])
def codec(request):
    return trained(request.param)


def test_decompress_gives_exactly_the_quantized_reconstruction(codec):
    model, image = codec
    packed = model.compress(image)
    data = coding.pack(packed)
    back = model.decompress(coding.unpack(data))
    assert torch.equal(back, model.reconstruct(image))
    odd = image[:, :50, :37]  # not a multiple of the stride: padded, then cropped back
    back = model.decompress(coding.unpack(coding.pack(model.compress(odd))))
    assert back.shape == odd.shape and torch.equal(back, model.reconstruct(odd))


def test_file_size_matches_the_likelihood_estimate(codec):
    model, image = codec
    packed = model.compress(image)
    actual_bits = 8 * sum(len(s) for s in packed.streams)
    estimate = model.rate_distortion(image[None] * 2 - 1)["bpp_estimate"] * 64 * 64
    # ANS with quantized tables costs a little more than the ideal code length: within 2 %
    # plus one 32-bit word per stream (the coder's final state)
    assert estimate <= actual_bits <= estimate * 1.02 + 64 * len(packed.streams), (
        actual_bits, estimate)  # fmt: skip
    # header: magic, version, model id, size, channels, count (31 bytes), per stream its
    # shape and length, then the CRC-32: reported apart from the streams
    per_stream = sum(1 + 4 * len(shape) + 4 for shape in packed.shapes)
    assert coding.header_bytes(packed) == 31 + per_stream + 4


def test_foreign_truncated_corrupted_and_other_models_files_are_refused(codec, tmp_path):
    model, image = codec
    data = coding.pack(model.compress(image))
    with pytest.raises(DataError, match="photo.png: not a gm codec file"):
        coding.unpack(b"\x89PNG\r\n\x1a\n" + bytes(40), "photo.png")
    with pytest.raises(DataError, match="x.gmc: truncated"):
        coding.unpack(data[:-7], "x.gmc")
    with pytest.raises(DataError, match="x.gmc: truncated"):
        coding.unpack(data[:20], "x.gmc")
    flipped = bytearray(data)
    flipped[-3] ^= 0x10
    with pytest.raises(DataError, match="x.gmc: corrupted codec file"):
        coding.unpack(bytes(flipped), "x.gmc")
    future = bytearray(data)
    future[4] = 9
    with pytest.raises(DataError, match="format version 9"):
        coding.unpack(bytes(future), "x.gmc")
    other, _ = trained(model.cfg.hyperprior, seed=1, steps=2)
    with pytest.raises(DataError, match="x.gmc: made by another codec model"):
        other.decompress(coding.unpack(data), "x.gmc")


def test_factorized_density_is_a_distribution():
    torch.manual_seed(0)
    d = coding.FactorizedDensity(4, support=16)
    x = torch.linspace(-30, 30, 301).expand(4, 1, -1).contiguous()
    cdf = torch.sigmoid(d.logits_cdf(x))[:, 0]
    assert bool((cdf[:, 1:] >= cdf[:, :-1]).all())  # monotone in every channel
    d.freeze()
    assert torch.allclose(d.pmf.sum(1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    # the training likelihood of integers equals the frozen table inside the support
    v = torch.arange(-3, 4, dtype=torch.float32).reshape(1, 1, 1, 7).expand(1, 4, 1, 7)
    p = d.likelihood(v.contiguous())[0, :, 0].double()
    assert torch.allclose(p, d.pmf[:, 16 - 3 : 16 + 4], rtol=1e-4)


def test_gaussian_scales_snap_to_the_table():
    idx = coding.scale_indexes(torch.tensor([0.01, 0.11, 1.0, 300.0]))
    table = coding.scale_table()
    assert idx.tolist()[0] == 0 and idx.tolist()[-1] == len(table) - 1
    assert table[idx[2]] >= 1.0 > table[idx[2] - 1]


def test_bd_rate_of_a_curve_needing_10_percent_fewer_bits_is_minus_10():
    from gm.metrics.rd import bd_rate

    anchor = [(r, 30 + 6 * math.log2(r)) for r in (0.25, 0.5, 1.0, 2.0, 3.0)]
    test = [(0.9 * r, p) for r, p in anchor]
    assert bd_rate(anchor, test) == pytest.approx(-10.0, abs=1e-6)
    assert bd_rate(test, anchor) == pytest.approx(100 / 9, abs=1e-6)
    far = [(r, p + 50) for r, p in anchor]
    with pytest.raises(ValueError, match="do not overlap"):
        bd_rate(anchor, far)


def test_standard_codecs_trade_rate_for_quality_and_mosaics_tile_exactly():
    from gm.metrics.rd import baseline_points, container_overhead, mosaic

    g = np.random.default_rng(0)
    low = g.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    tiles = [np.asarray(Image.fromarray(t).resize((64, 64), Image.BICUBIC)) for t in low]
    big = mosaic(tiles, 128)
    assert len(big) == 1 and big[0].shape == (128, 128, 3)
    assert np.array_equal(big[0][64:, :64], tiles[2])
    for codec in ("jpeg", "webp", "jpeg2000"):
        points = baseline_points(big, codec)
        rates = [p["bpp"] for p in points]
        quality = [p["psnr"] for p in points]
        assert rates == sorted(rates) and quality[-1] > quality[0] + 5, (codec, points)
        assert 0 < container_overhead(codec) < 1000


def test_gm_compress_and_decompress_round_trip_a_file(codec, tmp_path, capsys):
    from gm.cli import main
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer

    model, _ = codec
    ckpt = tmp_path / "codec.pt"
    save_checkpoint(ckpt, "codec", model.cfg, model.info, Trainer(model).state_dict())
    g = np.random.default_rng(1)
    low = g.integers(0, 256, (10, 7, 3)).astype(np.uint8)
    photo = Image.fromarray(low).resize((70, 50), Image.BICUBIC)  # never seen, odd size
    photo.save(tmp_path / "photo.png")
    assert main(["compress", str(tmp_path / "photo.png"), "-o", str(tmp_path / "p.gmc"),
                 "--model", str(ckpt)]) == 0  # fmt: skip
    assert "bpp" in capsys.readouterr().out
    assert main(["decompress", str(tmp_path / "p.gmc"), "-o", str(tmp_path / "back.png"),
                 "--model", str(ckpt)]) == 0  # fmt: skip
    back = np.asarray(Image.open(tmp_path / "back.png"))
    assert back.shape == (50, 70, 3)
    from gm.compress import load_codec

    expected = load_codec(ckpt).reconstruct(torch.from_numpy(np.asarray(photo)).permute(2, 0, 1)
                                            .float() / 255)  # fmt: skip
    assert np.abs(back.astype(int) - np.round(expected.permute(1, 2, 0).numpy() * 255)).max() <= 1
    (tmp_path / "bad.gmc").write_bytes((tmp_path / "p.gmc").read_bytes()[:-5])
    assert main(["decompress", str(tmp_path / "bad.gmc"), "-o", str(tmp_path / "x.png"),
                 "--model", str(ckpt)]) == 2  # fmt: skip
    assert "bad.gmc: truncated" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_rates_stay_finite_and_float32_under_float16_autocast():
    """`run.amp` trains the codec in float16 autocast; the entropy model runs in float32, so a
    latent far in its density's tail costs its ~30 bits (the 1e-9 floor), not infinity (1e-9
    is 0 in float16), and ordinary rates match the float32 ones."""
    model, image = trained(hyperprior=True, steps=2)
    x = image[None] * 2 - 1
    batch = Batch(x, torch.zeros(1, dtype=torch.long))
    nets = {"codec": model.codec}
    with torch.no_grad():
        torch.manual_seed(5)  # the same training noise U(-1/2, 1/2) on the latents
        _, ref = model.loss("rd", batch, nets)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.float16):
            loss, amp = model.loss("rd", batch, nets)
        assert torch.isfinite(loss) and amp["bpp"] == pytest.approx(ref["bpp"], rel=0.02)
        model.codec.g_a[-1].weight.mul_(1000)  # latents far out in the tails
        with torch.autocast("cpu", dtype=torch.float16):
            _, bits_y, bits_z = model.codec(x01 := (x + 1) / 2)
        _, bits_y32, _ = model.codec(x01)
    assert bits_y.dtype == torch.float32 and torch.isfinite(bits_y).all()
    assert torch.isfinite(bits_z).all()
    assert bits_y.item() == pytest.approx(bits_y32.item(), rel=0.02)
