from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gm.data.config import DatasetConfig, SplitConfig
from gm.data.parquet import read_metadata
from gm.data.prepare import prepare_dataset
from gm.data.pyramid import box_down, build_pyramid, nearest_up
from gm.data.readers import load_level, read_table
from gm.data.splits import assign_split, unit_hash
from gm.errors import DataError
from gm.io import atomic_dir, atomic_files

from .conftest import random_rgb, save

CFG = DatasetConfig(top_resolution=32)


def test_box_down_is_the_mean_of_each_block(rng):
    x = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    y = box_down(x)
    ref = x.astype(np.float64).reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    assert y.dtype == np.float32 and np.array_equal(y, ref.astype(np.float32))
    assert np.array_equal(box_down(nearest_up(y)), y)


def test_stored_levels_are_exact_box_filters_of_the_level_above(raw_folder, tmp_path):
    m = prepare_dataset(raw_folder, tmp_path / "ds", CFG, progress=False)
    assert m["resolutions"] == [4, 8, 16, 32]
    levels = {r: load_level(tmp_path / "ds", r)[0] for r in m["resolutions"]}
    assert levels[32].dtype == np.uint8
    for r in (4, 8, 16):
        assert levels[r].dtype == np.float32
        assert np.array_equal(levels[r], box_down(levels[2 * r])), r
        # and against a float64 mean over the whole block of the top level
        f = 32 // r
        ref = levels[32].astype(np.float64).reshape(-1, r, f, r, f, 3).mean(axis=(2, 4))
        assert np.array_equal(levels[r].astype(np.float64), ref)


def test_pyramid_of_odd_sizes_is_refused():
    with pytest.raises(ValueError, match="even"):
        box_down(np.zeros((1, 3, 4, 1), np.uint8))
    assert sorted(build_pyramid(np.zeros((1, 16, 16, 1), np.uint8))) == [4, 8, 16]


def test_manifest_and_schema(raw_folder, tmp_path):
    m = prepare_dataset(raw_folder, tmp_path / "ds", CFG, name="toy", progress=False)
    on_disk = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert on_disk == m
    assert m["classes"] == ["cats", "dogs", "owls"] and m["num_images"] == 30
    assert {c: sum(m["counts"][s][c] for s in m["counts"]) for c in m["classes"]} == {
        "cats": 12,
        "dogs": 10,
        "owls": 8,
    }
    table = pq.read_table(tmp_path / "ds" / "32x32.parquet")
    assert table.column_names == ["id", "source", "label", "label_name", "split", "image"]
    ids = table.column("id").to_pylist()
    assert ids == sorted(ids) and ids[0] == "cats/000.png"
    meta = read_metadata(tmp_path / "ds" / "8x8.parquet")
    assert meta["resolution"] == 8 and meta["classes"] == m["classes"]
    # mean/std in [0, 1] of the train split's top level
    px, _ = load_level(tmp_path / "ds", 32, "train")
    assert np.allclose(m["mean"], (px / 255.0).reshape(-1, 3).mean(0), atol=1e-6)
    assert (tmp_path / "ds" / "preview.png").is_file()


def test_output_bytes_are_deterministic(raw_folder, tmp_path):
    a = prepare_dataset(raw_folder, tmp_path / "a", CFG, progress=False)
    b = prepare_dataset(raw_folder, tmp_path / "b", CFG, progress=False)
    assert a["content_hash"] == b["content_hash"]
    assert {k: v["sha256"] for k, v in a["files"].items()} == {
        k: v["sha256"] for k, v in b["files"].items()
    }


def test_content_hash_changes_with_one_pixel(raw_folder, tmp_path):
    a = prepare_dataset(raw_folder, tmp_path / "a", CFG, progress=False)
    img = np.asarray(Image.open(raw_folder / "dogs" / "003.png")).copy()
    img[0, 0, 0] ^= 1
    save(raw_folder / "dogs" / "003.png", img)
    b = prepare_dataset(raw_folder, tmp_path / "b", CFG, progress=False)
    assert a["content_hash"] != b["content_hash"]


