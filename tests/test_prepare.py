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
from gm.data.prepare import prepare_dataset, row_order_key
from gm.data.pyramid import box_down, build_pyramid, nearest_up
from gm.data.readers import load_level, read_table
from gm.data.splits import assign_split, unit_hash
from gm.errors import ConfigError, DataError
from gm.io import atomic_dir, atomic_files

from .conftest import random_rgb, save

CFG = DatasetConfig(top_resolution=32)


def _rounded_box(x: np.ndarray) -> np.ndarray:
    """The reference: float64 mean of each 2x2 block, rounded half to even (np.rint)."""
    n, h, w, c = x.shape
    return np.rint(x.astype(np.float64).reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)))


def test_box_down_is_the_rounded_mean_of_each_block(rng):
    x = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    y = box_down(x)
    assert y.dtype == np.uint8 and np.array_equal(y, _rounded_box(x))
    assert np.array_equal(box_down(nearest_up(y)), y)
    # every remainder mod 4, ties to the even neighbour: 1.5 → 2, 2.5 → 2, 0.25 → 0, 0.75 → 1
    blocks = np.asarray([[1, 2, 1, 2], [2, 3, 2, 3], [0, 0, 0, 1], [0, 1, 1, 1], [255] * 4])
    x = blocks.reshape(5, 2, 2, 1).astype(np.uint8)
    assert box_down(x).ravel().tolist() == [2, 2, 0, 1, 255]
    with pytest.raises(TypeError, match="uint8"):
        box_down(x.astype(np.float32))


def test_rounding_does_not_drift_down_the_levels(rng):
    """Halves to even: a 64x64 noise image's 4x4 level stays within 0.1 grey level of the
    exact float mean on average (halves up would drift by about +1/8 per level)."""
    x = rng.integers(0, 256, (64, 64, 64, 1)).astype(np.uint8)
    levels = build_pyramid(x)
    exact = x.astype(np.float64).reshape(64, 4, 16, 4, 16, 1).mean(axis=(2, 4))
    assert abs(float((levels[4] - exact).mean())) < 0.1


def test_stored_levels_are_box_filters_of_the_level_above(raw_folder, tmp_path):
    m = prepare_dataset(raw_folder, tmp_path / "ds", CFG, progress=False)
    assert m["resolutions"] == [4, 8, 16, 32]
    levels = {r: load_level(tmp_path / "ds", r)[0] for r in m["resolutions"]}
    for r in (4, 8, 16):
        assert levels[r].dtype == np.uint8
        assert np.array_equal(levels[r], _rounded_box(levels[2 * r])), r
    # the whole pyramid is 4/3 of the top level's pixel bytes (goal: at most 1.45)
    total = sum(v.nbytes for v in levels.values())
    assert total / levels[32].nbytes == pytest.approx(1 + 1 / 4 + 1 / 16 + 1 / 64)
    assert all(f["dtype"] == "uint8" for f in m["files"].values())


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
    # the fixed pseudo-random row order: by the hash of each id, the same in every level
    assert ids == sorted(ids, key=row_order_key) and ids != sorted(ids)
    assert pq.read_table(tmp_path / "ds" / "4x4.parquet").column("id").to_pylist() == ids
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


