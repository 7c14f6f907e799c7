"""Raw images → multi-resolution Parquet dataset (one file per level) with a manifest, streamed.

Input is a folder with one subfolder per class (images directly in the folder form one class
named after it); a folder of Parquet tables with an ``image`` column of encoded bytes and an
optional ``label`` (class name) and ``id`` column; or StyleGAN dataset zips or WebDataset tar
shards (a folder of them, or one archive; :mod:`gm.data.archives`). Output (written atomically)::

    out/4x4.parquet ... out/{R}x{R}.parquet   id, source, label, label_name, split, image (uint8)
    out/manifest.json                          counts, classes, mean/std, hashes, skipped inputs
    out/preview.png                            a few images at every level

The data path is one straight line, with memory bounded by a batch, never by the dataset:

1. :func:`scan` lists the inputs (ids, classes and where each one's bytes are; no pixels).
2. :func:`process_batch` turns a batch of inputs into output rows: decode, fit to a square,
   build the uint8 pyramid (:mod:`gm.data.pyramid`), assign the split, and the per-row content
   digest and channel sums. It runs in this process or as Ray Data tasks (``map_batches``) on
   every core of the machine or every node of a Ray cluster (``RAY_ADDRESS``).
3. The driver consumes the processed batches in input order and appends rows to one Parquet
   writer per level, in row groups of about 64 MiB at the top level and as many rows below
   (:func:`gm.data.parquet.row_group_rows`);
   statistics and the content hash are running sums. The bytes written depend only on the
   input, never on the number of workers or how the work was batched.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

import gm
from gm.cluster import on_cluster
from gm.config import to_dict
from gm.data.archives import IMAGE_SUFFIXES, RawItem, read_members, scan_archives
from gm.data.config import DatasetConfig
from gm.data.images import BadImage, decode, fit_square
from gm.data.parquet import (
    GroupedWriter,
    image_field,
    level_file,
    open_writer,
    row_group_rows,
)
from gm.data.pyramid import build_pyramid
from gm.data.remote import is_uri, read_objects, scan_uri
from gm.data.splits import SPLITS, assign_split, split_key
from gm.errors import DataError, GmError
from gm.io import atomic_dir, atomic_path, sha256_file, write_json

BATCH_BYTES = 32 << 20  # a task's batch holds at most about this many top-level pixel bytes
MAX_BATCH = 256  # inputs per batch
ARCHIVES = {".zip", ".tar"}  # StyleGAN dataset zips, WebDataset tar shards (gm.data.archives)
RAY_MIN_ITEMS = 8192  # `workers=None`: fewer inputs run here (Ray's ~5 s start-up outweighs them)


def scan(raw: Path | str) -> tuple[list[RawItem], list[str], list[dict[str, str]]]:
    """List a raw folder: (items in row order, class names incl. empty ones, skipped entries).
    Reads no pixels. Raises DataError naming the folder or table when it cannot be used.

    Row order is pseudo-random and fixed: by :func:`row_order_key` of the id. Every window of
    consecutive rows is then a random sample of the dataset, which is what lets training
    stream a window at a time (:mod:`gm.data.rowstore`); adding images never changes the
    relative order of the others."""
    if is_uri(raw):  # object storage: s3://bucket/prefix (gm.data.remote)
        items, classes, skipped = scan_uri(str(raw))
        return sorted(items, key=lambda it: (row_order_key(it.id), it.id)), classes, skipped
    raw = Path(raw)
    if raw.is_file() and raw.suffix in ARCHIVES:  # one StyleGAN zip or WebDataset shard
        items, classes, skipped = scan_archives(raw, [raw], raw.stem)
    elif not raw.is_dir():
        raise DataError(f"{raw}: raw data folder does not exist (run `gm data materialize`?)")
    elif tables := sorted(p for p in raw.iterdir() if p.suffix == ".parquet"):
        items, classes, skipped = _scan_parquet(raw, tables)
    elif archives := sorted(p for p in raw.iterdir() if p.suffix in ARCHIVES and p.is_file()):
        items, classes, skipped = scan_archives(raw, archives, raw.name)
    else:
        items, classes, skipped = _scan_folder(raw)
    return sorted(items, key=lambda it: (row_order_key(it.id), it.id)), classes, skipped


def row_order_key(source_id: str) -> bytes:
    """The sort key of an input's rows: SHA-256 of its id (tiles of one input stay together,
    in id order)."""
    return hashlib.sha256(f"gm-row-order\0{source_id}".encode()).digest()[:8]


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _scan_folder(raw: Path) -> tuple[list[RawItem], list[str], list[dict[str, str]]]:
    skipped: list[dict[str, str]] = []
    entries = sorted(p for p in raw.iterdir() if _visible(p, raw))
    class_dirs = [p for p in entries if p.is_dir()]
    if class_dirs:
        classes = [d.name for d in class_dirs]
        files = [(d.name, f) for d in class_dirs for f in sorted(d.rglob("*")) if f.is_file()]
        for p in entries:
            if p.is_file():
                skipped.append({"path": p.name, "reason": "file outside a class folder"})
    else:
        files = [(raw.name, p) for p in entries if p.is_file()]
        if not files:
            raise DataError(
                f"{raw}: the dataset folder is empty (no class folders and no image files); "
                "put images in it, one sub-folder per class for a conditional dataset"
            )
        classes = [raw.name]
    items = []
    for cls, f in files:
        if not _visible(f, raw):
            continue
        rel = f.relative_to(raw).as_posix()
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"path": rel, "reason": f"not an image file (suffix {f.suffix!r})"})
            continue
        items.append(RawItem(rel, cls, str(f.resolve())))
    return items, classes, skipped


def _scan_parquet(raw: Path, tables: list[Path]) -> tuple[list[RawItem], list[str], list]:
    """Reads only the ``id`` and ``label`` columns; image bytes are read per batch."""
    items: list[RawItem] = []
    for path in tables:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{path}: not a readable Parquet table ({e})") from None
        if "image" not in schema.names:
            raise DataError(f"{path}: Parquet input needs an 'image' column of encoded bytes")
        kind = schema.field("image").type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise DataError(f"{path}: column 'image' must hold encoded image bytes, not {kind}")
        cols = [c for c in ("id", "label") if c in schema.names]
        table = pq.read_table(path, columns=cols)
        n = table.num_rows
        labels = table.column("label").to_pylist() if "label" in cols else [raw.name] * n
        ids = (
            [str(i) for i in table.column("id").to_pylist()]
            if "id" in cols
            else [f"{path.name}:{i}" for i in range(n)]
        )
        where = str(path.resolve())
        pairs = enumerate(zip(ids, labels, strict=True))
        items += [RawItem(i, str(lab), where, r) for r, (i, lab) in pairs]
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise DataError(f"{raw}: duplicate id {it.id!r} in Parquet input")
        seen.add(it.id)
    classes = sorted({it.class_name for it in items})
    return items, classes, []


# ----------------------------------------------------------------------------------------------
# Step 2: one batch of inputs → output rows (pure: runs here or as a Ray Data task)


def _parquet_bytes(rows: list[tuple[int, str, int]]) -> dict[int, bytes | None]:
    """{batch position: encoded bytes} for Parquet-table inputs, reading each needed row group
    of each table once."""
    out: dict[int, bytes | None] = {}
    by_file: dict[str, list[tuple[int, int]]] = {}
    for pos, path, row in rows:
        by_file.setdefault(path, []).append((pos, row))
    for path, wanted in by_file.items():
        f = pq.ParquetFile(path)
        sizes = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        groups: dict[int, pa.Array] = {}
        for pos, row in wanted:
            g = bisect.bisect_right(starts, row) - 1
            if g not in groups:
                groups[g] = f.read_row_group(g, columns=["image"]).column("image")
            value = groups[g][row - int(starts[g])].as_py()
            out[pos] = value if isinstance(value, bytes) else None
    return out


def process_batch(batch: dict[str, np.ndarray], cfg: DatasetConfig) -> pa.Table:
    """A batch of inputs (the columns of :func:`_item_table`: a :class:`RawItem` each) → one
    output row per square (an input cut into tiles gives several, in id order), or one row with
    ``skip`` or ``error`` set for an input the policy skips or refuses. Columns: ``item``, ``id``,
    ``source``, ``class_name``, ``split``, ``skip``, ``error``, ``digest`` (SHA-256 of id, class,
    split and top-level pixels), ``sum`` and ``sumsq`` (per-channel integer sums of the top
    level's pixels and squared pixels) and ``L{R}`` per level (uint8 (R, R, C) bytes; null on a
    skipped row)."""
    n = len(batch["id"])
    rows = [(i, str(batch["path"][i]), int(batch["row"][i])) for i in range(n)]
    table_bytes: dict[int, bytes | None] = _parquet_bytes([r for r in rows if r[2] >= 0])
    members = [(i, RawItem(str(batch["id"][i]), "", str(batch["path"][i]),
                           member=str(batch["member"][i]), offset=int(batch["offset"][i]),
                           size=int(batch["size"][i])))
               for i in range(n) if batch["member"][i] or int(batch["offset"][i]) >= 0]  # fmt: skip
    archived, unreadable = read_members(members)
    objects, unreachable = read_objects([(i, p) for i, p, r in rows if r < 0 and is_uri(p)])
    table_bytes |= archived | objects
    unreadable |= unreachable
    from_bytes = set(table_bytes)
    res = [cfg.top_resolution >> k for k in range(cfg.top_resolution.bit_length() - 2)]
    out: dict[str, list] = {k: [] for k in ("item", "id", "source", "class_name", "split", "skip",
                                            "error", "digest", "sum", "sumsq")}  # fmt: skip
    levels: dict[int, list] = {r: [] for r in res}

    def add(item, id_, source, cls, split="", skip="", error="", pyramid=None):
        top = pyramid[cfg.top_resolution] if pyramid is not None else None
        digest, s, ss = b"", [], []
        if top is not None:
            h = hashlib.sha256(f"{id_}\0{cls}\0{split}\0".encode())
            h.update(top.tobytes())
            digest = h.digest()
            flat = top.reshape(-1, top.shape[-1]).astype(np.int64)
            s, ss = flat.sum(0).tolist(), (flat * flat).sum(0).tolist()
        for k, v in (("item", item), ("id", id_), ("source", source), ("class_name", cls),
                     ("split", split), ("skip", skip), ("error", error), ("digest", digest),
                     ("sum", s), ("sumsq", ss)):  # fmt: skip
            out[k].append(v)
        for r in res:
            levels[r].append(None if pyramid is None else pyramid[r].tobytes())

    for i, path, row in rows:
        item, id_, cls = int(batch["item"][i]), str(batch["id"][i]), str(batch["class_name"][i])
        if row >= 0 and table_bytes.get(i) is None:
            error = f"{path}: row {row}: 'image' must hold encoded image bytes"
            add(item, id_, id_, cls, error=error)
            continue
        try:
            if i in unreadable:
                raise BadImage("invalid", unreadable[i])
            data = table_bytes[i] if i in from_bytes else path
            arr = decode(data, cfg.channels, cfg.background)
            squares = sorted(fit_square(arr, cfg), key=lambda sq: sq.suffix)
        except BadImage as e:
            policy = cfg.undersize if e.kind == "undersize" else cfg.on_invalid
            if policy == "error":
                add(item, id_, id_, cls, error=f"{id_}: {e.reason}")
            else:
                add(item, id_, id_, cls, skip=e.reason)
            continue
        for sq in squares:
            split = assign_split(split_key(id_, sq.suffix, sq.tile, cfg), cfg.split)
            add(item, id_ + sq.suffix, id_, cls, split, pyramid=build_pyramid(sq.pixels))
    cols = {k: pa.array(v, pa.string()) for k, v in out.items() if k not in
            ("item", "digest", "sum", "sumsq")}  # fmt: skip
    cols["item"] = pa.array(out["item"], pa.int64())
    cols["digest"] = pa.array(out["digest"], pa.binary())
    cols["sum"] = pa.array(out["sum"], pa.list_(pa.int64()))
    cols["sumsq"] = pa.array(out["sumsq"], pa.list_(pa.int64()))
    for r in res:
        nbytes = r * r * cfg.channels
        cols[f"L{r}"] = pa.array(levels[r], pa.binary(nbytes))
    return pa.table(cols)


def batch_size(cfg: DatasetConfig) -> int:
    """Inputs per batch: about :data:`BATCH_BYTES` of top-level pixels, at most
    :data:`MAX_BATCH` (256 at 64x64 RGB, 10 at 1024x1024 RGB)."""
    per = cfg.top_resolution**2 * cfg.channels
    return int(max(1, min(MAX_BATCH, BATCH_BYTES // per)))


def _item_table(items: list[RawItem]) -> dict[str, np.ndarray]:
    return {
        "item": np.arange(len(items), dtype=np.int64),
        "id": np.asarray([it.id for it in items], dtype=object),
        "class_name": np.asarray([it.class_name for it in items], dtype=object),
        "path": np.asarray([it.path for it in items], dtype=object),
        "row": np.asarray([it.row for it in items], dtype=np.int64),
        "member": np.asarray([it.member for it in items], dtype=object),
        "offset": np.asarray([it.offset for it in items], dtype=np.int64),
        "size": np.asarray([it.size for it in items], dtype=np.int64),
    }


def _local_batches(items: list[RawItem], cfg: DatasetConfig) -> Iterator[pa.Table]:
    table, size = _item_table(items), batch_size(cfg)
    for start in range(0, len(items), size):
        yield process_batch({k: v[start : start + size] for k, v in table.items()}, cfg)


def _ray_batches(items: list[RawItem], cfg: DatasetConfig, workers: int) -> Iterator[pa.Table]:
    """The same batches as :func:`_local_batches`, computed by Ray Data tasks (at most
    ``workers`` at a time) and yielded in input order."""
    import ray.data

    from gm.cluster import init_ray

    init_ray(0)
    size = batch_size(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order
    ctx.enable_progress_bars = False  # the driver's bar counts inputs
    table = _item_table(items)
    rows = [{k: v[i] for k, v in table.items()} for i in range(len(items))]
    blocks = (len(items) + size - 1) // size
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(process_batch, fn_kwargs={"cfg": cfg}, batch_size=size,
                        batch_format="numpy", num_cpus=1,
                        compute=ray.data.TaskPoolStrategy(size=workers))  # fmt: skip
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except GmError:
        raise
    except Exception as e:  # noqa: BLE001 - a task's failure reaches here as Ray's wrapper
        raise GmError(f"prepare on Ray failed: {type(e).__name__}: {e}") from None


def resolve_workers(workers: int | None, n_items: int) -> int:
    """``None`` (auto): Ray Data with one task per CPU of the cluster when ``RAY_ADDRESS`` names
    a cluster or there are at least :data:`RAY_MIN_ITEMS` inputs, else 0 (this process). The
    one local Ray of ``gm with-ray`` (``GM_RAY_LOCAL`` set) is this machine, not a cluster: a
    small folder stays in this process there too, as it would without it. A number: 0 = this
    process, n >= 1 = Ray Data with at most n tasks at a time."""
    if workers is not None:
        if workers < 0:
            raise DataError(f"workers={workers}: expected 0 (this process) or Ray tasks >= 1")
        return workers
    cluster = on_cluster()
    if cluster or n_items >= RAY_MIN_ITEMS:
        import ray

        from gm.cluster import init_ray

        init_ray(0)
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return 0


# ----------------------------------------------------------------------------------------------
# Step 3: the driver appends rows to one writer per level


class _Writers:
    """One :class:`GroupedWriter` per level: the top level's row groups hold about 64 MiB, the
    lower levels' as many rows (at least 1 MiB), so at most about 4/3 of one top-level row group
    waits in memory."""

    def __init__(self, folder: Path, cfg: DatasetConfig, name: str, classes: list[str]):
        self.res = [cfg.top_resolution >> k for k in range(cfg.top_resolution.bit_length() - 2)]
        self.classes, self.index = classes, {c: i for i, c in enumerate(classes)}
        self.channels = cfg.channels
        self.writers: dict[int, GroupedWriter] = {}
        top = row_group_rows(cfg.top_resolution**2 * cfg.channels)
        for r in self.res:
            field = image_field("image", (r, r, cfg.channels), np.uint8)
            rows = top if r == self.res[0] else row_group_rows(r * r * cfg.channels, top)
            meta = {"dataset": name, "resolution": r, "channels": cfg.channels, "classes": classes}
            self.writers[r] = GroupedWriter(folder / level_file(r), _schema(field), meta, rows)

    def append(self, rows: pa.Table) -> None:
        labels = pa.array([self.index[c] for c in rows.column("class_name").to_pylist()],
                          pa.int16())  # fmt: skip
        text = [rows.column(c).cast(pa.string()) for c in ("id", "source", "class_name", "split")]
        base = [text[0], text[1], labels, text[2], text[3]]
        for r in self.res:
            img = rows.column(f"L{r}").cast(pa.binary(r * r * self.channels))
            self.writers[r].append(
                pa.Table.from_arrays([*base, img], schema=self.writers[r].schema)
            )

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def _schema(field: pa.Field) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("label", pa.int16(), nullable=False),
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        field,
    ])  # fmt: skip


def _relabel(path: Path, classes: list[str], meta: dict) -> None:
    """Rewrite a level file for a smaller class list (classes dropped as empty), one row group
    at a time."""
    f = pq.ParquetFile(path)
    index = {c: i for i, c in enumerate(classes)}
    schema = f.schema_arrow
    tmp = path.with_name(path.name + ".relabel")
    writer = open_writer(tmp, schema.remove_metadata(), meta)
    for g in range(f.num_row_groups):
        t = f.read_row_group(g)
        labels = pa.array([index[c] for c in t.column("label_name").to_pylist()], pa.int16())
        t = t.set_column(2, schema.field("label"), labels)
        writer.write_table(t.cast(writer.schema), row_group_size=max(1, t.num_rows))
    writer.close()
    os.replace(tmp, path)


class _Stats:
    """Exact running sums (Python integers) of the per-channel pixel sums and squares."""

    def __init__(self):
        self.n = {"train": 0, "all": 0}
        self.s: dict[str, list[int]] = {"train": [], "all": []}
        self.ss: dict[str, list[int]] = {"train": [], "all": []}

    def add(self, split: str, pixels: int, s: list[int], ss: list[int]) -> None:
        for k in ("train", "all") if split == "train" else ("all",):
            self.n[k] += pixels
            self.s[k] = [a + b for a, b in zip(self.s[k] or [0] * len(s), s, strict=True)]
            self.ss[k] = [a + b for a, b in zip(self.ss[k] or [0] * len(ss), ss, strict=True)]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, of the train split (all images when the
        train split is empty), rounded to 6 decimals."""
        k = "train" if self.n["train"] else "all"
        n = self.n[k]
        if not n:
            return [], []
        mean = [Fraction(v, n) for v in self.s[k]]
        var = [Fraction(q, n) - m * m for q, m in zip(self.ss[k], mean, strict=True)]
        return ([round(float(m) / 255.0, 6) for m in mean],
                [round(float(v) ** 0.5 / 255.0, 6) for v in var])  # fmt: skip


