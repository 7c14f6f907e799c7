"""The Parquet layout of gm datasets, shared by writers and readers.

An image column is ``fixed_size_binary`` holding one (H, W, C) array in row-major order; its field
metadata says ``dtype`` (uint8 in pyramid datasets; readers also take float32 in [0, 255]) and
``shape``. One file per pyramid level, named ``{R}x{R}.parquet``, rows in the dataset's fixed
row order (the same in every level). Metadata is read from the schema, never guessed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gm.data.splits import SPLITS
from gm.errors import DataError
from gm.io import atomic_path

FORMAT_VERSION = 1


def level_file(resolution: int) -> str:
    return f"{resolution}x{resolution}.parquet"


def image_field(name: str, shape: tuple[int, ...], dtype: np.dtype) -> pa.Field:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    meta = {"dtype": dtype.name, "shape": json.dumps(list(shape))}
    return pa.field(name, pa.binary(nbytes), nullable=False, metadata=meta)


def image_array(images: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(N, ...) array → fixed-size binary array without a Python loop."""
    images = np.ascontiguousarray(images)
    n = images.shape[0]
    width = images[0].nbytes if n else int(np.prod(images.shape[1:])) * images.itemsize
    buf = pa.py_buffer(images.reshape(n, -1).view(np.uint8).reshape(-1))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, buf])


def decode_images(column: pa.ChunkedArray | pa.Array, field: pa.Field) -> np.ndarray:
    """Fixed-size binary column → (N, *shape) array of the field's dtype (one copy at most)."""
    meta = field.metadata or {}
    try:
        dtype = np.dtype(meta[b"dtype"].decode())
        shape = tuple(json.loads(meta[b"shape"]))
    except KeyError:
        raise DataError(f"column {field.name!r} has no dtype/shape metadata") from None
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.empty((0, *shape), dtype=dtype)
    data = column.buffers()[1]
    width = column.type.byte_width
    start = column.offset * width
    flat = np.frombuffer(data, dtype=np.uint8, count=n * width, offset=start)
    return flat.view(dtype).reshape(n, *shape)


ROW_GROUP_BYTES = 64 << 20  # a row group holds about this many bytes, whatever the image size
MIN_ROW_GROUP_BYTES = 1 << 20  # lower pyramid levels: at least this much per row group
MAX_ROW_GROUP_ROWS = 65536
DATA_PAGE_BYTES = 1 << 20  # Parquet data pages (pyarrow's default)


