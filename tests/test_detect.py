"""Detection of generated images (gm.detect, pipelines.detect, gm detect): a detector must catch
what differs from the real images and must not claim to catch what does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gm.config import yaml_load
from gm.errors import ConfigError, DataError
from tests.conftest import REPO


def _real_train(ds, resolution: int) -> torch.Tensor:
    """Real train images of a level, (N, 1, r, r) in [-1, 1]."""
    from gm.data.parquet import level_path
    from gm.data.readers import to_unit_range
    from gm.data.rowstore import RowStore

    store = RowStore(level_path(ds, resolution), ("image",), split="train")
    return torch.cat([to_unit_range(p) for p, _ in store.batches(None, 1000)])


def _models(ds) -> dict[str, torch.Tensor]:
    """Three "models" whose truth is known: uniform noise (trivially detectable), copies of
    real train images at 16x16 and at 8x8 (indistinguishable from real images)."""
    g = torch.Generator().manual_seed(1)
    real16, real8 = _real_train(ds, 16), _real_train(ds, 8)
    return {
        "noise": torch.rand(500, 1, 16, 16, generator=g) * 2 - 1,
        "copy": real16[torch.randperm(len(real16), generator=g)[:500]],
        "copy8": real8[torch.randperm(len(real8), generator=g)[:500]],
    }


def _write(folder, ds, run_ids=None) -> dict:
    from gm.detect import write_samples

    files = {}
    for job, x in _models(ds).items():
        files[job] = folder / f"{job}.parquet"
        meta = {"family": job, "step": 7, "mlflow_run_id": (run_ids or {}).get(job, "")}
        write_samples(files[job], x, None, meta)
    return files


@pytest.fixture(scope="module")
def sample_files(digits, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("samples"), digits)


def test_sample_files_round_trip_8_bit_with_their_splits_and_refuse_foreign_files(tmp_path):
    from gm.detect import open_samples, sample_splits, write_samples

    x = torch.linspace(-1, 1, 20 * 3 * 4 * 4).reshape(20, 3, 4, 4)
    labels = torch.arange(20) % 4
    write_samples(tmp_path / "s.parquet", x, labels, {"family": "dcgan", "step": 3})
    s = open_samples(tmp_path / "s.parquet")
    assert {k: len(v) for k, v in s.splits.items()} == {"train": 12, "val": 4, "test": 4}
    assert s.resolution == 4 and s.meta["family"] == "dcgan" and s.meta["step"] == 3
    held = np.flatnonzero(sample_splits(20) == "test")
    test_rows, test_labels = s.splits["test"].take(torch.arange(4))
    expect = ((x[held] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(test_rows["image"], expect)  # 8-bit, exactly
    assert test_labels.tolist() == (labels[held]).tolist()
    # the classes asked for in turn are mixed over the splits, not cut by position
    assert len(set(labels[np.flatnonzero(sample_splits(20) == "train")].tolist())) == 4
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet"):
        open_samples(tmp_path / "junk.parquet")
    with pytest.raises(DataError, match="none.parquet: no such sample file"):
        open_samples(tmp_path / "none.parquet")


def test_auc_calibration_and_perturbations_are_right_on_known_cases():
    from torchmetrics.functional.classification import binary_auroc

    from gm.detect import auroc, balanced_accuracy, binary_metrics, calibrate, downscale, jpeg

    g = torch.Generator().manual_seed(0)
    real = torch.rand(300, generator=g).round(decimals=1)  # ties on purpose
    fake = (torch.rand(200, generator=g) + 0.3).clamp(0, 1).round(decimals=1)
    y = torch.cat([torch.zeros(300), torch.ones(200)]).long()
    assert auroc(real, fake) == pytest.approx(float(binary_auroc(torch.cat([real, fake]), y)))
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9])) == 1.0
    t = calibrate(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.6, 0.7]))
    assert 0.3 < t < 0.6
    assert balanced_accuracy(torch.tensor([0.1, 0.7]), torch.tensor([0.6, 0.9]), t) == 0.75
    m = binary_metrics(real, fake, 0.5, bootstrap=50)
    assert m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"] and 0.5 < m["auc"] < 1
    assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
    px = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=g)
    j = jpeg(px, 75)
    assert j.shape == px.shape and j.dtype == torch.uint8 and not torch.equal(j, px)
    gray = jpeg(px[..., :1], 75)
    assert gray.shape == (3, 16, 16, 1)
    d = downscale(px, 0.5)
    assert d.shape == (3, 8, 8, 3) and d.dtype == torch.uint8


def test_the_detector_catches_noise_and_cannot_tell_copies_of_real_images(digits, sample_files):
    from gm.detect import DetectConfig, run_detection

    cfg = DetectConfig(dataset="digits", steps=150, bootstrap=50)
    net, report, curves = run_detection(digits, sample_files, 16, cfg, progress=False)
    rows = report["models"]
    noise, copy, copy8 = rows["noise"], rows["copy"], rows["copy8"]
    assert noise["auc"] > 0.98 and noise["accuracy"] > 0.9 and noise["ap"] > 0.95
    for r in (copy, copy8):  # real images presented as samples: no better than chance
        assert r["auc"] < 0.7 and r["accuracy"] < 0.7, r
    assert copy8["resolution"] == 8 and noise["resolution"] == 16
    assert noise["n_generated"] == 100 and noise["n_real"] == copy["n_real"] > 100
    for key in ("auc_jpeg75", "auc_resize0.5", "auc_loo", "accuracy_loo", "ap_jpeg75"):
        assert key in noise
    # never shown noise, a detector trained on copies alone cannot flag it as generated
    assert noise["auc_loo"] < noise["auc"]
    assert 0 < report["threshold"] < 1 and report["resolution"] == 16
    assert set(curves) == {"clean", "jpeg75", "resize0.5", "leave-one-family-out"}
    fpr, tpr = curves["clean"]["noise"]
    assert fpr[0] == 0 and tpr[-1] == 1
    # deterministic: the same seed gives the same detector
    cfg = DetectConfig(dataset="digits", steps=150, bootstrap=50, leave_one_out=False)
    again, report2, _ = run_detection(digits, sample_files, 16, cfg, progress=False)
    assert torch.equal(net.head.weight, again.head.weight)
    assert report2["models"]["noise"]["auc"] == noise["auc"]


def test_too_few_held_out_samples_are_unavailable_not_a_number(digits, sample_files, tmp_path):
    from gm.detect import DetectConfig, run_detection, write_samples

    write_samples(tmp_path / "few.parquet", torch.rand(30, 1, 16, 16) * 2 - 1, None,
                  {"family": "few"})  # fmt: skip
    files = {"noise": sample_files["noise"], "few": tmp_path / "few.parquet"}
    cfg = DetectConfig(dataset="digits", steps=20, leave_one_out=False, bootstrap=0)
    _, report, _ = run_detection(digits, files, 16, cfg, progress=False)
    few = report["models"]["few"]
    assert "auc" not in few and "6 held-out samples" in few["unavailable"]
    assert "auc" in report["models"]["noise"]


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"dataset": "nosuch"}, "detect.d.dataset: 'nosuch' is not a key of datasets"),
        ({"dataset": "photos"}, "detect.d.dataset: no job of train samples photos"),
        ({"dataset": "digits", "jpeg_quality": 0}, "detect.d.jpeg_quality: 0 not in"),
        ({"dataset": "digits", "resize": 1.5}, "detect.d.resize: 1.5 not in"),
        ({"dataset": "digits", "stepz": 3}, "stepz"),
    ],
)
def test_bad_detect_settings_are_refused_naming_the_key(edit, match):
    from gm import params

    p = yaml_load((REPO / "params.yaml").read_text())
    p["detect"] = {"d": edit}
    with pytest.raises(ConfigError, match=match):
        params.parse(p)


def _stage_params(tmp_path, steps: int = 60):
    p = yaml_load((REPO / "params.yaml").read_text())
    base = p["train"]["cvae"]
    p["train"] = {job: dict(base) for job in ("noise", "copy", "copy8")}
    p["tune"], p["rd"] = {}, {}  # their jobs are gone
    p["detect"] = {"digits": {"dataset": "digits", "steps": steps, "bootstrap": 20}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_the_detect_stage_writes_detector_report_plot_and_logs_to_each_models_run(
    digits, sample_files, tmp_path, monkeypatch, capsys
):
    from mlflow import MlflowClient

    from gm.detect import load_detector
    from pipelines import detect as stage
    from pipelines.summary import detection_table, merge_detection

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("gm-detect-test", artifact_location=(tmp_path / "a").as_uri())
    runs = {job: client.create_run(exp).info.run_id for job in ("noise", "copy", "copy8")}
    samples = tmp_path / "samples"
    samples.mkdir()
    _write(samples, digits, runs)  # each model's samples name its training run
    out, report = tmp_path / "models/detectors/digits", tmp_path / "reports/detect/digits"
    argv = ["--params", str(_stage_params(tmp_path)), "--name", "digits", "--dataset",
            str(digits), "--samples", str(samples), "--out", str(out), "--report",
            str(report), "--quiet"]  # fmt: skip
    assert stage.main(argv) == 0
    doc = json.loads(report.with_suffix(".json").read_text())
    assert set(doc["models"]) == {"noise", "copy", "copy8"} and doc["dataset"] == "digits"
    assert doc["models"]["noise"]["auc"] > doc["models"]["copy"]["auc"]
    assert Image.open(report.with_suffix(".png")).size[0] > 800  # four ROC panels
    net, info = load_detector(out / "detector.pt")
    assert info["threshold"] == doc["threshold"]
    assert sorted(info["models"]) == ["copy", "copy8", "noise"]
    m = client.get_run(runs["noise"]).data
    assert m.metrics["detect/auc"] == pytest.approx(doc["models"]["noise"]["auc"])
    assert "detect/auc_jpeg75" in m.metrics and "detect/auc_loo" in m.metrics
    assert m.tags["detect.detector_sha256"] == doc["detector_sha256"]
    assert "noise" in capsys.readouterr().out
    # the summary's detectability table
    evals = [{"name": j, "family": j, "dataset": "digits", "step": 7} for j in runs]
    merge_detection(evals, [doc])
    md = detection_table(evals, [doc])
    assert "| digits | noise | noise | " in md and "AUC after jpeg75" in md
    assert evals[0]["detect_auc"] == doc["models"]["noise"]["auc"]


def test_a_missing_sample_file_fails_the_stage_naming_it_with_no_output(
    digits, sample_files, tmp_path, capsys
):
    from pipelines import detect as stage

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "noise.parquet").write_bytes(sample_files["noise"].read_bytes())
    out, report = tmp_path / "det", tmp_path / "rep/digits"
    argv = ["--params", str(_stage_params(tmp_path)), "--name", "digits", "--dataset",
            str(digits), "--samples", str(samples), "--out", str(out), "--report",
            str(report), "--quiet"]  # fmt: skip
    assert stage.main(argv) != 0
    assert "copy.parquet: no such sample file" in capsys.readouterr().err
    assert not out.exists() and not report.parent.exists()


def test_gm_detect_scores_files_and_folders_and_lists_unreadable_ones(
    digits, sample_files, tmp_path, capsys
):
    from gm.cli import main
    from gm.detect import DetectConfig, run_detection, save_detector

    cfg = DetectConfig(dataset="digits", steps=150, leave_one_out=False, bootstrap=0)
    files = {k: sample_files[k] for k in ("noise", "copy")}
    net, report, _ = run_detection(digits, files, 16, cfg, progress=False)
    info = {"resolution": 16, "channels": 1, "threshold": report["threshold"],
            "dataset": "digits", "models": ["noise", "copy"]}  # fmt: skip
    save_detector(tmp_path / "d.pt", net, cfg, info)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # noise, at another size: resized to the detector's
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(imgs / f"n{i}.png")
    real = _real_train(digits, 16)[:3]
    for i, x in enumerate(real):
        a = ((x[0] + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(a).save(tmp_path / f"real{i}.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG broken")
    argv = ["detect", str(imgs), *(str(tmp_path / f"real{i}.png") for i in range(3)),
            "--model", str(tmp_path / "d.pt"), "--json"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    p = {r["file"].rsplit("/", 1)[-1]: r for r in doc["images"]}
    assert len(p) == 6
    assert all(p[f"n{i}.png"]["verdict"] == "generated" for i in range(3))
    assert sum(p[f"real{i}.png"]["verdict"] == "real" for i in range(3)) >= 2
    assert doc["unreadable"][0]["file"].endswith("broken.png")
    assert "broken.png" in out.err
    assert main(["detect", str(imgs / "broken.png"), "--model", str(tmp_path / "d.pt")]) == 1
    assert main(["detect", str(tmp_path / "nothing"), "--model", str(tmp_path / "d.pt")]) != 0
    assert "nothing: no such file or folder" in capsys.readouterr().err
    assert main(["detect", str(imgs), "--model", str(tmp_path / "real0.png")]) != 0
    assert "real0.png: not a readable detector" in capsys.readouterr().err