class _Preview:
    """Keeps the pyramids of the preview's images as rows stream past: the first image of each
    of the first ``cols`` classes (in class order), else the first rows."""

    def __init__(self, classes: list[str], cols: int = 8):
        self.order = {c: i for i, c in enumerate(classes)}
        self.cols = cols
        self.first: dict[str, tuple[int, dict[int, np.ndarray]]] = {}
        self.early: list[tuple[int, str, dict[int, np.ndarray]]] = []

    def offer(self, row: int, cls: str, pyramid) -> None:
        if cls not in self.first:
            self.first[cls] = (row, pyramid())
            if len(self.first) > self.cols:  # keep the first `cols` classes in class order
                drop = max(self.first, key=self.order.__getitem__)
                del self.first[drop]
        if len(self.early) < self.cols:
            self.early.append((row, cls, pyramid()))

    def levels(self, classes: list[str]) -> dict[int, np.ndarray]:
        picks = {row: (cls, p) for cls, (row, p) in self.first.items() if cls in classes}
        picks = dict(sorted(picks.items(), key=lambda kv: self.order[kv[1][0]])[: self.cols])
        for row, cls, p in self.early:
            if len(picks) >= self.cols:
                break
            picks.setdefault(row, (cls, p))
        rows = sorted(picks)
        if not rows:
            return {}
        res = picks[rows[0]][1].keys()
        return {r: np.stack([picks[i][1][r] for i in rows]) for r in res}


