"""Rate–distortion evaluation: standard codecs at a sweep of qualities, and the
Bjøntegaard delta rate (BD-rate) between two rate–distortion curves.

- :func:`baseline_points`: JPEG, WebP and JPEG 2000 (Pillow's encoders) on the same images,
  bpp from the encoded file sizes (container headers included, as a user's files would
  have them; :func:`container_overhead` reports what a near-empty file costs apart). JPEG 2000
  runs twice: by target compression ratio (``jpeg2000``: every image gets the same bpp) and
  by target PSNR (``jpeg2000_psnr``: every image about the same quality), the two rate
  controls of OpenJPEG; which one a comparison uses decides how the bits are spread over
  images of unlike content (the pooled PSNR of :class:`Tally` sees the difference).
- :func:`bd_rate`: the average bitrate difference (%) of a test curve against an anchor
  over their common PSNR range (Bjøntegaard, VCEG-M33), with log-rate interpolated piecewise
  (PCHIP, as in the JVET common test conditions) through each curve's undominated points
  (:func:`rd_front`); :func:`bd_overlap` is the share of the PSNR range it covers. Negative:
  the test codec needs fewer bits.
- :func:`mosaic`: small images tiled into larger ones, so that per-file headers do not decide
  the comparison (images of at least 256×256); :func:`iter_blocks`: a block-split dataset's
  held-out tiles put back where they were cut, contiguous regions of the photos without the
  mosaics' seams between unrelated tiles. Both stream the dataset a row group at a time.
- :func:`evaluate_rd`: trained learned codecs (``train_codec`` jobs) beside the baselines on
  the held-out images (``layout``: blocks or mosaics): bpp of the real ``.gmc`` files, their
  entropy-coded payload apart from the header, the estimate from the model's likelihoods,
  PSNR (the mean over images, and pooled over their pixels), MS-SSIM, the compression ratio
  against raw 24-bit, encode/decode speed, and BD-rates (the DVC stage ``rd@<name>``), in one
  pass over the images (:class:`Tally`): memory is one image, not the held-out split.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from gm.config import check


class StandardCodec(NamedTuple):
    """A standard codec as Pillow writes it: ``settings`` (its sweep, low rate first or by
    quality) go to the save option ``key``, with the fixed save ``options`` beside it;
    ``label`` names its curve in plots and tables."""

    format: str  # Pillow's format name
    key: str  # the save option a setting is passed as
    settings: tuple[int, ...]
    options: dict[str, Any]
    label: str

    @property
    def middle(self) -> int:
        """The middle setting of the sweep (the speed and container-size reference)."""
        return self.settings[len(self.settings) // 2]


# JPEG 2000: the 9/7 wavelet (irreversible, lossy) under either of OpenJPEG's rate controls
CODECS = {
    "jpeg": StandardCodec("JPEG", "quality", (10, 20, 30, 40, 50, 60, 70, 80, 90, 95), {}, "JPEG"),
    "webp": StandardCodec("WEBP", "quality", (5, 10, 20, 30, 40, 50, 60, 70, 80, 90), {}, "WebP"),
    # by target compression ratio (quality_layers), high ratio = low rate: the same bits per
    # pixel for every image, whatever its content
    "jpeg2000": StandardCodec(
        "JPEG2000",
        "quality_layers",
        (200, 120, 80, 50, 35, 25, 16, 10, 6, 4),
        {"quality_mode": "rates", "irreversible": True},
        "JPEG 2000 (ratio target)",
    ),
    # by target PSNR in dB (OpenJPEG's fixed-quality mode): about the same PSNR for every
    # image, the bits going where the content needs them
    "jpeg2000_psnr": StandardCodec(
        "JPEG2000",
        "quality_layers",
        (22, 24, 26, 28, 30, 32, 34, 36, 38, 42),
        {"quality_mode": "dB", "irreversible": True},
        "JPEG 2000 (PSNR target)",
    ),
}


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error of 8-bit values (100 for a lossless code)."""
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    return psnr_of_mse(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def encode(image: np.ndarray, codec: str, setting: int) -> bytes:
    """``image`` (uint8 HxWx3) as the file ``codec`` (a key of CODECS) writes at ``setting``
    (its quality, compression ratio or target PSNR in dB)."""
    from PIL import Image

    c = CODECS[codec]
    buf = io.BytesIO()
    value = [setting] if c.key == "quality_layers" else setting  # one quality layer
    Image.fromarray(image).save(buf, format=c.format, **{c.key: value}, **c.options)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def ms_ssim(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean MS-SSIM (Wang et al. 2003; torchmetrics, 5 scales, 11×11 Gaussian window) over
    pairs of uint8 HxWxC images (``a[i]`` and ``b[i]`` of one size; sizes may differ between
    pairs), batched by size. Pairs with a side under 161 pixels (4 halvings of an 11-pixel
    window do not fit) are left out; NaN if all are."""
    import torch
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    def t(xs):
        return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255

    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(a):
        if min(x.shape[:2]) >= 161:
            by_size.setdefault(x.shape, []).append(i)
    if not by_size:
        return math.nan
    total = 0.0
    with torch.no_grad():
        for idx in by_size.values():
            score = multiscale_structural_similarity_index_measure(
                t([b[i] for i in idx]), t([a[i] for i in idx]), data_range=1.0
            )
            total += float(score) * len(idx)
    return total / sum(map(len, by_size.values()))


class Tally:
    """Running sums over images for one point of a curve (one codec at one setting), so that a
    curve is measured one image at a time: file bits, pixels, each image's PSNR, the pooled
    squared error and each image's MS-SSIM. :meth:`point` gives ``bpp`` (all files' bits over
    all pixels), ``psnr`` (the mean of the images' PSNRs, the curve BD-rates use),
    ``psnr_pooled`` (PSNR of the mean squared error over every pixel of every image: an image
    coded losslessly, 100 dB in ``psnr``, does not dominate it) and ``ms_ssim`` (the mean over
    images with both sides >= 161; NaN if none)."""

    def __init__(self, with_ms_ssim: bool = True):
        self.with_ms_ssim = with_ms_ssim
        self.bits = self.pixels = self.images = self.values = self.ms_images = 0
        self.psnr_sum = self.squared_error = self.ms_sum = 0.0

    def add(self, image: np.ndarray, back: np.ndarray, nbytes: int) -> None:
        """``image`` and its decoded ``back`` (uint8 HxWxC), from a file of ``nbytes``."""
        err = image.astype(np.float64) - back.astype(np.float64)
        self.bits += 8 * nbytes
        self.pixels += image.shape[0] * image.shape[1]
        self.images += 1
        self.values += err.size
        self.squared_error += float(np.sum(err**2))
        self.psnr_sum += psnr(image, back)
        if self.with_ms_ssim and min(image.shape[:2]) >= 161:
            self.ms_sum += ms_ssim([image], [back])
            self.ms_images += 1

    def point(self) -> dict[str, float]:
        point = {"bpp": self.bits / self.pixels, "psnr": self.psnr_sum / self.images,
                 "psnr_pooled": psnr_of_mse(self.squared_error / self.values)}  # fmt: skip
        if self.with_ms_ssim:
            point["ms_ssim"] = self.ms_sum / self.ms_images if self.ms_images else math.nan
        return point


class BaselineTally:
    """A standard codec's curve (:func:`baseline_points`), one image at a time: ``add`` every
    image, then ``points``."""

    def __init__(self, codec: str, with_ms_ssim: bool = False,
                 settings: tuple[int, ...] | None = None):  # fmt: skip
        self.codec = codec
        self.tallies = {s: Tally(with_ms_ssim) for s in settings or CODECS[codec].settings}

    def add(self, image: np.ndarray) -> None:
        for s, tally in self.tallies.items():
            data = encode(image, self.codec, s)
            tally.add(image, decode(data), len(data))

    def points(self) -> list[dict[str, float]]:
        points = [{"setting": s} | t.point() for s, t in self.tallies.items()]
        return sorted(points, key=lambda p: p["bpp"])


def baseline_points(
    images: Iterable[np.ndarray], codec: str, with_ms_ssim: bool = False,
    settings: tuple[int, ...] | None = None,
) -> list[dict[str, float]]:  # fmt: skip
    """Mean bpp and PSNR (and MS-SSIM) over ``images`` (uint8 HxWx3) at each quality of
    ``codec`` (``settings``, default its sweep in CODECS), by bpp; bpp counts the whole files
    (pixels of all images together). Keys as :meth:`Tally.point`, plus ``setting``."""
    tally = BaselineTally(codec, with_ms_ssim, settings)
    for img in images:
        tally.add(img)
    return tally.points()


class CodecTally:
    """One trained codec's point (:func:`codec_point`), one image at a time."""

    def __init__(self, model):
        self.model, self.tally = model, Tally()
        self.header = self.est_bits = 0.0
        self.enc_s = self.dec_s = 0.0
        self.exact = True

    def add(self, img: np.ndarray) -> None:
        import torch

        from gm import codec as coding

        model = self.model
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
        t0 = time.perf_counter()
        data = coding.pack(model.compress(x))
        t1 = time.perf_counter()
        packed = coding.unpack(data)
        back = model.decompress(packed)
        t2 = time.perf_counter()
        self.enc_s, self.dec_s = self.enc_s + t1 - t0, self.dec_s + t2 - t1
        self.exact &= bool(torch.equal(back, model.reconstruct(x)))
        out = (back.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        self.header += coding.header_bytes(packed)
        n = img.shape[0] * img.shape[1]
        self.est_bits += model.rate_distortion(x[None] * 2 - 1)["bpp_estimate"] * n
        self.tally.add(img, out, len(data))

    def point(self) -> dict[str, Any]:
        t, point = self.tally, self.tally.point()
        return {
            **point,
            "bpp_payload": (t.bits - 8 * self.header) / t.pixels,
            "bpp_estimate": self.est_bits / t.pixels,
            "header_bytes": self.header / t.images,
            "ratio": 24 / point["bpp"],
            "encode_images_per_s": t.images / self.enc_s,
            "decode_images_per_s": t.images / self.dec_s,
            "decode_exact": self.exact,
        }


def codec_point(model, images: Iterable[np.ndarray]) -> dict[str, Any]:
    """One trained codec on ``images``: real files (pack/unpack), their size with and without
    the header, the likelihood estimate, quality of the decoded 8-bit images (keys as
    :meth:`Tally.point`), encode/decode images/s and whether every decode equals the model's
    quantized reconstruction (``decode_exact``)."""
    tally = CodecTally(model)
    for img in images:
        tally.add(img)
    return tally.point()


class SpeedTally:
    """Encode and decode images/s of a standard codec at its middle setting (the speed
    ratio's reference), one image at a time."""

    def __init__(self, codec: str):
        self.codec, self.setting = codec, CODECS[codec].middle
        self.images, self.enc_s, self.dec_s = 0, 0.0, 0.0

    def add(self, image: np.ndarray) -> None:
        t0 = time.perf_counter()
        data = encode(image, self.codec, self.setting)
        t1 = time.perf_counter()
        decode(data)
        t2 = time.perf_counter()
        self.images += 1
        self.enc_s, self.dec_s = self.enc_s + t1 - t0, self.dec_s + t2 - t1

    def speed(self) -> dict[str, float]:
        return {"encode_images_per_s": self.images / self.enc_s,
                "decode_images_per_s": self.images / self.dec_s}  # fmt: skip


def container_overhead(codec: str) -> int:
    """Bytes of the file of a 1×1 image: the container's fixed cost, reported apart."""
    return len(encode(np.zeros((1, 1, 3), np.uint8), codec, CODECS[codec].middle))


def rd_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bpp, PSNR) points of a rate–distortion curve that no other point of it beats, in
    order of rate: each has a higher PSNR than every point of lower or equal rate. A point that
    costs more bits for less PSNR than another (a codec trained at a higher λ that did not get
    there) is dominated and left out, as a user would not pick that setting."""
    front: list[tuple[float, float]] = []
    for r, p in sorted(points, key=lambda x: (x[0], -x[1])):
        if not front or p > front[-1][1]:
            front.append((r, p))
    return front


def bd_overlap(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float:
    """The share (0 to 1) of the two RD fronts' joint PSNR range that both cover: the range a
    BD-rate averages over, against the whole. The ``bjontegaard`` package warns below 0.75: a
    BD-rate over less speaks for that part of the curves only."""
    pa, pt = [p for _, p in rd_front(anchor)], [p for _, p in rd_front(test)]
    both = min(max(pa), max(pt)) - max(min(pa), min(pt))
    union = max(max(pa), max(pt)) - min(min(pa), min(pt))
    return max(both, 0.0) / union if union > 0 else 0.0


def bd_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float:
    """BD-rate (%) of ``test`` against ``anchor``, each a list of (bpp, PSNR) points: the mean
    difference in log-rate at equal PSNR over the common PSNR range of the two curves'
    :func:`rd_front`, as a percentage of the anchor's rate (negative: ``test`` needs fewer bits).
    Log-rate is interpolated as a piecewise cubic Hermite polynomial (PCHIP) of PSNR, the
    JCT-VC/JVET common test conditions' method, computed by the ``bjontegaard`` package
    (Herglotz et al., FAU). Bjøntegaard's original single cubic fit (VCEG-M33) swings through a
    curve whose PSNR falls at its top rate: it gave -5 % against JPEG 2000 for a learned codec
    that needed 1.4 to 3.7 times JPEG 2000's bits at the PSNRs it reached (PCHIP: +101 %).

    Raises ValueError when a front has fewer than 2 points or the PSNR ranges do not overlap.
    """
    import bjontegaard

    fa, ft = rd_front(anchor), rd_front(test)
    if len(fa) < 2 or len(ft) < 2:
        raise ValueError("BD-rate needs at least 2 points on each curve's rate-distortion front")
    (ra, pa), (rt, pt) = (np.array(c).T for c in (fa, ft))
    if max(pa.min(), pt.min()) >= min(pa.max(), pt.max()):
        raise ValueError(f"the PSNR ranges do not overlap ({pa.min():.2f}–{pa.max():.2f} dB "
                         f"against {pt.min():.2f}–{pt.max():.2f} dB)")  # fmt: skip
    # min_overlap=0: the share is reported beside the BD-rate (bd_overlap), not warned about
    return float(bjontegaard.bd_rate(ra, pa, rt, pt, method="pchip",
                                     require_matching_points=False, min_overlap=0))  # fmt: skip


def mosaic(tiles: list[np.ndarray], side: int) -> list[np.ndarray]:
    """Tile equally sized images into ``side``×``side`` mosaics (row-major; the last, partial
    mosaic is dropped so every mosaic is full)."""
    h, w = tiles[0].shape[:2]
    per_row, per_col = side // w, side // h
    per = per_row * per_col
    out = []
    for start in range(0, len(tiles) - per + 1, per):
        group = tiles[start : start + per]
        rows = [np.concatenate(group[r * per_row : (r + 1) * per_row], 1) for r in range(per_col)]
        out.append(np.concatenate(rows, 0))
    return out


# -- the rate–distortion stage ---------------------------------------------------------------


@dataclass(frozen=True)
class RDConfig:
    """``params.yaml: rd.<name>``: learned codecs against the standard ones on held-out images."""

    dataset: str  # a key of datasets (RGB): its `split` tiles, tiled into mosaics
    sweep: str  # a key of tune with keep_checkpoints over a train_codec job: its kept
    # checkpoints are the learned codec's RD points (2+ on the RD front for a BD-rate)
    split: Literal["train", "val", "test"] = "test"
    # mosaic: the split's tiles in stored order, tiled into mosaic x mosaic images (seams
    # between unrelated tiles); blocks: each held-out block of a dataset prepared with
    # split_by: block, its tiles in place (a contiguous region of one photo, no seams)
    layout: Literal["mosaic", "blocks"] = "mosaic"
    mosaic: int = 256  # side of the mosaics the tiles are assembled into (>= 256 in reports)
    max_images: int = 0  # 0: every full mosaic (every block, the largest first)
    baselines: tuple[str, ...] = ("jpeg", "webp", "jpeg2000", "jpeg2000_psnr")
    anchor: str = "jpeg"  # BD-rates are against this baseline

    def __post_init__(self):
        m = self.mosaic
        check(m >= 64 and m & (m - 1) == 0, "mosaic", f"{m} is not a power of two >= 64")
        check(self.max_images >= 0, "max_images", "must be >= 0")
        for b in self.baselines:
            check(b in CODECS, "baselines", f"{b!r} is not one of {', '.join(CODECS)}")
        check(self.anchor in self.baselines, "anchor", f"{self.anchor!r} is not in baselines")


def iter_mosaics(dataset_dir: str | Path, split: str, side: int,
                 max_images: int = 0) -> Iterator[np.ndarray]:  # fmt: skip
    """The ``split`` tiles of a prepared RGB dataset (top level), in stored order, as
    ``side``×``side`` uint8 mosaics, one at a time (the last, partial mosaic is dropped).
    Memory: one row group of tiles and one mosaic, whatever the split's size. Raises
    DataError (before the first mosaic where it can) if the tiles are not RGB, larger than
    ``side`` or too few for one mosaic."""
    from gm.data.parquet import iter_split, level_path, read_images
    from gm.errors import DataError
    from gm.train.job import data_info

    top = data_info(dataset_dir, 0)["resolution"]
    if top > side:
        raise DataError(f"{dataset_dir}: {top}x{top} tiles do not fit {side}x{side} mosaics")
    per, pending, made, seen = (side // top) ** 2, [], 0, 0
    for table in iter_split(level_path(dataset_dir, top), split, ["image"]):
        tiles = read_images(table)
        if tiles.shape[-1] != 3:
            raise DataError(f"{dataset_dir}: the {split} split needs RGB images (has "
                            f"{tiles.shape[-1]} channels)")  # fmt: skip
        for tile in tiles:
            pending.append(tile)
            seen += 1
            if len(pending) == per:
                yield mosaic(pending, side)[0]
                pending, made = [], made + 1
                if made == max_images:
                    return
    if not made:
        raise DataError(
            f"{dataset_dir}: {seen} {split} tiles of {top}x{top} do not fill one "
            f"{side}x{side} mosaic ({per} needed); lower rd.*.mosaic"
        )


def load_mosaics(dataset_dir: str | Path, split: str, side: int,
                 max_images: int = 0) -> list[np.ndarray]:  # fmt: skip
    """:func:`iter_mosaics` as a list (every mosaic in memory at once)."""
    return list(iter_mosaics(dataset_dir, split, side, max_images))


def _block_keys(dataset_dir, b: int):
    """A function of a tile's (id, source) giving (block key (source, block row, block column),
    cell (row, column) in the block) for blocks of ``b`` tiles a side."""
    from gm.data.images import tile_position
    from gm.data.splits import tile_block
    from gm.errors import DataError

    def key_of(id_: str, source: str):
        position = tile_position(id_)
        if position is None:
            raise DataError(f"{dataset_dir}: {id_!r} is not a tile id (source#r<row>c<col>)")
        r, c = position
        return (source, *tile_block(position, b)), (r % b, c % b)

    return key_of


def iter_blocks(dataset_dir: str | Path, split: str,
                max_images: int = 0) -> Iterator[np.ndarray]:  # fmt: skip
    """The ``split`` tiles of a dataset prepared with ``split_by: block`` and ``fit: tile``, put
    back where they were cut: one (rows·T, cols·T, 3) uint8 image per block (T the tile side;
    up to ``split_block`` tiles a side, fewer at a photo's edge), yielded as each block is
    complete in file order. ``max_images`` keeps the largest blocks (stored order among equal
    sizes).

    Two passes over the top level: the tile ids first (the index: a few bytes per tile), then
    the pixels one row group at a time. Memory: one row group and the blocks begun but not yet
    complete; prepare stores the tiles of one photo together, so that is at most one photo's
    ``split`` tiles, whatever the dataset's size. Raises DataError, before the first block, if
    the dataset was split otherwise, a block is not a full rectangle of tiles or the split is
    empty; and if the images are not RGB."""
    from gm.data.parquet import iter_split, level_path, read_images
    from gm.errors import DataError
    from gm.train.job import read_manifest

    manifest = read_manifest(dataset_dir)
    config = manifest.get("config", {})
    if config.get("split_by") != "block":
        raise DataError(f"{dataset_dir}: layout blocks needs a dataset prepared with split_by: "
                        f"block (it has split_by: {config.get('split_by', 'image')}); or set "
                        "rd.*.layout: mosaic")  # fmt: skip
    path, b = level_path(dataset_dir, max(manifest["resolutions"])), int(config["split_block"])
    key_of = _block_keys(dataset_dir, b)
    cells: dict[tuple[str, int, int], set[tuple[int, int]]] = {}  # in order of first tile
    for table in iter_split(path, split, ["id", "source"]):
        for id_, source in zip(table.column("id").to_pylist(),
                               table.column("source").to_pylist(), strict=True):  # fmt: skip
            key, cell = key_of(id_, source)
            cells.setdefault(key, set()).add(cell)
    if not cells:
        raise DataError(f"{dataset_dir}: the {split} split has no tiles")
    grid: dict[tuple[str, int, int], tuple[int, int]] = {}  # block key -> (rows, cols)
    for key, have in cells.items():
        rows, cols = 1 + max(r for r, _ in have), 1 + max(c for _, c in have)
        if len(have) != rows * cols:  # tiles are cut on a full grid: never, unless edited
            raise DataError(f"{dataset_dir}: block {key} of the {split} split is not a full "
                            f"rectangle of tiles ({len(have)} of {rows}x{cols})")  # fmt: skip
        grid[key] = rows, cols
    area = {key: rows * cols for key, (rows, cols) in grid.items()}
    chosen = sorted(cells, key=lambda k: -area[k])  # stable: stored order among equals
    chosen = set(chosen[:max_images] if max_images else chosen)
    begun: dict[tuple[str, int, int], dict[tuple[int, int], np.ndarray]] = {}
    for table in iter_split(path, split, ["id", "source", "image"]):
        tiles = read_images(table)
        if tiles.shape[-1] != 3:
            raise DataError(f"{dataset_dir}: the {split} split needs RGB images "
                            f"(has {tiles.shape[-1]} channels)")  # fmt: skip
        ids, sources = table.column("id").to_pylist(), table.column("source").to_pylist()
        for id_, source, tile in zip(ids, sources, tiles, strict=True):
            key, cell = key_of(id_, source)
            if key not in chosen:
                continue
            got = begun.setdefault(key, {})
            got[cell] = tile
            if len(got) == area[key]:
                del begun[key]
                rows, cols = grid[key]
                yield np.concatenate([np.concatenate([got[(r, c)] for c in range(cols)], 1)
                                      for r in range(rows)], 0)  # fmt: skip


def load_blocks(dataset_dir: str | Path, split: str, max_images: int = 0) -> list[np.ndarray]:
    """:func:`iter_blocks` as a list, the largest first (every block in memory at once)."""
    out = list(iter_blocks(dataset_dir, split, max_images))
    out.sort(key=lambda a: -a.shape[0] * a.shape[1])
    return out


def iter_held_out(cfg: RDConfig, dataset_dir: str | Path,
                  max_images: int | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    """``cfg.layout``'s images of ``cfg.split``, one at a time: :func:`iter_mosaics` or
    :func:`iter_blocks` (``max_images`` None: ``cfg.max_images``)."""
    n = cfg.max_images if max_images is None else max_images
    if cfg.layout == "blocks":
        return iter_blocks(dataset_dir, cfg.split, n)
    return iter_mosaics(dataset_dir, cfg.split, cfg.mosaic, n)


def held_out_images(cfg: RDConfig, dataset_dir: str | Path,
                    max_images: int | None = None) -> list[np.ndarray]:  # fmt: skip
    """:func:`iter_held_out` as a list (in memory at once: for benchmarks and small splits)."""
    return list(iter_held_out(cfg, dataset_dir, max_images))


def held_out_layout(cfg: RDConfig, shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """How the held-out images of ``shapes`` (their (H, W, C)) were laid out: ``layout``,
    ``images`` (count), ``mosaic`` (side, mosaics only) and ``block`` (largest side, blocks
    only)."""
    blocks = cfg.layout == "blocks"
    return {"images": len(shapes), "layout": cfg.layout,
            "mosaic": 0 if blocks else cfg.mosaic,
            "block": max(max(s[:2]) for s in shapes) if blocks else 0}  # fmt: skip


def held_out_label(result: dict[str, Any]) -> str:
    """The held-out images in words: 7 held-out 256² mosaics, 15 held-out blocks in place."""
    if result.get("layout") == "blocks":
        return f"{result['images']} held-out blocks in place (up to {result['block']}²)"
    return f"{result['images']} held-out {result['mosaic']}² mosaics"


def rd_curve(points: list[dict], psnr: str = "psnr") -> list[tuple[float, float]]:
    """(bpp, PSNR) pairs of a curve's points (dicts as :meth:`Tally.point`), on the ``psnr``
    key: ``psnr`` (the mean over images) or ``psnr_pooled``."""
    return [(p["bpp"], p[psnr]) for p in points]


def bd_rate_of(anchor: list[dict], test: list[dict], psnr: str = "psnr",
               digits: int = 2) -> float | None:  # fmt: skip
    """:func:`bd_rate` (%) of two curves' points on the ``psnr`` key, rounded to ``digits``;
    None where it is undefined (a front of < 2 points, PSNR ranges that do not meet)."""
    try:
        return round(bd_rate(rd_curve(anchor, psnr), rd_curve(test, psnr)), digits)
    except ValueError:
        return None


def load_sweep(sweep_dir: str | Path) -> list[tuple[dict[str, Any], Any]]:
    """(trial.json, frozen Codec) of each checkpoint a codec sweep kept (the tune stage's OUT
    folder), loaded once for :func:`evaluate_rd` and :func:`comparison_strip`."""
    from gm.compress import load_codec
    from gm.errors import DataError
    from gm.tune import kept_trials

    kept = kept_trials(sweep_dir)
    if not kept:
        raise DataError(f"{sweep_dir}: no kept codec checkpoints (checkpoints/*/trial.json); "
                        "the sweep needs keep_checkpoints: true")  # fmt: skip
    return [(trial, load_codec(path)) for trial, path in kept]


def _sweep(sweep) -> list[tuple[dict[str, Any], Any]]:
    return load_sweep(sweep) if isinstance(sweep, str | Path) else sweep


def bd_tables(curves: dict[str, list[dict]], learned: list[dict], anchor: str,
              quality: str = "psnr") -> dict[str, dict[str, float | None]]:  # fmt: skip
    """BD-rates (%, bits at equal quality; negative: fewer bits) on one quality key of the
    points (``psnr`` or ``psnr_pooled``), from the baselines' curves (name → points, the
    anchor among them) and the learned codec's points:

    - ``bd_rate``: the learned curve (``"learned"``) and each other baseline against the anchor;
    - ``bd_rate_learned_vs``: the learned curve against each baseline but the anchor;
    - ``bd_overlap``: the share of the joint quality range the learned curve and each baseline
      (the anchor too) both cover, in [0, 1]: a BD-rate averages over that part only, and the
      bjontegaard package warns below 0.75.

    A BD-rate is None where its two curves do not overlap or a front has < 2 points."""
    ref = curves[anchor]
    others = {b: pts for b, pts in curves.items() if b != anchor}
    bd = {"learned": bd_rate_of(ref, learned, quality)}
    bd |= {b: bd_rate_of(ref, pts, quality) for b, pts in others.items()}
    return {
        "bd_rate": bd,
        "bd_rate_learned_vs": {b: bd_rate_of(pts, learned, quality) for b, pts in others.items()},
        "bd_overlap": {
            b: round(bd_overlap(rd_curve(pts, quality), rd_curve(learned, quality)), 3)
            for b, pts in curves.items()
        },
    }


def evaluate_rd(cfg: RDConfig, dataset_dir: str | Path, sweep,
                progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """The rate–distortion table and the largest held-out image.

    The table (JSON-able): each kept codec of the sweep (its OUT folder, or
    :func:`load_sweep`'s result) as a point, each baseline's sweep, and :func:`bd_tables` on
    the per-image mean PSNR (``bd_rate``, ``bd_rate_learned_vs``, ``bd_overlap``) and on the
    pooled PSNR (``pooled``: the same three).

    One pass over the held-out images (:func:`iter_held_out`): each image is coded by every
    learned codec and every baseline setting, then dropped, so memory is one image (and the
    reader's row group), not the split; the largest image seen is kept and returned (uint8
    (H, W, 3), the first yielded among equals, for :func:`comparison_strip`), so at most two
    images are held."""
    from tqdm import tqdm

    codecs = _sweep(sweep)
    tallies = [(trial, model, CodecTally(model)) for trial, model in codecs]
    baselines = {b: BaselineTally(b, with_ms_ssim=True) for b in cfg.baselines}
    speed = SpeedTally(cfg.anchor)
    shapes, example = [], None
    for img in tqdm(iter_held_out(cfg, dataset_dir), desc="held-out images", unit="image",
                    disable=not progress):  # fmt: skip
        shapes.append(img.shape)
        if example is None or img.shape[0] * img.shape[1] > example.shape[0] * example.shape[1]:
            example = img
        for _, _, tally in tallies:
            tally.add(img)
        for tally in baselines.values():
            tally.add(img)
        speed.add(img)
    learned = []
    for trial, model, tally in tallies:
        point = {"name": trial["trial_id"], "lmbda": model.cfg.lmbda, "steps": trial["steps"],
                 "mlflow_run_id": trial.get("mlflow_run_id", "")}  # fmt: skip
        learned.append(point | tally.point())
    learned.sort(key=lambda p: p["bpp"])
    curves = {b: tally.points() for b, tally in baselines.items()}
    front = rd_front(rd_curve(learned))
    dominated = [p["name"] for p in learned if (p["bpp"], p["psnr"]) not in front]
    return {
        **held_out_layout(cfg, shapes),
        "pixels_per_image": sum(s[0] * s[1] for s in shapes) / len(shapes),
        "anchor": cfg.anchor,
        "learned": learned,
        "baselines": curves,
        "container_bytes": {b: container_overhead(b) for b in cfg.baselines},
        **bd_tables(curves, learned, cfg.anchor),  # on the per-image mean PSNR
        # the same on psnr_pooled: it weighs the images a codec codes worst more than the
        # per-image mean does
        "pooled": bd_tables(curves, learned, cfg.anchor, "psnr_pooled"),
        "dominated": dominated,  # learned points off the RD front, left out of the BD-rates
        "anchor_speed": speed.speed(),
    }, example


def plot_rd(result: dict[str, Any], title: str):
    """PSNR (the mean over images, and pooled), and MS-SSIM against bpp for every curve, as a
    PIL image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15.5, 4.4), dpi=110)
    curves = [(CODECS[b].label, pts, "o-", 1.2) for b, pts in result["baselines"].items()]
    curves.append(("learned codec", result["learned"], "s-", 2.4))
    panels = ((axes[0], "psnr", "PSNR (dB), mean over images"),
              (axes[1], "psnr_pooled", "PSNR (dB) of the pooled squared error"),
              (axes[2], "ms_ssim", "MS-SSIM"))  # fmt: skip
    for ax, key, label in panels:
        for name, pts, style, lw in curves:
            ax.plot([p["bpp"] for p in pts], [p[key] for p in pts], style, lw=lw, ms=3.5,
                    label=name)  # fmt: skip
        ax.set_xlabel("bits per pixel (file size)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    bd = result["bd_rate"].get("learned")
    bd_text = "n/a" if bd is None else f"{bd:+.1f} %"
    if bd is not None:
        bd_text += f" (over {result['bd_overlap'][result['anchor']]:.0%} of the PSNR range)"
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}: {held_out_label(result)}; "
                 f"BD-rate of the learned codec vs {result['anchor'].upper()}: {bd_text}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    from gm.plots import figure_image

    return figure_image(fig)