def test_block_split_keeps_each_group_of_neighbouring_tiles_in_one_split(tmp_path, rng):
    # 2 photos of 5x7 tiles (16 px), blocks of 2x2 tiles: 3x4 blocks each, edge blocks partial
    for i in range(2):
        save(tmp_path / "raw" / f"photo{i}.png", random_rgb(rng, 5 * 16 + 3, 7 * 16 + 5))
    cfg = DatasetConfig(
        top_resolution=16,
        fit="tile",
        split_by="block",
        split_block=2,
        split=SplitConfig(train=0.5, val=0.25, test=0.25),
    )
    prepare_dataset(tmp_path / "raw", tmp_path / "ds", cfg, progress=False)
    t = read_table(tmp_path / "ds" / "16x16.parquet", None)
    assert t.num_rows == 2 * 5 * 7
    blocks: dict[tuple, set] = {}
    for id_, split in zip(t.column("id").to_pylist(), t.column("split").to_pylist()):
        src, pos = id_.split("#r")
        r, c = map(int, pos.split("c"))
        blocks.setdefault((src, r // 2, c // 2), set()).add(split)
        assert split == assign_split(f"{src}#b{r // 2}c{c // 2}", cfg.split)
    assert len(blocks) == 2 * 3 * 4 and all(len(s) == 1 for s in blocks.values())
    # the blocks of one photo do not all share a split (that would be split_by: source)
    assert all(len(set().union(*(s for k, s in blocks.items() if k[0] == src))) > 1
               for src in ("photo0.png", "photo1.png"))  # fmt: skip
    with pytest.raises(ConfigError, match="split_by.*fit: tile"):
        DatasetConfig(fit="center_crop", split_by="block")
    with pytest.raises(ConfigError, match="split_block"):
        DatasetConfig(fit="tile", split_by="block", split_block=0)


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


# --- streaming prepare: Ray Data workers, row groups in bytes, kills, bounded batches ------


def _files(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_ray_workers_write_the_same_bytes_as_this_process(raw_folder, tmp_path, ray_local,
                                                          monkeypatch):  # fmt: skip
    """0 (in process), 1 and 2 Ray Data tasks at a time, in batches of 4 inputs (8 tasks):
    identical Parquet files, manifest and preview."""
    import gm.data.parquet as parquet
    import gm.data.prepare as prep

    monkeypatch.setattr(prep, "MAX_BATCH", 4)
    # many pages per row group: page boundaries must not follow how the rows were batched
    monkeypatch.setattr(parquet, "DATA_PAGE_BYTES", 5000)
    save(raw_folder / "dogs" / "bad.png", np.zeros(3, np.uint8))  # not decodable: skipped
    out = {}
    for w in (0, 1, 2):
        prepare_dataset(raw_folder, tmp_path / f"w{w}", CFG, progress=False, workers=w)
        out[w] = _files(tmp_path / f"w{w}")
    assert out[0] == out[1] == out[2]
    monkeypatch.setattr(prep, "MAX_BATCH", 7)  # other batches, the same bytes
    prepare_dataset(raw_folder, tmp_path / "b7", CFG, progress=False, workers=0)
    assert _files(tmp_path / "b7") == out[0]
    m = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert m["num_images"] == 30 and [s["path"] for s in m["skipped"]] == ["dogs/bad.png"]


def test_a_refused_input_stops_ray_workers_naming_it(raw_folder, tmp_path, ray_local):
    (raw_folder / "owls" / "004.png").write_bytes(b"not a png")
    cfg = DatasetConfig(top_resolution=32, on_invalid="error")
    with pytest.raises(DataError, match="owls/004.png: "):
        prepare_dataset(raw_folder, tmp_path / "ds", cfg, progress=False, workers=2)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.tmp-*"))


def test_row_groups_are_sized_in_bytes(raw_folder, tmp_path, monkeypatch):
    import gm.data.parquet as parquet

    assert parquet.row_group_rows(1024 * 1024 * 3) == 21  # 64 MiB of 1024x1024 RGB rows
    assert parquet.row_group_rows(32 * 32 * 3) == 21845
    assert parquet.row_group_rows(4 * 4 * 1) == 65536 and parquet.row_group_rows(1 << 30) == 1
    # lower levels take the top level's rows per group, at least 1 MiB of them
    assert parquet.row_group_rows(512 * 512 * 3, top_rows=21) == 21
    assert parquet.row_group_rows(8 * 8 * 3, top_rows=21) == 5461
    base = prepare_dataset(raw_folder, tmp_path / "a", CFG, progress=False)
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", 32 * 32 * 3 * 7)  # 7 rows of 32x32 RGB
    monkeypatch.setattr(parquet, "MIN_ROW_GROUP_BYTES", 16 * 16 * 3 * 7)  # 7 rows of 16x16
    small = prepare_dataset(raw_folder, tmp_path / "b", CFG, progress=False)
    f = pq.ParquetFile(tmp_path / "b" / "32x32.parquet")
    assert [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)] == [7] * 4 + [2]
    assert pq.ParquetFile(tmp_path / "b" / "4x4.parquet").num_row_groups == 1  # 112 rows min
    f = pq.ParquetFile(tmp_path / "b" / "16x16.parquet")  # the top level's 7 rows per group
    assert [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)] == [7] * 4 + [2]
    assert small["content_hash"] == base["content_hash"]  # same rows, other groups
    for r in (4, 32):
        assert np.array_equal(load_level(tmp_path / "a", r)[0], load_level(tmp_path / "b", r)[0])


def test_dropped_classes_relabel_every_level(tmp_path, rng):
    raw = tmp_path / "raw"
    for cls in ("a", "c"):
        for i in range(6):
            save(raw / cls / f"{i}.png", random_rgb(rng, 8))
    (raw / "b").mkdir()
    cfg = DatasetConfig(top_resolution=8, empty_class="drop", split=SplitConfig(1.0, 0.0, 0.0))
    prepare_dataset(raw, tmp_path / "out", cfg, progress=False)
    for r in (4, 8):
        t = pq.read_table(tmp_path / "out" / f"{r}x{r}.parquet")
        pairs = set(zip(t.column("label").to_pylist(), t.column("label_name").to_pylist()))
        assert pairs == {(0, "a"), (1, "c")}
        assert read_metadata(tmp_path / "out" / f"{r}x{r}.parquet")["classes"] == ["a", "c"]


def test_a_null_image_in_parquet_input_is_named(tmp_path, rng):
    buf = io.BytesIO()
    Image.fromarray(random_rgb(rng, 8)).save(buf, format="PNG")
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"image": [buf.getvalue(), None]}), raw / "part.parquet")
    with pytest.raises(DataError, match=r"part.parquet: row 1: 'image' must hold encoded"):
        prepare_dataset(raw, tmp_path / "ds", DatasetConfig(top_resolution=8), progress=False)
    assert not (tmp_path / "ds").exists()


