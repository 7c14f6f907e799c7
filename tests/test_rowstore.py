"""The batch of step k (gm.data.rowstore): permutations, and memory vs streamed reading."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gm.data.parquet as parquet
import gm.data.rowstore as rowstore
from gm.config import from_dict
from gm.data.config import DatasetConfig, PairConfig
from gm.data.pairs import build_pairs
from gm.data.prepare import prepare_dataset
from gm.data.rowstore import EpochOrder, RowStore, shard_positions
from gm.errors import DataError
from gm.registry import families
from gm.train.protocol import DataInfo
from gm.train.ray_train import RunSettings, _batches

from .test_models_contract import TINY

INFO = DataInfo(resolution=16, channels=3, num_classes=3)


def test_epoch_order_is_a_permutation_and_one_window_is_a_plain_shuffle():
    for n, w in ((20, 20), (23, 5), (7, 3), (64, 100)):
        perm = EpochOrder(n, w, seed=3, epoch=2)[torch.arange(n)]
        assert sorted(perm.tolist()) == list(range(n)), (n, w)
    # one window: torch.randperm under the generator of (seed, epoch), as training always did
    g = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    assert torch.equal(EpochOrder(20, 20, 3, 2)[torch.arange(20)], torch.randperm(20, generator=g))
    # windows: the epoch visits each window of 5 positions in one run, in a shuffled order
    perm = EpochOrder(23, 5, 0, 0)[torch.arange(23)]
    windows = (perm // 5).tolist()
    assert sum(a != b for a, b in zip(windows, windows[1:])) == 4
    visited = list(dict.fromkeys(windows))
    assert sorted(visited) == [0, 1, 2, 3, 4] and visited != [0, 1, 2, 3, 4]  # shuffled order
    assert not torch.equal(EpochOrder(23, 5, 0, 1)[torch.arange(23)], perm)  # next epoch


def test_shards_are_disjoint_and_cover_an_epoch_with_windows():
    got = [shard_positions(24, step, 3, rank, 2, seed=0, window=5)
           for step in range(4) for rank in range(2)]  # fmt: skip
    assert sorted(torch.cat(got).tolist()) == list(range(24))
    assert not torch.equal(shard_positions(24, 4, 3, 0, 2, 0, 5), got[0])  # a new epoch


@pytest.fixture
def grouped(raw_folder, tmp_path, monkeypatch):
    """The toy pyramid (16x16) written in row groups of 3 rows at every level."""
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", 16 * 16 * 3 * 3)
    monkeypatch.setattr(parquet, "MIN_ROW_GROUP_BYTES", 1)
    out = tmp_path / "grouped"
    prepare_dataset(raw_folder, out, DatasetConfig(top_resolution=16), progress=False)
    monkeypatch.undo()
    return out


def test_memory_and_stream_stores_take_the_same_rows_within_a_window(grouped):
    path = grouped / "16x16.parquet"
    mem = RowStore(path, ("image",), mode="memory", window=4)
    stream = RowStore(path, ("image",), mode="stream", window=4)
    assert len(mem) == len(stream) > 12 and torch.equal(mem.labels, stream.labels)
    window_bytes = 4 * 16 * 16 * 3
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pos = torch.randint(0, len(mem), (5,), generator=g)
        a, la = mem.take(pos)
        b, lb = stream.take(pos)
        assert torch.equal(a["image"], b["image"]) and torch.equal(la, lb)
        windows = len(set((pos // 4).tolist()))
        assert stream.resident_bytes <= (windows + 1) * window_bytes  # this batch's + one
    assert mem.resident_bytes == len(mem) * 16 * 16 * 3
    with pytest.raises(DataError, match="16x16.parquet: no column 'domain'"):
        RowStore(path, ("image",), domain="A")  # a pyramid level has no domains
    with pytest.raises(DataError, match="16x16.parquet: no row in split 'nope'"):
        RowStore(path, ("image",), split="nope")


def test_auto_streams_only_a_split_over_the_memory_limit(grouped, monkeypatch):
    path = grouped / "16x16.parquet"
    assert RowStore(path, ("image",), mode="auto").mode == "memory"
    monkeypatch.setattr(rowstore, "MEMORY_BYTES", 1000)
    store = RowStore(path, ("image",), mode="auto")
    assert store.mode == "stream" and store.resident_bytes == 0


def _model(name):
    fam = families()[name]
    torch.manual_seed(0)
    return fam.build(from_dict(fam.config, TINY[name], name), INFO)


def _run_batches(name, dataset_dir, mode, steps=10, batch_size=4):
    model = _model(name)
    trainer = SimpleNamespace(model=model, step=0, images_seen=0)
    config = {"dataset_dir": str(dataset_dir), "family": name}
    run = RunSettings(batch_size=batch_size, data=mode)
    out = []
    for batch in _batches(config, run, INFO, 0, 1, trainer):
        out.append(batch)
        trainer.step += 1
        trainer.images_seen += batch.images.shape[0]
        if len(out) == steps:
            return out


@pytest.mark.parametrize("name", ["dcgan", "lapgan", "progan", "srgan", "cyclegan"])
def test_training_sees_the_same_batches_in_memory_and_streamed(name, grouped, monkeypatch):
    """Every kind of family (one level, aligned levels, growing, paired, unpaired) gets
    identical batches from the two modes, with windows of 5 rows (several per epoch)."""
    monkeypatch.setattr(rowstore, "MIN_WINDOW_ROWS", 1)
    monkeypatch.setattr(rowstore, "WINDOW_BYTES", 5 * 16 * 16 * 3)
    root = grouped
    if name == "srgan":
        root = grouped.parent / "sr"
        build_pairs(grouped, root, PairConfig(kind="super_resolution", dataset="t", resolution=16))
    if name == "cyclegan":
        root = grouped.parent / "tr"
        build_pairs(grouped, root, PairConfig(kind="translation", dataset="t", resolution=16))
    mem = _run_batches(name, root, "memory")
    stream = _run_batches(name, root, "stream")
    resolutions = set()
    for k, (a, b) in enumerate(zip(mem, stream, strict=True)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), k
        assert a.levels.keys() == b.levels.keys()
        assert all(torch.equal(a.levels[r], b.levels[r]) for r in a.levels), k
        assert (a.inputs is None) == (b.inputs is None)
        assert a.inputs is None or torch.equal(a.inputs, b.inputs), k
        resolutions.add(a.images.shape[-1])
    if name == "progan":  # the growing model switched levels within the 10 steps
        assert len(resolutions) > 1
    if name == "lapgan":
        assert sorted(mem[0].levels) == [4, 8]
    # the batches vary: not one batch repeated
    assert not torch.equal(mem[0].images, mem[1].images)


def test_stream_memory_stays_bounded_by_windows_as_the_epoch_goes(grouped, monkeypatch):
    monkeypatch.setattr(rowstore, "MIN_WINDOW_ROWS", 1)
    path = grouped / "16x16.parquet"
    store = RowStore(path, ("image",), mode="stream", window=3)
    peak = 0
    for step in range(3 * len(store)):
        pos = shard_positions(len(store), step, 2, 0, 1, seed=0, window=3)
        store.take(pos)
        peak = max(peak, store.resident_bytes)
    assert peak <= 3 * (3 * 16 * 16 * 3)  # at most 3 windows of 3 rows, whatever n
    assert np.isfinite(peak)


def test_prefetch_reads_the_next_window_ahead_and_take_uses_it(grouped, monkeypatch):
    monkeypatch.setattr(rowstore, "MIN_WINDOW_ROWS", 1)
    path = grouped / "16x16.parquet"
    mem = RowStore(path, ("image",), mode="memory", window=4)
    stream = RowStore(path, ("image",), mode="stream", window=4)
    pos = torch.tensor([9, 8, 11])  # window 2
    stream.prefetch(pos)
    stream._prefetching[2].result()  # read in the background thread
    assert stream.resident_bytes == 4 * 16 * 16 * 3

    def no_reading(j):
        raise AssertionError(f"window {j} read again")

    monkeypatch.setattr(stream, "_load", no_reading)
    assert torch.equal(stream.take(pos)[0]["image"], mem.take(pos)[0]["image"])
    monkeypatch.undo()
    # a whole run of steps with prefetching: the same rows, and at most 4 windows held
    peak = 0
    for step in range(2 * len(stream)):
        p = shard_positions(len(stream), step, 3, 0, 1, seed=1, window=4)
        stream.prefetch(shard_positions(len(stream), step + 1, 3, 0, 1, seed=1, window=4))
        assert torch.equal(stream.take(p)[0]["image"], mem.take(p)[0]["image"])
        peak = max(peak, stream.resident_bytes)
    assert peak <= 4 * (4 * 16 * 16 * 3)
