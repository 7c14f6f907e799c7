"""What the rd stage's mosaics cost a learned codec: seams between tiles that were never
neighbours.

    python bench/rd_seams.py tune/codec_rd/checkpoints/<trial>/checkpoint.pt \\
        --dataset datasets/pyramid/photos [--splits train val test] [--side 256]

The rd stage (gm.metrics.rd) assembles the held-out tiles of a ``fit: tile`` dataset into
``side``×``side`` mosaics in stored order, so most tile edges in a mosaic are seams: two
tiles from different places side by side. JPEG's 8×8 blocks and WebP's 16×16 macroblocks end
on every 64-pixel seam and code the tiles on either side of it independently; a learned
codec's transforms (Ballé et al. 2018: 5×5 kernels and four stride-2 layers, a receptive
field of some 100 pixels) and JPEG 2000's wavelets reach across it, and spend bits and
quality on an edge no photograph has.

This script finds every block of ``side // tile`` × ``side // tile`` adjacent tiles of one
source in the chosen splits (the tile ids' ``#r{row}c{col}``), and codes each block twice
with every codec: **in place** (as the photograph has it: no seam) and **permuted** (the same
tiles at other places of the same mosaic: seams like the rd stage's). The same pixels are
coded both times, so what changes is the seams' cost alone. Per codec it prints bpp and PSNR
(mean over mosaics) in both arrangements, and the learned codec's PSNR against JPEG's at the
same bpp (JPEG's curve over the same mosaics at qualities 2 to 95, interpolated in log bpp;
``nan`` outside it). Tiles of the train split are ones a codec was trained on: the
arrangement is what the comparison varies, not the content.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

JPEG_QUALITIES = (2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95)
_POS = re.compile(r"^(.*)#r(\d+)c(\d+)$")


def seam_mosaics(ids: list[str], tiles: list[np.ndarray], side: int, seed: int = 0):
    """(in_place, permuted, sources): every ``side``×``side`` block of adjacent tiles of one
    source (blocks do not overlap; rows, then columns), and each block with its tiles shuffled
    (a seeded permutation that moves every tile where the block has more than one). ``ids``
    are prepared-dataset ids ``<source>#r<row>c<col>``; ids without a position are skipped.
    Raises ValueError when the tiles are not square or do not divide ``side``."""
    t = tiles[0].shape[0]
    if tiles[0].shape[1] != t or side % t:
        raise ValueError(f"{t}x{tiles[0].shape[1]} tiles do not tile {side}x{side} mosaics")
    k = side // t
    grid: dict[str, dict[tuple[int, int], np.ndarray]] = defaultdict(dict)
    for i, tile in zip(ids, tiles, strict=True):
        if m := _POS.match(i):
            grid[m[1]][(int(m[2]), int(m[3]))] = tile
    rng = random.Random(seed)
    in_place, permuted, sources = [], [], []
    for src, at in sorted(grid.items()):
        taken: set[tuple[int, int]] = set()
        for r, c in sorted(at):
            block = [(r + a, c + b) for a in range(k) for b in range(k)]
            if not all(q in at and q not in taken for q in block):
                continue
            taken |= set(block)
            order = list(range(k * k))
            while k > 1 and any(i == j for i, j in enumerate(order)):
                rng.shuffle(order)  # a derangement: no tile keeps its place
            parts = [at[q] for q in block]
            in_place.append(_assemble(parts, k))
            permuted.append(_assemble([parts[j] for j in order], k))
            sources.append(src)
    return in_place, permuted, sources


def _assemble(parts: list[np.ndarray], k: int) -> np.ndarray:
    return np.concatenate([np.concatenate(parts[a * k : (a + 1) * k], 1) for a in range(k)], 0)


def jpeg_curve(images: list[np.ndarray]) -> list[tuple[float, float]]:
    """(bpp, mean PSNR) of JPEG over ``images`` at each of JPEG_QUALITIES, by bpp."""
    from gm.metrics.rd import baseline_points

    return [(p["bpp"], p["psnr"]) for p in baseline_points(images, "jpeg", settings=JPEG_QUALITIES)]


def psnr_at(curve: list[tuple[float, float]], bpp: float) -> float:
    """The curve's PSNR at ``bpp`` (linear in log bpp between its points; nan outside)."""
    xs, ys = [math.log(b) for b, _ in curve], [p for _, p in curve]
    x = math.log(bpp)
    return float(np.interp(x, xs, ys)) if xs[0] <= x <= xs[-1] else float("nan")


