"""Learned-codec benchmark: encode and decode speed in megapixels per second for every
learned codec beside JPEG, WebP and JPEG 2000 in the same run, and the rate–distortion
comparison on the rd stage's held-out images (blocks of the photos, up to 256×256) with header
bytes apart.

    python bench/bench_codec.py [--sweep tune/codec_rd ...] [--repeat 3] [--threads 2]

Uses the pipeline's codec sweeps (``dvc repro tune@codec_rd`` makes the default one; give
several ``--sweep`` folders to compare, e.g. the long preset's) and the prepared ``photos``
dataset. Prints each standard codec's encode and decode MP/s at its middle setting; then per
learned codec: MP/s to encode (image → .gmc bytes) and decode (bytes → image), each over
JPEG's, bpp of the files, of the entropy-coded payload, the header bytes per file, the
likelihood estimate, PSNR and MS-SSIM; then each baseline's curve and the BD-rates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import numpy as np
    import torch

    from bench.bench_data import timed
    from gm import codec as coding
    from gm import params
    from gm.compress import load_codec
    from gm.metrics import rd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", nargs="+", default=[str(REPO / "tune/codec_rd")],
                    help="codec sweep folders (tune/<name>) with kept checkpoints")  # fmt: skip
    ap.add_argument("--rd", default="photos", help="key of params.yaml: rd")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = params.load(REPO / "params.yaml").rd[args.rd]
    images = rd.held_out_images(cfg, REPO / "datasets/pyramid" / cfg.dataset, 0)
    pixels = sum(im.shape[0] * im.shape[1] for im in images)
    mp = pixels / 1e6  # megapixels per pass
    what = rd.held_out_label(rd.held_out_layout(cfg, [im.shape for im in images]))
    print(f"{what} ({mp:.2f} MP) of {cfg.dataset}/{cfg.split}, "
          f"torch threads {args.threads}, best of {args.repeat}")  # fmt: skip
    print(f"{'codec':>28} {'setting':>8} {'enc MP/s':>9} {'×JPEG':>6} {'dec MP/s':>9} "
          f"{'×JPEG':>6} {'bpp file':>8} {'payload':>8} {'estim.':>7} {'hdr B':>5} "
          f"{'PSNR':>6} {'MS-SSIM':>7}")  # fmt: skip
    speed = {}
    for name, codec in rd.CODECS.items():
        q = codec.middle
        files = [rd.encode(im, name, q) for im in images]
        enc = mp / timed(lambda name=name, q=q: [rd.encode(im, name, q) for im in images],
                         args.repeat)  # fmt: skip
        dec = mp / timed(lambda fs=files: [rd.decode(f) for f in fs], args.repeat)
        speed[name] = (enc, dec)
        bpp = 8 * sum(map(len, files)) / pixels
        psnr = np.mean([rd.psnr(im, rd.decode(f)) for im, f in zip(images, files, strict=True)])
        print(f"{name:>28} {q:>8} {enc:9.2f} {enc / speed['jpeg'][0]:6.3f} {dec:9.2f} "
              f"{dec / speed['jpeg'][1]:6.3f} {bpp:8.3f} {'':>8} {'':>7} {'':>5} "
              f"{psnr:6.2f} {'':>7}")  # fmt: skip
    j_enc, j_dec = speed["jpeg"]
    for sweep in args.sweep:
        for ckpt in sorted(Path(sweep).glob("checkpoints/*/checkpoint.pt")):
            model = load_codec(ckpt)
            xs = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
            files = [coding.pack(model.compress(x)) for x in xs]
            enc = mp / timed(lambda m=model, xs=xs: [coding.pack(m.compress(x)) for x in xs],
                             args.repeat)  # fmt: skip
            dec = mp / timed(lambda m=model, fs=files: [m.decompress(coding.unpack(f))
                                                        for f in fs], args.repeat)  # fmt: skip
            p = rd.codec_point(model, images)
            kind = "context" if model.cfg.context != "none" else (
                "hyperprior" if model.cfg.hyperprior else "factorized")  # fmt: skip
            label = f"{Path(sweep).name}/{ckpt.parent.name} {kind}"[-28:]
            print(f"{label:>28} {model.cfg.lmbda:8.4f} {enc:9.2f} {enc / j_enc:6.3f} "
                  f"{dec:9.2f} {dec / j_dec:6.3f} {p['bpp']:8.3f} {p['bpp_payload']:8.3f} "
                  f"{p['bpp_estimate']:7.3f} {p['header_bytes']:5.0f} {p['psnr']:6.2f} "
                  f"{p['ms_ssim']:7.4f}")  # fmt: skip
    for sweep in args.sweep:
        _rd_table(cfg, sweep)
    return 0


def _rd_table(cfg, sweep) -> None:
    from gm.metrics import rd

    print(f"rate-distortion of {sweep}:")
    result, _ = rd.evaluate_rd(cfg, REPO / "datasets/pyramid" / cfg.dataset, sweep,
                               progress=False)  # fmt: skip
    for b, pts in result["baselines"].items():
        curve = ", ".join(f"{q['bpp']:.2f}/{q['psnr']:.1f}" for q in pts)
        print(f"{b:>9} (bpp/PSNR dB): {curve}; container {result['container_bytes'][b]} bytes")
    fmt = {k: ("n/a" if v is None else f"{v:+.1f} %") for k, v in result["bd_rate"].items()}
    vs = {
        k: ("n/a" if v is None else f"{v:+.1f} %") for k, v in result["bd_rate_learned_vs"].items()
    }
    print(f"BD-rate vs {result['anchor']}: {fmt}; learned vs others: {vs}")


if __name__ == "__main__":
    raise SystemExit(main())
