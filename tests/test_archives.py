"""Raw inputs in archives: StyleGAN dataset zips and WebDataset tar shards."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from gm.cli import main
from gm.data.config import DatasetConfig
from gm.data.prepare import prepare_dataset
from gm.data.readers import load_level
from gm.errors import DataError

from .conftest import random_rgb

CFG = DatasetConfig(top_resolution=8)


def _png(rng) -> tuple[bytes, np.ndarray]:
    px = random_rgb(rng, 8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue(), px


def _rows(ds):
    """{top-level pixels: label name} of a prepared dataset."""
    import pyarrow.parquet as pq

    t = pq.read_table(ds / "8x8.parquet")
    px, _ = load_level(ds, 8)
    return {p.tobytes(): n for p, n in zip(px, t.column("label_name").to_pylist(), strict=True)}


def test_a_stylegan_dataset_zip_prepares_like_class_folders(tmp_path, rng):
    raw = tmp_path / "zipped"
    raw.mkdir()
    folder = tmp_path / "folders"
    labels = []
    with zipfile.ZipFile(raw / "part.zip", "w") as z:
        for i in range(24):
            data, _ = _png(rng)
            name = f"{i // 10:05d}/img{i:08d}.png"
            z.writestr(name, data)
            labels.append([name, i % 3])
            (folder / str(i % 3)).mkdir(parents=True, exist_ok=True)
            (folder / str(i % 3) / f"{i}.png").write_bytes(data)
        z.writestr("00009/broken.png", b"not a png")  # a bad entry: skipped, listed
        z.writestr("00009/notes.txt", b"hello")
        z.writestr("00009/nolabel.png", _png(rng)[0])
        labels.append(["00009/broken.png", 0])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    m = prepare_dataset(raw, tmp_path / "a", CFG, progress=False)
    assert m["classes"] == ["0", "1", "2"] and m["num_images"] == 24
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons["part.zip/00009/notes.txt"] == "not an image file"
    assert reasons["part.zip/00009/nolabel.png"] == "no label in dataset.json"
    assert "part.zip/00009/broken.png" in reasons
    ref = prepare_dataset(folder, tmp_path / "b", CFG, progress=False)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")  # the same images, the same classes
    assert ref["num_images"] == 24  # (splits differ: they hash the ids, which differ)
    # on_invalid: error stops at the bad entry, naming it inside its archive
    with pytest.raises(DataError, match="part.zip/00009/broken.png: "):
        prepare_dataset(raw, tmp_path / "c", DatasetConfig(top_resolution=8, on_invalid="error"),
                        progress=False)  # fmt: skip
    assert not (tmp_path / "c").exists()


def test_an_unlabelled_zip_is_one_class_and_a_broken_one_is_named(tmp_path, rng):
    path = tmp_path / "faces.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(6):
            z.writestr(f"img{i}.png", _png(rng)[0])
        z.writestr("dataset.json", json.dumps({"labels": None}))
    m = prepare_dataset(path, tmp_path / "ds", CFG, progress=False)
    assert m["dataset"] == "faces" and m["classes"] == ["faces"] and m["num_images"] == 6
    # one member's compressed bytes damaged: that image is skipped with the reason, not a crash
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("img2.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 10 : start + 20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    m = prepare_dataset(path, tmp_path / "ds", CFG, progress=False)
    assert m["num_images"] == 5
    assert [s["path"] for s in m["skipped"]] == ["faces.zip/img2.png"]
    assert "unreadable zip member" in m["skipped"][0]["reason"]
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="faces.zip: not a readable zip archive"):
        prepare_dataset(path, tmp_path / "ds2", CFG, progress=False)


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def test_webdataset_shards_prepare_with_their_cls_labels(tmp_path, rng):
    raw = tmp_path / "shards"
    raw.mkdir()
    expected = {}
    for shard in range(2):
        with tarfile.open(raw / f"train-{shard:04d}.tar", "w") as t:
            for i in range(10):
                data, px = _png(rng)
                key = f"s{shard}/{i:06d}"
                _add(t, f"{key}.png", data)
                _add(t, f"{key}.cls", str(i % 2).encode())
                _add(t, f"{key}.json", b"{}")
                expected[px.tobytes()] = str(i % 2)
            _add(t, "s9/000001.json", b"{}")  # a sample without an image
            _add(t, "s9/000002.png", _png(rng)[0])  # an image without a label
    m = prepare_dataset(raw, tmp_path / "ds", CFG, progress=False, workers=0)
    assert m["classes"] == ["0", "1"] and m["num_images"] == 20
    assert _rows(tmp_path / "ds") == expected
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons["train-0000.tar/s9/000001"] == "no image in the sample (json)"
    assert reasons["train-0001.tar/s9/000002"] == "no cls label in the sample"
    (raw / "train-0001.tar").write_bytes(b"\0" * 100 + b"junk")
    with pytest.raises(DataError, match="train-0001.tar: not a readable"):
        prepare_dataset(raw, tmp_path / "ds2", CFG, progress=False)


def test_data_inspect_reports_an_archive_folder(tmp_path, rng, capsys):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as t:
        for i in range(3):
            _add(t, f"{i:04d}.jpg", _png(rng)[0])
    assert main(["data", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 image files in 1 classes" in out


def test_raw_images_on_s3_prepare_like_a_local_folder(tmp_path, rng, s3_server, monkeypatch,
                                                      capsys):  # fmt: skip
    """s3://bucket/prefix on a real S3-protocol server (moto, loopback): the same ids, so the
    same bytes as the same images in a local folder; bad objects follow the folder policies."""
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    s3, local = s3_server["client"], tmp_path / "toy"
    for cls, n in (("a", 5), ("b", 4)):
        for i in range(n):
            data, _ = _png(rng)
            s3.put_object(Bucket="gm-test", Key=f"raw/toy/{cls}/{i}.png", Body=data)
            (local / cls).mkdir(parents=True, exist_ok=True)
            (local / cls / f"{i}.png").write_bytes(data)
    s3.put_object(Bucket="gm-test", Key="raw/toy/a/readme.txt", Body=b"hi")
    s3.put_object(Bucket="gm-test", Key="raw/toy/b/bad.png", Body=b"not a png")
    m = prepare_dataset("s3://gm-test/raw/toy", tmp_path / "s3ds", CFG, progress=False)
    ref = prepare_dataset(local, tmp_path / "localds", CFG, progress=False)
    assert m["dataset"] == "toy" and m["classes"] == ["a", "b"] and m["num_images"] == 9
    assert m["content_hash"] == ref["content_hash"]
    assert {k: v["sha256"] for k, v in m["files"].items()} == {
        k: v["sha256"] for k, v in ref["files"].items()
    }
    assert {s["path"] for s in m["skipped"]} == {"a/readme.txt", "b/bad.png"}
    assert main(["data", "inspect", "s3://gm-test/raw/toy"]) == 0
    assert "10 image files in 2 classes" in capsys.readouterr().out
    with pytest.raises(DataError, match="s3://gm-test/raw/none: no such prefix"):
        prepare_dataset("s3://gm-test/raw/none", tmp_path / "x", CFG, progress=False)