_KILLED = """
import sys
import gm.data.parquet
from gm.data.config import DatasetConfig
gm.data.parquet.ROW_GROUP_BYTES = 64 * 64 * 3 * 50  # row groups of 50 rows: written as it goes
from gm.data.prepare import prepare_dataset, row_order_key
prepare_dataset(sys.argv[1], sys.argv[2], DatasetConfig(top_resolution=64), progress=False,
                workers=0)
"""


def test_a_prepare_killed_midway_leaves_the_previous_output(tmp_path, rng):
    """SIGKILL while the levels are being written: the previous dataset is untouched; the next
    prepare removes the killed one's temporary and replaces the output."""
    import signal
    import subprocess
    import sys
    import time

    raw = tmp_path / "raw"
    for i in range(6):
        save(raw / "x" / f"{i:04d}.png", random_rgb(rng, 64))
    out = tmp_path / "ds"
    prepare_dataset(raw, out, DatasetConfig(top_resolution=64), progress=False)
    before = _files(out)
    for i in range(6, 1500):
        save(raw / "x" / f"{i:04d}.png", random_rgb(rng, 64))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(raw), str(out)])
    deadline = time.monotonic() + 60
    # wait until the top level has row groups on disk: the kill lands midway
    while not any(p.stat().st_size > 100_000 for p in tmp_path.glob(".ds.tmp-*/64x64.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended too soon"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _files(out) == before
    assert list(tmp_path.glob(".ds.tmp-*"))  # what the killed writer left
    m = prepare_dataset(raw, out, DatasetConfig(top_resolution=64), progress=False)
    assert m["num_images"] == 1500 and not list(tmp_path.glob(".ds.tmp-*"))


def test_auto_workers_stay_in_process_on_the_local_ray_of_with_ray(monkeypatch):
    # `gm with-ray` exports RAY_ADDRESS of this machine's own Ray and GM_RAY_LOCAL: a small
    # folder is prepared in this process, as without it (Ray Data cost 13 s more on the
    # default's two small datasets); nothing attaches to the address.
    from gm.data.prepare import RAY_MIN_ITEMS, resolve_workers

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens: attaching would fail
    monkeypatch.setenv("GM_RAY_LOCAL", "1")
    assert resolve_workers(None, RAY_MIN_ITEMS - 1) == 0
    assert resolve_workers(3, 10) == 3  # an explicit number is kept
