"""Learned-codec benchmark: encode and decode speed against JPEG in the same run, and the
rate–distortion comparison on held-out photo mosaics (≥ 256×256) with header bytes apart.

    python bench/bench_codec.py [--sweep tune/codec_rd] [--repeat 3]

Uses the default pipeline's codec sweep (``dvc repro tune@codec_rd`` makes it) and the
prepared ``photos`` dataset. Prints, per learned codec: images/s to encode (to a .gmc file)
and decode (from it) beside JPEG at quality 50 on the same images, their ratio; bpp of the
files, of the entropy-coded payload, the header bytes per file, the likelihood estimate, PSNR
and MS-SSIM; then each baseline's curve, the container bytes of each format and the BD-rates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import torch

    from bench.bench_data import timed
    from gm import codec as coding
    from gm import params
    from gm.compress import load_codec
    from gm.metrics import rd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=str(REPO / "tune/codec_rd"))
    ap.add_argument("--rd", default="photos", help="key of params.yaml: rd")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = params.load(REPO / "params.yaml").rd[args.rd]
    images = rd.load_mosaics(REPO / "datasets/pyramid" / cfg.dataset, cfg.split, cfg.mosaic)
    n = len(images)
    print(f"{n} held-out {cfg.mosaic}x{cfg.mosaic} mosaics of {cfg.dataset}/{cfg.split}, "
          f"torch threads 2, best of {args.repeat}")  # fmt: skip
    jpeg_files = [rd.encode(im, "jpeg", 50) for im in images]
    j_enc = n / timed(lambda: [rd.encode(im, "jpeg", 50) for im in images], args.repeat)
    j_dec = n / timed(lambda: [rd.decode(f) for f in jpeg_files], args.repeat)
    j_bpp = 8 * sum(map(len, jpeg_files)) / (n * cfg.mosaic**2)
    print(f"JPEG q50: encode {j_enc:.1f} img/s, decode {j_dec:.1f} img/s, {j_bpp:.3f} bpp")
    print(f"{'learned codec':>24} {'λ':>7} {'enc img/s':>9} {'×JPEG':>6} {'dec img/s':>9} "
          f"{'×JPEG':>6} {'bpp file':>8} {'payload':>8} {'estim.':>7} {'hdr B':>5} "
          f"{'PSNR':>6} {'MS-SSIM':>7}")  # fmt: skip
    for ckpt in sorted(Path(args.sweep).glob("checkpoints/*/checkpoint.pt")):
        model = load_codec(ckpt)
        xs = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
        files = [coding.pack(model.compress(x)) for x in xs]
        enc = n / timed(lambda m=model, xs=xs: [coding.pack(m.compress(x)) for x in xs],
                        args.repeat)  # fmt: skip
        dec = n / timed(lambda m=model, fs=files: [m.decompress(coding.unpack(f)) for f in fs],
                        args.repeat)  # fmt: skip
        p = rd.codec_point(model, images)
        print(f"{ckpt.parent.name:>24} {model.cfg.lmbda:7.4f} {enc:9.1f} {enc / j_enc:6.2f} "
              f"{dec:9.1f} {dec / j_dec:6.2f} {p['bpp']:8.3f} {p['bpp_payload']:8.3f} "
              f"{p['bpp_estimate']:7.3f} {p['header_bytes']:5.0f} {p['psnr']:6.2f} "
              f"{p['ms_ssim']:7.4f}")  # fmt: skip
    result = rd.evaluate_rd(cfg, REPO / "datasets/pyramid" / cfg.dataset, args.sweep,
                            progress=False)  # fmt: skip
    for b, pts in result["baselines"].items():
        curve = ", ".join(f"{q['bpp']:.2f}/{q['psnr']:.1f}" for q in pts)
        print(f"{b:>9} (bpp/PSNR dB): {curve}; container {result['container_bytes'][b]} bytes")
    fmt = {k: ("n/a" if v is None else f"{v:+.1f} %") for k, v in result["bd_rate"].items()}
    vs = {
        k: ("n/a" if v is None else f"{v:+.1f} %") for k, v in result["bd_rate_learned_vs"].items()
    }
    print(f"BD-rate vs {result['anchor']}: {fmt}; learned vs others: {vs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
