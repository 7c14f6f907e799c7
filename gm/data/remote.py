"""Raw images on object storage (``s3://bucket/prefix``, any URI pyarrow's filesystems open).

The layout is a raw folder's: one prefix per class under ``prefix`` (objects directly under it
are skipped and listed), or objects only (one class named after the prefix's last part).
Listing reads object names only; each image's bytes are read when its batch is processed, one
filesystem client per batch. Credentials and endpoint come from the environment as for any
AWS client (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an
S3-compatible server such as MinIO). Parquet tables and archives on object storage are not
supported yet: copy them to a local or mounted path.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from gm.data.archives import IMAGE_SUFFIXES, RawItem, Scanned
from gm.errors import DataError


def is_uri(raw: object) -> bool:
    return isinstance(raw, str) and "://" in raw


def _filesystem(uri: str):
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{uri}: cannot open this location ({e})") from None


def scan_uri(uri: str) -> Scanned:
    """(items, class names, skipped) of a raw prefix on object storage."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri.rstrip("/"))
    scheme = uri.split("://", 1)[0]
    try:
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            raise DataError(f"{uri}: no such prefix (nothing stored under it)")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise DataError(f"{uri}: cannot list it ({e})") from None
    rels = sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)
    rels = [r for r in rels if not any(p.startswith(".") for p in r.split("/"))]
    for r in rels:
        if PurePosixPath(r).suffix.lower() in {".parquet", ".zip", ".tar"}:
            raise DataError(
                f"{uri}/{r}: Parquet tables and archives on object storage are not supported "
                "yet; copy them to a local or mounted folder"
            )
    nested = any("/" in r for r in rels)
    name = PurePosixPath(root).name
    items, skipped, classes = [], [], set()
    for r in rels:
        if nested and "/" not in r:
            skipped.append({"path": r, "reason": "file outside a class folder"})
            continue
        suffix = PurePosixPath(r).suffix
        if suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"path": r, "reason": f"not an image file (suffix {suffix!r})"})
            continue
        cls = r.split("/", 1)[0] if nested else name
        classes.add(cls)
        items.append(RawItem(r, cls, f"{scheme}://{root}/{r}"))
    if not items:
        detail = f" ({skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise DataError(f"{uri}: no image under this prefix{detail}")
    return items, sorted(classes), skipped


def read_objects(items: list[tuple[int, str]]) -> tuple[dict[int, bytes], dict[int, str]]:
    """({batch position: bytes}, {batch position: why not}) of objects by URI, with one
    filesystem client for the batch."""
    out: dict[int, bytes] = {}
    bad: dict[int, str] = {}
    if not items:
        return out, bad
    fs, _ = _filesystem(items[0][1])
    for pos, uri in items:
        try:
            with fs.open_input_stream(uri.split("://", 1)[1]) as f:
                out[pos] = f.read()
        except OSError as e:
            bad[pos] = f"unreadable object ({e})"
    return out, bad