def seam_table(model, in_place: list[np.ndarray], permuted: list[np.ndarray],
               baselines=("jpeg", "webp", "jpeg2000")) -> list[dict]:  # fmt: skip
    """One row per codec and arrangement: bpp, PSNR, and for the learned codec its PSNR minus
    JPEG's at the same bpp on the same mosaics (``vs_jpeg_db``). The baselines at their
    middle setting (gm.metrics.rd.CODECS)."""
    from gm.metrics.rd import CODECS, baseline_points, codec_point

    rows = []
    for name, ims in (("in place", in_place), ("permuted", permuted)):
        p = codec_point(model, ims)
        jpeg = jpeg_curve(ims)
        gap = p["psnr"] - psnr_at(jpeg, p["bpp"])
        rows.append({"arrangement": name, "codec": "learned", "bpp": p["bpp"],
                     "psnr": p["psnr"], "vs_jpeg_db": gap})  # fmt: skip
        for b in baselines:
            mid = CODECS[b].middle
            (q,) = baseline_points(ims, b, settings=(mid,))
            rows.append({"arrangement": name, "codec": f"{b} {mid}", "bpp": q["bpp"],
                         "psnr": q["psnr"], "vs_jpeg_db": float("nan")})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc

    from gm.compress import load_codec
    from gm.data.parquet import level_path, read_images, read_table
    from gm.errors import DataError
    from gm.train.job import data_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a codec checkpoint (e.g. a kept trial of tune@codec_rd)")
    ap.add_argument("--dataset", default="datasets/pyramid/photos", help="a prepared RGB dataset")
    ap.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    ap.add_argument("--side", type=int, default=256, help="mosaic side (the rd stage's)")
    args = ap.parse_args(argv)
    top = data_info(args.dataset, 0)["resolution"]
    path = level_path(args.dataset, top)
    table = read_table(path, None, ["id", "split", "image"])
    table = table.filter(pc.is_in(table.column("split"), pa.array(args.splits)))
    tiles = list(read_images(table))
    if not tiles or tiles[0].shape[-1] != 3:
        raise DataError(f"{path}: no RGB tiles in the splits {', '.join(args.splits)}")
    ids = table.column("id").to_pylist()
    in_place, permuted, sources = seam_mosaics(ids, tiles, args.side)
    if not in_place:
        raise DataError(f"{path}: no {args.side}x{args.side} block of adjacent tiles of one "
                        f"source in the splits {', '.join(args.splits)}")  # fmt: skip
    print(f"{len(in_place)} mosaics of {args.side}x{args.side} from {len(set(sources))} "
          f"sources ({args.dataset}, splits {' '.join(args.splits)})")  # fmt: skip
    table = seam_table(load_codec(args.model), in_place, permuted)
    print(f"{'codec':<14}{'arrangement':<12}{'bpp':>8}{'PSNR':>8}{'vs JPEG':>9}")
    for r in table:
        print(f"{r['codec']:<14}{r['arrangement']:<12}{r['bpp']:>8.3f}{r['psnr']:>8.2f}"
              f"{r['vs_jpeg_db']:>+9.2f}")  # fmt: skip
    by = {(r["codec"], r["arrangement"]): r for r in table}
    print("the seams' cost (permuted against in place, the same pixels):")
    for codec in dict.fromkeys(r["codec"] for r in table):
        a, b = by[(codec, "in place")], by[(codec, "permuted")]
        ratio, drop = b["bpp"] / a["bpp"], b["psnr"] - a["psnr"]
        print(f"  {codec:<14} bits x{ratio:.3f}, PSNR {drop:+.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
