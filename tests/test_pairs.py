from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gm.data.config import DatasetConfig, DegradationConfig, PairConfig
from gm.data.pairs import build_pairs, degrade, render_domain_a
from gm.data.prepare import prepare_dataset
from gm.data.readers import PairedDataset, read_images, read_table
from gm.errors import DataError

from .conftest import save


@pytest.fixture
def smooth_dataset(tmp_path, rng):
    """Smooth random images (low-pass noise), so that pair alignment is measurable."""
    raw = tmp_path / "raw"
    for cls in ("a", "b"):
        for i in range(10):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC))
            save(raw / cls / f"{i}.png", img)
    prepare_dataset(raw, tmp_path / "pyr", DatasetConfig(top_resolution=32), progress=False)
    return tmp_path / "pyr"


def test_super_resolution_pairs_shapes_and_alignment(smooth_dataset, tmp_path):
    cfg = PairConfig(kind="super_resolution", dataset="toy", resolution=32, scales=(2, 4))
    m = build_pairs(smooth_dataset, tmp_path / "sr", cfg)
    assert set(m["files"]) == {"x2.parquet", "x4.parquet"}
    for s in (2, 4):
        t = read_table(tmp_path / "sr" / f"x{s}.parquet", None)
        hr, lr = read_images(t, "hr"), read_images(t, "lr")
        assert hr.shape == (20, 32, 32, 3) and lr.shape == (20, 32 // s, 32 // s, 3)
        # no extra degradation: LR is exactly PIL's antialiased bicubic of HR
        ref = np.asarray(Image.fromarray(hr[0]).resize((32 // s,) * 2, Image.Resampling.BICUBIC))
        assert np.array_equal(lr[0], ref)
        # alignment: upsampled LR matches HR best at zero shift
        up = np.stack(
            [np.asarray(Image.fromarray(x).resize((32, 32), Image.Resampling.BICUBIC)) for x in lr]
        ).astype(np.float32)
        err = {}
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-2, -1, 0, 1, 2):
                shifted = np.roll(up, (dy, dx), axis=(1, 2))[:, 4:-4, 4:-4]
                err[(dy, dx)] = float(((shifted - hr[:, 4:-4, 4:-4]) ** 2).mean())
        assert min(err, key=err.get) == (0, 0)
    ds = PairedDataset(tmp_path / "sr" / "x4.parquet", ("lr", "hr"), "train")
    lr_t, hr_t, label = ds[0]
    assert lr_t.shape == (3, 8, 8) and hr_t.shape == (3, 32, 32)
    assert -1.0 <= float(lr_t.min()) and float(hr_t.max()) <= 1.0
    with pytest.raises(DataError, match=r"x4.parquet: no column 'a' \(has id, label"):
        PairedDataset(tmp_path / "sr" / "x4.parquet", ("a", "b"), "train")


def test_degradation_is_seeded_per_image():
    hr = np.full((16, 16, 3), 128, np.uint8)
    cfg = DegradationConfig(noise_sigma=5.0, blur_sigma=1.0, jpeg_quality=50, seed=1)
    a1, a2 = degrade(hr, 2, cfg, "a"), degrade(hr, 2, cfg, "a")
    b = degrade(hr, 2, cfg, "b")
    assert a1.shape == (8, 8, 3)
    assert np.array_equal(a1, a2) and not np.array_equal(a1, b)
    clean = degrade(hr, 2, DegradationConfig(), "a")
    assert (clean == 128).all()


def test_translation_pairs_aligned_and_unpaired(smooth_dataset, tmp_path):
    cfg = PairConfig(kind="translation", dataset="toy", resolution=32, domain_a="lineart")
    m = build_pairs(smooth_dataset, tmp_path / "tr", cfg)
    t = read_table(tmp_path / "tr" / "aligned.parquet", None)
    a, b = read_images(t, "a"), read_images(t, "b")
    assert a.shape == b.shape
    assert set(np.unique(a).tolist()) <= {0, 255}
    assert np.array_equal(a, render_domain_a(b, "lineart", cfg.lineart_threshold))
    u = read_table(tmp_path / "tr" / "unpaired.parquet", None)
    ids, dom = u.column("id").to_pylist(), u.column("domain").to_pylist()
    ids_a = {i for i, d in zip(ids, dom) if d == "A"}
    ids_b = {i for i, d in zip(ids, dom) if d == "B"}
    assert ids_a and ids_b and not ids_a & ids_b  # no image on both sides
    assert set(u.column("split").to_pylist()) == {"train"}
    train = {
        i for i, s in zip(t.column("id").to_pylist(), t.column("split").to_pylist()) if s == "train"
    }
    assert ids_a | ids_b == train
    assert m["files"]["unpaired.parquet"]["counts"] == {"A": len(ids_a), "B": len(ids_b)}
    # the A side of the unpaired table really is domain A (line-art of that id)
    row = ids.index(sorted(ids_a)[0])
    img = read_images(u)[row]
    assert np.array_equal(img, a[t.column("id").to_pylist().index(ids[row])])
    gray = render_domain_a(b, "grayscale", 0.25)
    assert (gray[..., 0] == gray[..., 1]).all()


def test_a_class_with_no_train_image_is_refused_when_prepared(tmp_path, rng):
    raw = tmp_path / "raw"
    for i in range(30):
        save(raw / "common" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    # one image only: find an id that hashes into val/test so "rare" has no train image
    from gm.data.config import SplitConfig
    from gm.data.splits import assign_split

    name = next(
        f"{i}.png" for i in range(100) if assign_split(f"rare/{i}.png", SplitConfig()) != "train"
    )
    save(raw / "rare" / name, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    # Refused when the dataset is prepared, before any pairs or model: nothing is written.
    with pytest.raises(DataError, match=r"raw/rare: class has no image in the train split"):
        prepare_dataset(raw, tmp_path / "pyr", DatasetConfig(top_resolution=8), progress=False)
    assert not (tmp_path / "pyr").exists()


def test_pairs_need_the_top_level(smooth_dataset, tmp_path):
    cfg = PairConfig(kind="conditional", dataset="toy", resolution=16)
    with pytest.raises(DataError, match="16x16.parquet: level 16 is not the dataset's top level"):
        build_pairs(smooth_dataset, tmp_path / "c", cfg)
    cfg = PairConfig(kind="conditional", dataset="toy", resolution=64)
    with pytest.raises(DataError, match="no level 64x64"):
        build_pairs(smooth_dataset, tmp_path / "c", cfg)


@pytest.mark.parametrize("kind", ["super_resolution", "translation", "conditional"])
def test_pairs_stream_the_top_level_and_the_bytes_do_not_depend_on_the_batches(
    smooth_dataset, tmp_path, monkeypatch, kind
):
    """Read a batch of 5 rows at a time (memory bounded by a batch) or all at once: the same
    files, byte for byte; unpaired.parquet keeps its A half, then its B half."""
    import hashlib

    import gm.data.pairs as pairs

    cfg = PairConfig(kind=kind, dataset="toy", resolution=32)
    whole = build_pairs(smooth_dataset, tmp_path / "whole", cfg)
    monkeypatch.setattr(pairs, "BATCH_BYTES", 5 * 32 * 32 * 3)
    small = build_pairs(smooth_dataset, tmp_path / "small", cfg)
    assert whole["files"] == small["files"]
    for f in whole["files"]:
        digest = [
            hashlib.sha256((tmp_path / d / f).read_bytes()).digest() for d in ("whole", "small")
        ]
        assert digest[0] == digest[1], f
    if kind == "translation":
        domains = read_table(tmp_path / "small" / "unpaired.parquet", None).column("domain")
        d = domains.to_pylist()
        assert d == sorted(d) and set(d) == {"A", "B"}  # all A rows, then all B rows
