"""`dvc plots show` of a training run: one chart per curve (gm.plots.write_curves), drawn by a
page that carries Vega inline (.dvc/html/offline.html), so it renders with no network."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest

from gm.plots import TEMPLATE, curve_columns, offline_template, write_curves

from .conftest import BIN, REPO, chromium, dump_dom


def rows(n=40):
    return [{"step": s, "loss/D": 1 / s, "loss/G": s**0.5, "lr/D": 2e-4, "lr/G": 2e-4,
             "D/D_real": 0.3, "step_s": 0.1, "images_per_s": 100.0 + s,
             **({"kid": 0.5 / s} if s % 10 == 0 else {})} for s in range(1, n + 1)]  # fmt: skip


def test_curves_are_one_file_per_chart_with_only_the_rows_that_have_them(tmp_path):
    data = rows()
    data[4]["loss/G"] = math.nan  # a diverged interval is left out, not written as "nan"
    files = write_curves(data, tmp_path / "plots")
    assert [f.name for f in files] == ["loss_D.csv", "loss_G.csv", "kid.csv", "lr_D.csv",
                                       "images_per_s.csv"]  # fmt: skip
    kid = (tmp_path / "plots/kid.csv").read_text().splitlines()
    assert kid == ["step,kid", "10,0.05", "20,0.025", "30,0.0166667", "40,0.0125"]
    g = (tmp_path / "plots/loss_G.csv").read_text().splitlines()
    assert len(g) == 1 + 39 and not any(line.startswith("5,") for line in g)
    cols = {"loss/elbo", "elbo/bits_per_dim", "psnr", "ssim", "psnr_bicubic", "lr/vae"}
    assert curve_columns(cols) == ["loss/elbo", "lr/vae", "elbo/bits_per_dim", "psnr", "ssim"]


def test_the_committed_page_is_the_pinned_bundle_and_dvc_uses_it():
    assert TEMPLATE.read_text() == offline_template()  # python -m gm.plots template rewrites it
    assert "{plot_divs}" in TEMPLATE.read_text() and "{scripts}" not in TEMPLATE.read_text()
    r = subprocess.run([BIN / "dvc", "config", "plots.html_template"], cwd=REPO,
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert (REPO / ".dvc" / r.stdout.strip()).resolve() == TEMPLATE


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (make test installs it)")
def test_dvc_plots_show_draws_every_curve_with_no_network(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([BIN / "dvc", "init", "-q"], cwd=root, check=True)
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")
    shutil.copytree(REPO / ".dvc/html", root / ".dvc/html")
    files = write_curves(rows(), root / "models/m/plots")
    # the stage's declaration in dvc.yaml: the folder, x: step, y: each file's last column
    (root / "dvc.yaml").write_text("plots:\n  - models/m/plots:\n      x: step\n")
    subprocess.run([BIN / "dvc", "plots", "show", "--out", "out"], cwd=root, check=True,
                   capture_output=True)  # fmt: skip
    page = (root / "out/index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page  # nothing to fetch
    dom = dump_dom((root / "out/index.html").as_uri(), tmp_path)
    charts = [part for part in dom.split("<svg")[1:] if 'class="marks"' in part.split(">")[0]]
    assert len(charts) == len(files) == 5
    for f in files:  # each chart titled by its file, its y axis by the column
        assert f"models/m/plots/{f.name}" in dom
    assert "loss/G" in dom and "images_per_s" in dom