def test_adding_images_never_moves_existing_ones(raw_folder, tmp_path, rng):
    prepare_dataset(raw_folder, tmp_path / "a", CFG, progress=False)
    before = read_table(tmp_path / "a" / "32x32.parquet", None)
    for i in range(40):
        save(raw_folder / "cats" / f"new{i:03d}.png", random_rgb(rng, 32))
    save(raw_folder / "bats" / "0.png", random_rgb(rng, 32))  # a new class too
    prepare_dataset(raw_folder, tmp_path / "b", CFG, progress=False)
    after = read_table(tmp_path / "b" / "32x32.parquet", None)
    old = dict(zip(before.column("id").to_pylist(), before.column("split").to_pylist()))
    new = dict(zip(after.column("id").to_pylist(), after.column("split").to_pylist()))
    assert len(new) == len(old) + 41
    assert all(new[k] == v for k, v in old.items())


def test_split_fractions_and_stability():
    keys = [f"img{i}.png" for i in range(20000)]
    cfg = SplitConfig(train=0.7, val=0.2, test=0.1)
    splits = [assign_split(k, cfg) for k in keys]
    for name, frac in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
        assert abs(splits.count(name) / len(keys) - frac) < 0.015
    # The mapping is part of the data contract: a change would reshuffle every user's splits.
    digest = hashlib.sha256(b"gm-split\0cats/000.png").digest()
    assert unit_hash("cats/000.png") == int.from_bytes(digest[:8], "big") / 2**64
    assert assign_split("x", SplitConfig(train=1.0, val=0.0, test=0.0)) == "train"


def test_tiles_of_one_source_share_a_split(tmp_path, rng):
    for i in range(6):
        save(tmp_path / "raw" / f"photo{i}.png", random_rgb(rng, 40, 72))
    cfg = DatasetConfig(
        top_resolution=16,
        fit="tile",
        split_by="source",
        split=SplitConfig(train=0.5, val=0.25, test=0.25),
    )
    prepare_dataset(tmp_path / "raw", tmp_path / "ds", cfg, progress=False)
    t = read_table(tmp_path / "ds" / "16x16.parquet", None)
    assert t.num_rows == 6 * 2 * 4
    by_source = {}
    for src, split in zip(t.column("source").to_pylist(), t.column("split").to_pylist()):
        by_source.setdefault(src, set()).add(split)
    assert all(len(s) == 1 for s in by_source.values())
    assert t.column("label_name").to_pylist()[0] == "raw"  # no class folders: one class


def test_parquet_input(tmp_path, rng):
    imgs = []
    for _ in range(5):
        buf = io.BytesIO()
        Image.fromarray(random_rgb(rng, 8)).save(buf, format="PNG")
        imgs.append(buf.getvalue())
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(
        pa.table({"image": imgs, "label": ["a", "b", "a", "b", "b"]}), raw / "part.parquet"
    )
    m = prepare_dataset(raw, tmp_path / "ds", DatasetConfig(top_resolution=8), progress=False)
    assert m["classes"] == ["a", "b"] and m["num_images"] == 5
    px, labels = load_level(tmp_path / "ds", 8)
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 1]
    pq.write_table(pa.table({"pixels": imgs}), raw / "part.parquet")
    with pytest.raises(DataError, match="part.parquet: Parquet input needs an 'image' column"):
        prepare_dataset(raw, tmp_path / "ds2", DatasetConfig(top_resolution=8), progress=False)


def test_atomic_dir_keeps_the_previous_output_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a writer killed with SIGKILL leaves its temporary; the next writer removes it
    (tmp_path / ".out.tmp-killed").mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "a.txt").read_text() == "new"


def test_atomic_files_replace_outputs_but_keep_what_dvc_keeps_beside_them(tmp_path):
    # The classifier and training stages wrote their folder with atomic_dir, which deleted
    # the .gitignore DVC keeps beside file outputs (git status: deleted .gitignore, untracked
    # classifier.pt after a failed `dvc exp run`).
    out = tmp_path / "models" / "clf"
    out.mkdir(parents=True)
    (out / ".gitignore").write_text("/classifier.pt\n")
    (out / "classifier.pt").write_text("old")
    with atomic_files(out) as tmp:
        (tmp / "classifier.pt").write_text("new")
        (tmp / "metrics.json").write_text("{}")
    assert (out / ".gitignore").read_text() == "/classifier.pt\n"
    assert (out / "classifier.pt").read_text() == "new" and (out / "metrics.json").exists()
    with pytest.raises(RuntimeError), atomic_files(out) as tmp:
        (tmp / "classifier.pt").write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "classifier.pt").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["clf"]  # no temporary left
    with atomic_files(tmp_path / "fresh") as tmp:  # a missing folder is created
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "fresh" / "a.txt").read_text() == "x"
