"""A committed rate–distortion report's learned curve against standard codecs it was not
scored against, without its checkpoints.

    python bench/rd_baselines.py reports/rd/photos_long.json --dataset datasets/pyramid/photos \\
        [--params params.yaml] [--name photos] [--baselines jpeg jpeg2000 jpeg2000_psnr]

An rd report (``pipelines/rd.py``) keeps each learned point's bpp, mean PSNR and pooled PSNR
(``learned_<i>_bpp``, ``learned_<i>_psnr``, ``learned_<i>_psnr_pooled``). Those numbers are
all a BD-rate needs, so a baseline added to gm after a report was made (a long preset's
checkpoints are not kept in git) can be compared with it: this script codes the same held-out
images as the stage does (``rd.<name>`` of the params file: split, layout, mosaic side) with
each baseline at its sweep (``gm.metrics.rd.CODECS``), one image at a time, and prints each
curve and the learned curve's BD-rate against each baseline, on the mean of the images' PSNRs
and on the PSNR of their pooled squared error, each with the share of the PSNR range both
curves cover. The images must be those the report scored (the same dataset and params): the
script checks their count against the report's ``images``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def learned_points(report: dict) -> list[dict]:
    """The learned points of an rd report's metrics JSON, in the order it lists them."""
    points, i = [], 0
    while f"learned_{i}_bpp" in report:
        points.append({k: report[f"learned_{i}_{k}"] for k in ("bpp", "psnr", "psnr_pooled")})
        i += 1
    if not points:
        raise SystemExit("the report has no learned_<i>_bpp entries: not an rd report")
    return points


def main(argv: list[str] | None = None) -> int:
    from gm import params
    from gm.metrics.rd import (
        CODECS,
        BaselineTally,
        bd_overlap,
        bd_rate_of,
        iter_held_out,
        rd_curve,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="an rd report's metrics JSON (reports/rd/<name>.json)")
    ap.add_argument("--dataset", required=True, help="the prepared dataset the report scored")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--name", default="photos", help="the rd section whose held-out images to use")
    ap.add_argument("--baselines", nargs="+", choices=list(CODECS),
                    default=["jpeg", "jpeg2000", "jpeg2000_psnr"])  # fmt: skip
    args = ap.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    learned = learned_points(report)
    cfg = params.load(args.params).rd[args.name]
    tallies = {b: BaselineTally(b) for b in args.baselines}
    n = 0
    for img in iter_held_out(cfg, args.dataset):
        for tally in tallies.values():
            tally.add(img)
        n += 1
    if n != report.get("images", n):
        raise SystemExit(f"{args.dataset}: {n} held-out images, the report scored "
                         f"{report['images']}: not the same images")  # fmt: skip
    print(f"{args.report}: {len(learned)} learned points; {n} held-out images of {args.dataset}")
    for b, tally in tallies.items():
        pts = tally.points()
        print(f"\n{CODECS[b].label} ({b}): setting, bpp, PSNR mean / pooled (dB)")
        for p in pts:
            mean, pooled = p["psnr"], p["psnr_pooled"]
            print(f"  {p['setting']:>4}  {p['bpp']:.3f}  {mean:6.2f} / {pooled:6.2f}")
        for key, name in (("psnr", "mean PSNR"), ("psnr_pooled", "pooled PSNR")):
            bd = bd_rate_of(pts, learned, key, digits=1)
            text = "n/a" if bd is None else f"{bd:+.1f} %"  # as the stage reports it
            overlap = bd_overlap(rd_curve(pts, key), rd_curve(learned, key))
            print(f"  learned vs {b}, {name}: BD-rate {text}, overlap {overlap:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
