"""The batch of step k: training's one view of the data, in memory or streamed from Parquet.

A :class:`RowStore` holds the rows of one gm Parquet file that a training reads (the train
split; for an unpaired table also one domain) and hands out the image columns of any list of
those rows as uint8 arrays. Rows are addressed by *position*: 0 .. n-1 over the selected rows
in file order. Two modes give the same arrays for the same positions:

- ``memory``: the selected rows' image columns are read once (fast; memory = the split);
- ``stream``: rows are read a window at a time (:func:`window_rows` rows, about
  :data:`WINDOW_BYTES`), reading only the row groups that cover the window; at most the
  windows of the current batch plus one more are kept, and one more is read ahead in a
  background thread (:meth:`RowStore.prefetch`, fed the next step's positions): memory is
  bounded by a few windows, whatever the dataset's size.

:func:`shard_positions` says which positions rank ``r`` trains on at step ``k``: a
permutation per epoch, seeded by (seed, epoch), that shuffles the order of the windows and
the rows inside each window. It is a function of the step alone, so a run that is killed and
resumed sees exactly the batches an uninterrupted run sees, and both modes see the same
batches (tests/test_rowstore.py). Streaming reads one or two windows per window's worth of
steps, so a batch mixes rows from one window: gm writes the rows of every dataset in a
pseudo-random order (by a hash of the source id, :mod:`gm.data.prepare`), so a window is a
random sample of the dataset, as a WebDataset shard of pre-shuffled samples is. For a dataset
of one window (the default ones: up to 256 MiB of top-level pixels) the permutation is a plain
shuffle of the whole split.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from gm.data.parquet import decode_images, image_fields
from gm.errors import DataError

WINDOW_BYTES = 256 << 20  # top-level image bytes per window of a streamed run
MEMORY_BYTES = 2 << 30  # mode auto streams a split whose image bytes exceed this (per worker)


MIN_WINDOW_ROWS = 64


def window_rows(row_bytes: int) -> int:
    """Rows per window for rows of ``row_bytes`` image bytes: about :data:`WINDOW_BYTES`,
    at least :data:`MIN_WINDOW_ROWS` (85 rows of 1024x1024 RGB, 21,845 of 64x64 RGB)."""
    return int(max(MIN_WINDOW_ROWS, WINDOW_BYTES // max(1, row_bytes)))


def _generator(seed: int, epoch: int, window: int = -1) -> torch.Generator:
    base = seed * 1_000_003 + epoch
    return torch.Generator().manual_seed(base if window < 0 else base * 7_919 + window + 1)


class EpochOrder:
    """The permutation of ``n`` positions in one epoch: windows of ``window`` consecutive
    positions in a random order, each window's positions shuffled. With one window it is
    ``torch.randperm(n)`` under the generator of (seed, epoch)."""

    def __init__(self, n: int, window: int, seed: int, epoch: int):
        self.n, self.window, self.seed, self.epoch = n, window, seed, epoch
        count = (n + window - 1) // window
        self.order = torch.randperm(count, generator=_generator(seed, epoch)).tolist()
        sizes = [min(window, n - j * window) for j in self.order]
        self.offsets = np.cumsum([0, *sizes])
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _perm(self, j: int) -> torch.Tensor:
        if j not in self._perms:
            size = min(self.window, self.n - j * self.window)
            g = _generator(self.seed, self.epoch) if len(self.order) == 1 else None
            g = g or _generator(self.seed, self.epoch, j)
            self._perms[j] = torch.randperm(size, generator=g) + j * self.window
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[j]

    def __getitem__(self, p: torch.Tensor) -> torch.Tensor:
        """Positions at epoch offsets ``p`` (each in [0, n))."""
        out = torch.empty_like(p)
        slots = np.searchsorted(self.offsets, p.numpy(), side="right") - 1
        for s in np.unique(slots):
            mask = torch.from_numpy(slots == s)
            out[mask] = self._perm(self.order[s])[p[mask] - int(self.offsets[s])]
        return out


_ORDERS: OrderedDict[tuple, EpochOrder] = OrderedDict()


def shard_positions(n: int, step: int, batch_size: int, rank: int, world: int, seed: int,
                    window: int) -> torch.Tensor:  # fmt: skip
    """(batch_size,) positions of rank ``rank``'s batch at ``step``: epoch ``step //
    steps_per_epoch`` of :class:`EpochOrder`, cut into ``world`` consecutive slices. Wraps
    around only when ``n`` is smaller than one global batch."""
    per_step = batch_size * world
    steps_per_epoch = max(n // per_step, 1)
    epoch, pos = divmod(step, steps_per_epoch)
    key = (n, window, seed, epoch)
    if key not in _ORDERS:
        _ORDERS[key] = EpochOrder(n, window, seed, epoch)
        while len(_ORDERS) > 4:
            _ORDERS.popitem(last=False)
    start = pos * per_step + rank * batch_size
    return _ORDERS[key][torch.arange(start, start + batch_size) % n]


class RowStore:
    """The image columns ``columns`` of the rows of ``path`` in ``split`` (and, for an unpaired
    table, ``domain``), by position. ``mode``: ``memory``, ``stream`` (module docstring) or
    ``auto`` (stream when the selected rows' image bytes exceed :data:`MEMORY_BYTES`);
    ``window``: rows per window (default from the widest image column, :func:`window_rows`).

    ``take(positions)`` → ({column: (B, H, W, C) uint8 tensor}, (B,) int64 labels).
    Raises DataError naming the file when a column is missing or no row is selected."""

    def __init__(self, path: str | os.PathLike, columns: tuple[str, ...],
                 split: str | None = "train",
                 domain: str | None = None, mode: str = "memory",
                 window: int | None = None):  # fmt: skip
        self.path, self.columns, self.mode = Path(path), columns, mode
        self.fields = image_fields(self.path, columns)  # checks it is a gm file, names a column
        keys = ["split", "label"] + (["domain"] if domain else [])
        names = pq.read_schema(self.path).names
        for k in keys:
            if k not in names:
                raise DataError(f"{self.path}: no column {k!r} (has {', '.join(names)})")
        table = pq.read_table(self.path, columns=keys)
        mask = pc.equal(table.column("split"), split) if split else pc.is_valid(table.column(0))
        if domain:
            mask = pc.and_(mask, pc.equal(table.column("domain"), domain))
        self.rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        if len(self.rows) == 0:
            what = f"split {split!r}" + (f", domain {domain!r}" if domain else "")
            raise DataError(f"{self.path}: no row in {what}")
        labels = table.column("label").to_numpy()[self.rows]
        self.labels = torch.from_numpy(labels.astype(np.int64))
        widest = max(f.type.byte_width for f in self.fields.values())
        self.window = window or window_rows(widest)
        self.split_bytes = len(self.rows) * sum(f.type.byte_width for f in self.fields.values())
        if mode == "auto":
            mode = "stream" if self.split_bytes > MEMORY_BYTES else "memory"
        self.mode = mode
        if mode == "stream":  # where each row group starts, to read only a window's groups
            meta = pq.read_metadata(self.path)
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._starts = np.cumsum([0, *sizes])
        self._windows: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._prefetching: OrderedDict[int, Any] = OrderedDict()  # window → Future
        self._pool = None
        self._memory: dict[str, torch.Tensor] = {}
        if mode == "memory":
            t = pq.read_table(self.path, columns=list(columns)).take(pa.array(self.rows))
            self._memory = {c: torch.from_numpy(decode_images(t.column(c), self.fields[c]))
                            for c in columns}  # fmt: skip
        elif mode != "stream":
            raise ValueError(f"mode {mode!r}: expected memory or stream")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def resident_bytes(self) -> int:
        """Image bytes this store holds now (the split in memory; the cached windows when
        streaming)."""
        if self.mode == "memory":
            return int(sum(a.nbytes for a in self._memory.values()))
        windows = list(self._windows.values())
        windows += [
            f.result() for f in self._prefetching.values() if f.done() and not f.cancelled()
        ]
        return int(sum(a.nbytes for w in windows for a in w.values()))

    def _load(self, j: int) -> dict[str, np.ndarray]:
        """Read window ``j`` (a ParquetFile of its own: safe from the prefetch thread)."""
        f = pq.ParquetFile(self.path)
        rows = self.rows[j * self.window : (j + 1) * self.window]
        first, last = int(rows[0]), int(rows[-1])
        g0 = bisect.bisect_right(self._starts, first) - 1
        g1 = bisect.bisect_right(self._starts, last) - 1
        t = f.read_row_groups(list(range(g0, g1 + 1)), columns=list(self.columns))
        t = t.take(pa.array(rows - int(self._starts[g0])))
        return {c: decode_images(t.column(c), self.fields[c]) for c in self.columns}

    def _read_window(self, j: int) -> dict[str, np.ndarray]:
        if j in self._windows:
            self._windows.move_to_end(j)
            return self._windows[j]
        pending = self._prefetching.pop(j, None)
        arrays = pending.result() if pending is not None else self._load(j)
        self._windows[j] = arrays
        return arrays

    def prefetch(self, positions: torch.Tensor) -> None:
        """Start reading, in one background thread, the windows ``positions`` need that are not
        held (the next step's, while this one trains; pyarrow decodes without the GIL). At most
        one window is read ahead; a no-op in memory mode."""
        if self.mode != "stream":
            return
        for j in dict.fromkeys((positions.numpy() // self.window).tolist()):
            if j in self._windows or j in self._prefetching:
                continue
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(1, thread_name_prefix="gm-rowstore")
            while self._prefetching:  # read ahead one window only
                _, old = self._prefetching.popitem(last=False)
                old.cancel()
            self._prefetching[j] = self._pool.submit(self._load, j)
            return

    def take(self, positions: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Image columns (uint8, (B, H, W, C)) and labels of ``positions`` (each in [0, n))."""
        labels = self.labels[positions]
        if self.mode == "memory":
            return {c: a[positions] for c, a in self._memory.items()}, labels
        pos = positions.numpy()
        win = pos // self.window
        needed = list(dict.fromkeys(win.tolist()))
        # keep the windows of this batch and the most recently used other one
        others = [j for j in reversed(self._windows) if j not in needed]
        for j in others[1:]:
            del self._windows[j]
        out = {c: np.empty((len(pos), *self.shape(c)), np.uint8) for c in self.columns}
        for j in needed:
            arrays = self._read_window(j)
            sel = win == j
            for c in self.columns:
                out[c][sel] = arrays[c][pos[sel] - j * self.window]
        return {c: torch.from_numpy(a) for c, a in out.items()}, labels

    def batches(self, positions: torch.Tensor | None = None, batch_size: int = 500,
                column: str = "image"):  # fmt: skip
        """Yield (``column`` uint8 (B, H, W, C), labels (B,)) of ``positions`` (default: every
        row in file order), ``batch_size`` at a time: evaluation's bounded reads."""
        if positions is None:
            positions = torch.arange(len(self))
        for start in range(0, len(positions), batch_size):
            self.prefetch(positions[start + batch_size : start + 2 * batch_size])
            cols, labels = self.take(positions[start : start + batch_size])
            yield cols[column], labels

    def shape(self, column: str) -> tuple[int, ...]:
        """(H, W, C) of an image column."""
        return tuple(json.loads(self.fields[column].metadata[b"shape"]))