def prepare_dataset(
    raw: str | os.PathLike,
    out: str | os.PathLike,
    cfg: DatasetConfig,
    name: str | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Build the pyramid dataset of ``raw`` into ``out`` (replaced atomically); returns the
    manifest. ``workers``: see :func:`resolve_workers`; the output bytes do not depend on it.
    Raises DataError naming the file, class or folder when the input cannot be used; nothing
    is left half-written."""
    out = Path(out)
    if is_uri(raw):
        raw = str(raw).rstrip("/")
        where, default = raw, raw.rsplit("/", 1)[-1]
        flat_ok = True
    else:
        raw = Path(raw)
        where, default = str(raw), (raw.stem if raw.is_file() else raw.name)
        flat_ok = not (raw / raw.name).is_dir()
    name = name or default
    items, class_names, skipped = scan(raw)
    workers = resolve_workers(workers, len(items))
    batches: Iterable[pa.Table] = (
        _ray_batches(items, cfg, workers) if workers else _local_batches(items, cfg)
    )
    counts = {s: {c: 0 for c in class_names} for s in SPLITS}
    stats, preview = _Stats(), _Preview(class_names)
    content = hashlib.sha256()
    res = [cfg.top_resolution >> k for k in range(cfg.top_resolution.bit_length() - 2)]
    pixels_per_image = cfg.top_resolution**2
    n_rows = 0
    bar = tqdm(total=len(items), desc=f"prepare {name}", unit="img", disable=not progress,
               mininterval=1.0)  # fmt: skip
    with atomic_dir(out) as tmp:
        writers = _Writers(tmp, cfg, name, class_names)
        try:
            for batch in batches:
                errors = [e for e in batch.column("error").to_pylist() if e]
                if errors:
                    raise DataError(errors[0])
                for path, reason in zip(batch.column("source").to_pylist(),
                                        batch.column("skip").to_pylist(), strict=True):  # fmt: skip
                    if reason:
                        skipped.append({"path": path, "reason": reason})
                rows = batch.filter(pc.equal(batch.column("skip"), ""))
                cols = ("class_name", "split", "digest", "sum", "sumsq")
                values = zip(*(rows.column(c).to_pylist() for c in cols), strict=True)
                for i, (cls, split, digest, s, ss) in enumerate(values):
                    counts[split][cls] += 1
                    stats.add(split, pixels_per_image, s, ss)
                    content.update(digest)
                    preview.offer(n_rows + i, cls, lambda i=i, t=rows: _row_pyramid(t, i, res, cfg))
                writers.append(rows)
                n_rows += rows.num_rows
                bar.update(len(set(batch.column("item").to_pylist())))
        finally:
            bar.close()
            writers.close()
        present = [c for c in class_names if sum(counts[s][c] for s in SPLITS)]
        empty = [c for c in class_names if c not in present]
        flat = flat_ok and class_names == [default]  # one unnamed class
        _check_classes(where, flat, class_names, empty, skipped, counts, cfg)
        classes = present
        counts = {s: {c: counts[s][c] for c in classes} for s in SPLITS}
        mean, std = stats.mean_std()
        content.update(json.dumps(classes).encode())
        manifest = {
            "gm_version": gm.__version__,
            "dataset": name,
            "top_resolution": cfg.top_resolution,
            "resolutions": sorted(res),
            "channels": cfg.channels,
            "num_images": n_rows,
            "classes": classes,
            "counts": counts,
            "mean": mean,
            "std": std,
            "stats_note": "per-channel mean/std of the train split at the top level, in [0, 1]",
            "content_hash": content.hexdigest(),
            "content_note": "SHA-256 over each row's SHA-256 of (id, class, split, top-level "
            "pixels) in file order, then the class list",
            "pyramid": "uint8 at every level; each level is the 2x2 box filter of the level "
            "above, rounded half to even",
            "dropped_classes": empty,
            "skipped": skipped,
            "config": to_dict(cfg),
            "files": {},
        }
        for r in sorted(res):
            path = tmp / level_file(r)
            if empty:
                meta = {"dataset": name, "resolution": r, "channels": cfg.channels,
                        "classes": classes}  # fmt: skip
                _relabel(path, classes, meta)
            manifest["files"][str(r)] = {
                "file": level_file(r),
                "rows": n_rows,
                "dtype": "uint8",
                "sha256": sha256_file(path),
            }
        write_json(tmp / "manifest.json", manifest)
        levels = preview.levels(classes)
        if levels:
            save_preview(tmp / "preview.png", levels)
    return manifest


def _row_pyramid(rows: pa.Table, i: int, res: list[int], cfg: DatasetConfig):
    c = cfg.channels
    return {r: np.frombuffer(rows.column(f"L{r}")[i].as_py(), np.uint8).reshape(r, r, c)
            for r in res}  # fmt: skip


def _check_classes(raw: str, flat: bool, class_names, empty, skipped, counts,
                   cfg: DatasetConfig) -> None:  # fmt: skip
    if empty and flat:
        detail = f" ({len(skipped)} skipped, e.g. {skipped[0]['path']}: {skipped[0]['reason']})"
        raise DataError(f"{raw}: the dataset folder has no usable image{detail if skipped else ''}")
    if empty and cfg.empty_class == "error":
        why = [s for s in skipped if s["path"].split("/")[0] == empty[0]]
        detail = f" ({len(why)} skipped, e.g. {why[0]['path']}: {why[0]['reason']})" if why else ""
        raise DataError(
            f"{raw}/{empty[0]}: class folder has no usable image{detail}; "
            "add images, remove the folder, or set empty_class: drop"
        )
    if len(empty) == len(class_names):
        raise DataError(f"{raw}: no usable image found ({len(skipped)} inputs skipped)")
    # A class no model can learn (none of its images is in train) is refused; one missing from
    # val or test (a few images) only thins those splits, and the manifest's counts show it.
    lacking = [c for c in class_names if c not in empty and counts["train"][c] == 0]
    if lacking:
        c = lacking[0]
        found = ", ".join(f"{s} {counts[s][c]}" for s in SPLITS)
        raise DataError(
            f"{raw}/{c}: class has no image in the train split ({found}; split by "
            f"{cfg.split_by}): no model can learn it; add images to it, or change the split"
        )


def save_preview(path: Path, levels: dict[int, np.ndarray], cols: int = 8):
    """One row per level (nearest-upscaled to the top size), one column per image: ``levels``
    maps each resolution to the (K, R, R, C) uint8 images to show."""
    from PIL import Image

    top = max(levels)
    rows = []
    for res in sorted(levels):
        imgs = levels[res][:cols]
        f = top // res
        imgs = imgs.repeat(f, axis=1).repeat(f, axis=2)
        rows.append(np.concatenate(list(imgs), axis=1))
    grid = np.concatenate(rows, axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
