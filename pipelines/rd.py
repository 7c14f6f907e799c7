"""DVC stage `rd@<name>`: a learned codec's λ sweep against JPEG, WebP and JPEG 2000 on
held-out images → rate–distortion table (JSON metrics, CSV plot), plot and MLflow run."""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

from gm import params
from gm.cli import exit_now, guarded
from gm.errors import ConfigError
from gm.forkserver import run_main


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.io import atomic_path, write_json
    from gm.metrics.rd import (
        comparison_strip,
        evaluate_rd,
        held_out_label,
        load_sweep,
        plot_rd,
        rd_rows,
    )
    from gm.tracking import repo_root

    ap = argparse.ArgumentParser(prog="pipelines.rd", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--name", required=True, help="key of the rd section")
    ap.add_argument("--dataset", required=True, help="prepared dataset folder (RGB)")
    ap.add_argument("--sweep", required=True, help="the sweep's tune OUT folder (kept checkpoints)")
    ap.add_argument("--out", required=True, help="OUT.json, OUT.csv, OUT.png and OUT_samples.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    p = params.load(args.params)
    if args.name not in p.rd:
        raise ConfigError(f"{args.params}: rd.{args.name}: no such rate–distortion evaluation")
    cfg = p.rd[args.name]
    sweep = load_sweep(args.sweep)  # every codec loaded once, for the table and the strip
    # and the largest held-out image (the first among equals), kept by the same pass
    result, example = evaluate_rd(cfg, args.dataset, sweep, progress=not args.quiet)
    plot = plot_rd(result, f"rd.{args.name}")
    from PIL import Image

    strip = Image.fromarray(comparison_strip(example, result, sweep))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = rd_rows(result)
    with atomic_path(out.with_suffix(".csv")) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    for img, path in ((plot, out.with_suffix(".png")),
                      (strip, out.with_name(out.name + "_samples.png"))):  # fmt: skip
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
    metrics = _metrics(result)
    write_json(
        out.with_suffix(".json"),
        metrics
        | {
            "images": result["images"],
            "layout": result["layout"],
            "mosaic": result["mosaic"],
            "block": result["block"],
            "anchor": result["anchor"],
            "container_bytes": result["container_bytes"],
            "anchor_speed": result["anchor_speed"],
        },
    )
    _log_mlflow(repo_root(), args.name, cfg, result, metrics, out)
    bd = result["bd_rate"]["learned"]
    print(f"rd.{args.name}: {len(result['learned'])} learned points on "
          f"{held_out_label(result)}; BD-rate vs {cfg.anchor}: "
          f"{'n/a' if bd is None else f'{bd:+.1f} %'} → {out}.json/.csv/.png")  # fmt: skip
    return 0


# each learned point's numbers in the DVC metrics and MLflow (learned_<i>_<key>)
POINT_METRICS = ("lmbda", "bpp", "bpp_payload", "bpp_estimate", "psnr", "psnr_pooled", "ms_ssim",
                 "ratio")  # fmt: skip


def _metrics(result: dict) -> dict:
    """The headline numbers (DVC metrics, MLflow): BD-rates and each learned point."""
    anchor = result["anchor"]
    m = {}
    # per-image mean PSNR: bd_rate_vs_jpeg, bd_rate_webp_vs_jpeg, bd_rate_vs_webp, ...;
    # pooled PSNR: bd_rate_pooled_learned_vs_jpeg, bd_rate_pooled_webp_vs_jpeg, ...
    for tables, tag, learned in ((result, "", ""), (result["pooled"], "_pooled", "_learned")):
        for b, v in tables["bd_rate"].items():
            m[f"bd_rate{tag}{learned}_vs_{anchor}" if b == "learned"
              else f"bd_rate{tag}_{b}_vs_{anchor}"] = v  # fmt: skip
        m |= {f"bd_rate{tag}{learned}_vs_{b}": v for b, v in tables["bd_rate_learned_vs"].items()}
        m |= {f"bd_overlap{tag}_{b}": v for b, v in tables["bd_overlap"].items()}
    m["dominated_points"] = len(result["dominated"])
    for i, pt in enumerate(result["learned"]):
        for k in POINT_METRICS:
            m[f"learned_{i}_{k}"] = pt[k]
    speed, ref = result["learned"][-1], result["anchor_speed"]
    m |= {
        "encode_speed_vs_anchor": speed["encode_images_per_s"] / ref["encode_images_per_s"],
        "decode_speed_vs_anchor": speed["decode_images_per_s"] / ref["decode_images_per_s"],
        "decode_exact": all(pt["decode_exact"] for pt in result["learned"]),
    }
    return m


def _log_mlflow(root, name: str, cfg, result: dict, metrics: dict, out: Path) -> None:
    """A run for the comparison (plot, table, BD-rates) and each codec's point on the sweep
    trial's own run as ``file/*``: actual bpp (whole file, payload) beside the estimate."""
    from mlflow.entities import Metric

    from gm import tracking
    from gm.config import to_dict

    stage = os.environ.get("DVC_STAGE") or f"rd@{name}"
    run_params = tracking.flatten({"rd": to_dict(cfg)})
    tags = tracking.lineage_tags(root, stage) | {"gm.rd": name}
    handle = tracking.RunHandle.open(root, f"rd-{name}", None, run_params, tags)
    client = handle.client
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
    for i, pt in enumerate(result["learned"]):  # curves over the points, in rate order
        for k in ("bpp", "bpp_estimate", "bpp_payload", "psnr", "psnr_pooled", "ms_ssim"):
            values.append(Metric(f"learned/{k}", float(pt[k]), now, i))
    for b, pts in result["baselines"].items():
        for i, pt in enumerate(pts):
            values += [
                Metric(f"{b}/bpp", pt["bpp"], now, i),
                Metric(f"{b}/psnr", pt["psnr"], now, i),
                Metric(f"{b}/psnr_pooled", pt["psnr_pooled"], now, i),
            ]
    tracking.retry(client.log_batch, handle.run_id, metrics=values)
    for suffix in (".json", ".csv", ".png"):
        tracking.retry(client.log_artifact, handle.run_id, str(out.with_suffix(suffix)))
    tracking.retry(
        client.log_artifact, handle.run_id, str(out.with_name(out.name + "_samples.png"))
    )
    for pt in result["learned"]:
        if not pt.get("mlflow_run_id"):
            continue
        per = [Metric(f"file/{k}", float(pt[k]), now, int(pt["steps"]))
               for k in ("bpp", "bpp_estimate", "bpp_payload", "header_bytes", "psnr", "ms_ssim",
                         "ratio")]  # fmt: skip
        tracking.retry(client.log_batch, pt["mlflow_run_id"], metrics=per)
    handle.finish()


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
