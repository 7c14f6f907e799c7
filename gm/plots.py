"""What `dvc plots show` draws of a training run, and a page that draws it with no network.

A training stage writes ``models/<job>/plots/``: one CSV per curve (``step`` and one column),
chosen from the run's history (:func:`curve_columns`): every loss, KID, the learning rate,
images/s, and where the family has them bits/dim, PSNR and SSIM. DVC draws each file of a
plots folder as its own chart with the stage's ``x: step``, and its default y, the last column:
one chart per curve, whatever columns a family logs, with nothing per family in ``dvc.yaml``.

DVC's default page loads Vega from a CDN and draws nothing offline. ``.dvc/config`` names
``.dvc/html/offline.html`` as its ``plots.html_template``: a page that carries Vega, Vega-Lite
and vega-embed inline (the bundle vl-convert ships). ``python -m gm.plots template`` writes it.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

# Vega-Lite 5, which DVC's templates declare ("$schema": ".../vega-lite/v5.json")
VEGA_LITE = "5.21"
TEMPLATE = Path(__file__).resolve().parents[1] / ".dvc" / "html" / "offline.html"


def figure_image(fig):
    """A matplotlib figure rendered to an RGB PIL image (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def curve_columns(columns: list[str] | set[str]) -> list[str]:
    """The history columns worth a chart, in a stable order: losses (``loss/*``), ``kid``,
    the first learning rate (``lr/*``; a family's modules share their schedule), images/s,
    bits/dim (``*bits_per_dim``), ``psnr`` and ``ssim``."""
    cols = sorted(set(columns))
    lrs = [c for c in cols if c.startswith("lr/")]
    wanted = [c for c in cols if c.startswith("loss/")]
    wanted += [c for c in ("kid",) if c in cols] + lrs[:1]
    wanted += [c for c in ("images_per_s",) if c in cols]
    wanted += [c for c in cols if c.endswith("bits_per_dim")]
    wanted += [c for c in ("psnr", "ssim") if c in cols]
    return wanted


def file_name(column: str) -> str:
    """``loss/D`` → ``loss_D.csv``; ``elbo/bits_per_dim`` → ``elbo_bits_per_dim.csv``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", column) + ".csv"


def write_curves(rows: list[dict], folder: str | Path) -> list[Path]:
    """One ``step,<column>`` CSV per :func:`curve_columns` column of ``rows`` (dicts with a
    ``step``) into ``folder`` (created); a row without the column (KID: checkpoint rows only)
    or with a non-finite value is left out of that file. Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for column in curve_columns({k for row in rows for k in row} - {"step"}):
        path = folder / file_name(column)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", column])
            for row in rows:
                v = row.get(column)
                if v is not None and math.isfinite(v):
                    w.writerow([row["step"], f"{v:.6g}"])
        written.append(path)
    return written


def offline_template() -> str:
    """An HTML template for ``dvc plots show`` (its ``{plot_divs}`` placeholder, no
    ``{scripts}``: DVC's CDN tags are not inserted) with Vega, Vega-Lite and vega-embed inline.
    """
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle:  # would end the inline script early
        bundle = bundle.replace("</script", "<\\/script")
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<meta charset="utf-8">\n'
        "<title>DVC plots (gm, offline)</title>\n"
        f"<!-- Vega {vl_convert.get_vega_version()}, Vega-Lite {VEGA_LITE}, vega-embed "
        f"{vl_convert.get_vega_embed_version()}: bundled by vl-convert "
        "(python -m gm.plots template) -->\n"
        f"<script>\n{bundle}\n</script>\n"
        "<style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gm.plots", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("template", help="write the offline HTML template DVC uses")
    t.add_argument("--out", type=Path, default=TEMPLATE)
    args = p.parse_args(argv)
    from gm.io import write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, offline_template())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