def row_group_rows(row_bytes: int, top_rows: int | None = None) -> int:
    """Rows per row group for rows of ``row_bytes``: about :data:`ROW_GROUP_BYTES` per group
    (21 rows of 1024x1024 RGB, 21,845 of 32x32 RGB), at least 1 and at most 65,536.

    A lower pyramid level passes its top level's ``top_rows``: it then uses the same rows per
    group (at least :data:`MIN_ROW_GROUP_BYTES`' worth), so a writer holding one unfinished
    row group per level holds about 4/3 of one top-level group, not 64 MiB per level."""
    cap = lambda b: int(min(MAX_ROW_GROUP_ROWS, max(1, b // max(1, row_bytes))))  # noqa: E731
    if top_rows is None:
        return cap(ROW_GROUP_BYTES)
    return max(min(top_rows, cap(ROW_GROUP_BYTES)), cap(MIN_ROW_GROUP_BYTES))


def _with_gm_metadata(schema: pa.Schema, metadata: dict[str, object]) -> pa.Schema:
    meta = dict(schema.metadata or {})
    meta[b"gm"] = json.dumps({"format_version": FORMAT_VERSION, **metadata}, sort_keys=True)
    return schema.with_metadata(meta)


def _writer_options(schema: pa.Schema) -> dict[str, object]:
    """One set of Parquet options for every gm file (zstd, deterministic bytes)."""
    dictionary = [c for c in ("split", "label_name", "domain") if c in schema.names]
    stats = [c for c in ("id", "split", "label") if c in schema.names]
    return dict(compression="zstd", compression_level=3, use_dictionary=dictionary,
                write_statistics=stats, store_schema=True,
                data_page_size=DATA_PAGE_BYTES)  # fmt: skip


def open_writer(path: str | os.PathLike, schema: pa.Schema, metadata: dict[str, object]):
    """A :class:`pyarrow.parquet.ParquetWriter` for a gm file at ``path`` (the caller writes to
    a temporary and renames it): append row groups with ``write_table(t, row_group_size=n)``."""
    schema = _with_gm_metadata(schema, metadata)
    return pq.ParquetWriter(path, schema, **_writer_options(schema))


class GroupedWriter:
    """Appends rows to a gm Parquet file in row groups of exactly ``rows_per_group`` rows (the
    last one shorter), each written as one contiguous chunk: the bytes depend only on the rows,
    never on how the caller batched them (Parquet's page boundaries follow the Arrow chunks it
    is given). Holds at most one unfinished row group in memory."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, metadata: dict[str, object],
                 rows_per_group: int):  # fmt: skip
        self.writer = open_writer(path, schema, metadata)
        self.schema = self.writer.schema
        self.rows = rows_per_group
        self.pending: list[pa.Table] = []
        self.num_rows = 0

    def append(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.num_rows += table.num_rows
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        have, n = sum(t.num_rows for t in self.pending), self.rows
        if have < n and not (final and have):
            return
        t = pa.concat_tables(self.pending)
        full = have if final else have - have % n
        for start in range(0, full, n):
            group = t.slice(start, min(n, full - start)).combine_chunks()
            self.writer.write_table(group, row_group_size=n)
        self.pending = [t.slice(full)] if full < have else []

    def close(self) -> None:
        self._flush(final=True)
        self.writer.close()


def write_table(path: str | os.PathLike, table: pa.Table, metadata: dict[str, object]) -> None:
    """Atomically write ``table`` with gm metadata in the schema, in row groups of about
    :data:`ROW_GROUP_BYTES` (deterministic bytes)."""
    table = table.replace_schema_metadata(_with_gm_metadata(table.schema, metadata).metadata)
    rows = row_group_rows(table.nbytes // max(1, table.num_rows))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=rows, **_writer_options(table.schema))


def _read_gm_schema(path: str | os.PathLike) -> tuple[pa.Schema, dict[str, object]]:
    """A gm file's schema and its ``gm`` metadata; unreadable or foreign files are named."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    raw = (schema.metadata or {}).get(b"gm")
    if raw is None:
        raise DataError(f"{path}: not a gm dataset file (no 'gm' schema metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: dataset format version {meta.get('format_version')} is not supported "
            f"(this gm reads version {FORMAT_VERSION}); rebuild it with `dvc repro`"
        )
    return schema, meta


def read_metadata(path: str | os.PathLike) -> dict[str, object]:
    return _read_gm_schema(path)[1]


def image_fields(path: str | os.PathLike, columns: tuple[str, ...]) -> dict[str, pa.Field]:
    """The fields of image ``columns`` of a gm file; a missing column is named."""
    schema, _ = _read_gm_schema(path)
    for c in columns:
        if c not in schema.names:
            raise DataError(f"{path}: no column {c!r} (has {', '.join(schema.names)})")
    return {c: schema.field(c) for c in columns}


def level_path(dataset_dir: str | os.PathLike, resolution: int) -> Path:
    path = Path(dataset_dir) / level_file(resolution)
    if not path.is_file():
        have = sorted(p.name for p in Path(dataset_dir).glob("*x*.parquet"))
        raise DataError(
            f"{path}: no level {resolution}x{resolution} in this dataset "
            f"(has: {', '.join(have) or 'nothing'})"
        )
    return path


def check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")


def read_table(path: Path, split: str | None, columns: list[str] | None = None) -> pa.Table:
    check_split(split)
    read_metadata(path)
    filters = (pc.field("split") == split) if split else None
    return pq.read_table(path, columns=columns, filters=filters)


def iter_split(path: Path, split: str, columns: list[str]) -> Iterator[pa.Table]:
    """The ``split`` rows of a gm level file, one row group at a time in file order (``columns``
    of each; row groups without such rows are skipped). Memory: one row group, about
    :data:`ROW_GROUP_BYTES`, whatever the file's size. Raises DataError for an unknown split
    or a file that is not gm's."""
    check_split(split)
    read_metadata(path)
    f = pq.ParquetFile(path)
    wanted = list(dict.fromkeys([*columns, "split"]))
    for g in range(f.num_row_groups):
        t = f.read_row_group(g, columns=wanted)
        t = t.filter(pc.equal(t.column("split").cast(pa.string()), split))
        if t.num_rows:
            yield t.select(columns)


def read_images(table: pa.Table, column: str = "image") -> np.ndarray:
    return decode_images(table.column(column), table.schema.field(column))


def load_level(
    dataset_dir: str | os.PathLike, resolution: int, split: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One level as ((N, H, W, C) uint8 in [0, 255], (N,) int64 labels), in file order."""
    table = read_table(level_path(dataset_dir, resolution), split, ["id", "label", "image"])
    return read_images(table), table.column("label").to_numpy().astype(np.int64)
