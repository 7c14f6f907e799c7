"""bench/gpu_check.py (make gpu-check) runs where CI has no GPU: on CPU, a few steps each, the
same code paths: every row's timing and resume check, and the 2-process DDP run over gloo."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def gpu_check():
    """The script as a module its DDP processes can import too (spawn passes sys.path on)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    return importlib.import_module("gpu_check")


def test_gpu_check_trains_resumes_and_runs_ddp_on_cpu(tmp_path, capsys):
    out = tmp_path / "table.md"
    args = ["--device", "cpu", "--steps", "5", "--batch", "4", "--resolution", "16",
            "--families", "progan,codec,srgan", "--ddp", "gloo", "--out", str(out)]  # fmt: skip
    assert gpu_check().main(args) == 0
    table = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line[:2] == "| "}
    assert set(rows) == {"family", "progan", "codec", "srgan"}
    for name in ("progan", "codec", "srgan"):
        cells = [c.strip() for c in rows[name].split("|")[1:-1]]
        assert cells[-1] == "ok" and cells[-2].startswith("bit-identical"), cells
        assert float(cells[1]) > 0 and float(cells[2]) > 0  # images/s with AMP and fp32
    assert rows["progan"].split("|")[7].strip() == "16"  # grown to the top resolution
    assert "DDP, 2 processes (gloo), cgan:" in table and "identical after training: yes" in table
    assert table in capsys.readouterr().out


def test_gpu_check_refuses_unknown_families_and_a_missing_device(capsys):
    module = gpu_check()
    assert module.main(["--device", "cpu", "--families", "dcgan,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert module.main([]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    else:
        pytest.skip("a CUDA device is here")