def rd_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of the table as flat rows (the stage's CSV, a DVC plot)."""
    rows = []
    for p in result["learned"]:
        rows.append({"codec": "learned", "setting": p["name"], "bpp": p["bpp"],
                     "psnr": p["psnr"], "psnr_pooled": p["psnr_pooled"], "ms_ssim": p["ms_ssim"],
                     "bpp_estimate": p["bpp_estimate"],
                     "bpp_payload": p["bpp_payload"]})  # fmt: skip
    for b, pts in result["baselines"].items():
        for p in pts:
            rows.append({"codec": b, "setting": p["setting"], "bpp": p["bpp"], "psnr": p["psnr"],
                         "psnr_pooled": p["psnr_pooled"], "ms_ssim": p["ms_ssim"],
                         "bpp_estimate": "",
                         "bpp_payload": ""})  # fmt: skip
    return rows


def comparison_strip(image: np.ndarray, result: dict[str, Any], sweep,
                     crop: int = 128) -> np.ndarray:  # fmt: skip
    """Original | each learned point | JPEG at the bpp nearest the middle learned point, on a
    ``crop``² corner of ``image`` (uint8), each decoded from its real file."""
    import torch

    from gm import codec as coding

    models = {trial["trial_id"]: model for trial, model in _sweep(sweep)}
    x = image[:crop, :crop]
    crop = x.shape[0]
    panels = [x]
    for p in result["learned"]:
        model = models[p["name"]]
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float() / 255
        back = model.decompress(coding.unpack(coding.pack(model.compress(t))))
        panels.append((back.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    target = result["learned"][len(result["learned"]) // 2]["bpp"]
    jpeg = min(result["baselines"].get("jpeg", []), key=lambda q: abs(q["bpp"] - target),
               default=None)  # fmt: skip
    if jpeg is not None:
        panels.append(decode(encode(x, "jpeg", jpeg["setting"])))
    gap = np.full((crop, 4, 3), 255, np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return np.concatenate(row, 1)
