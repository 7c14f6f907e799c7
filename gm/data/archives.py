"""Raw inputs inside archives: StyleGAN dataset zips and WebDataset tar shards.

- **StyleGAN dataset zip** (the layout of NVlabs' ``dataset_tool.py``): image files at any
  depth, and an optional ``dataset.json`` whose ``labels`` is a list of ``[name, class index]``
  (or null: unconditional). Class names are the indices as text ("0", "1", ...), in numeric
  order; without labels the zip is one class named after its stem.
- **WebDataset tar shard**: files grouped into samples by key (the path up to the first dot of
  the file name); a sample's image is its member with an image extension (``jpg``, ``png``,
  ...), its class the text of its ``cls`` member (an index or a name). A shard whose samples
  have no ``cls`` is one class named after the raw folder.

Listing reads only the archives' directories (zip central directory, tar headers); the bytes
of an image are read when its batch is processed: by name from a zip, by offset and size from
an uncompressed tar (no second scan). Entries that are not images, or images without a label
where the archive has labels, are skipped and listed, as files in a folder are; an archive
that cannot be read is a DataError naming it.
"""

from __future__ import annotations

import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gm.errors import DataError

IMAGE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
}


@dataclass(frozen=True)
class RawItem:
    """One input. ``id``: its path relative to the raw folder (``file:row`` or the table's
    ``id`` for Parquet input; ``archive/member`` inside an archive). Its bytes: the file
    ``path``; row ``row`` of the Parquet table ``path``; member ``member`` of the zip ``path``;
    or ``size`` bytes at ``offset`` of the tar ``path``."""

    id: str
    class_name: str
    path: str
    row: int = -1  # >= 0: a Parquet row
    member: str = ""  # a zip member
    offset: int = -1  # >= 0: a tar member's data
    size: int = -1


Scanned = tuple[list[RawItem], list[str], list[dict[str, str]]]


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def scan_zip(path: Path) -> Scanned:
    """(items, class names, skipped) of a StyleGAN dataset zip."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            labels = None
            if "dataset.json" in z.namelist():
                try:
                    labels = json.loads(z.read("dataset.json")).get("labels")
                except (ValueError, AttributeError) as e:
                    raise DataError(f"{path}: dataset.json is not valid JSON ({e})") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable zip archive ({e})") from None
    by_name: dict[str, str] | None = None
    if labels is not None:
        try:
            by_name = {str(name): str(int(label)) for name, label in labels}
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: dataset.json 'labels' must be a list of [file name, class index]"
            ) from None
    items, skipped = [], []
    for info in sorted(infos, key=lambda i: i.filename):
        name = info.filename
        if name == "dataset.json" or PurePosixPath(name).name.startswith("."):
            continue
        where = f"{path.name}/{name}"
        if not _is_image(name):
            skipped.append({"path": where, "reason": "not an image file"})
            continue
        if by_name is None:
            cls = path.stem
        elif name in by_name:
            cls = by_name[name]
        else:
            skipped.append({"path": where, "reason": "no label in dataset.json"})
            continue
        items.append(RawItem(where, cls, str(path.resolve()), member=name))
    classes = sorted({it.class_name for it in items}, key=_class_order)
    return items, classes, skipped


def _class_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def scan_tar(path: Path, default_class: str) -> Scanned:
    """(items, class names, skipped) of one WebDataset tar shard (uncompressed)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as t:
            labels: dict[str, str] = {}
            for m in t:
                if not m.isfile():
                    continue
                parent, base = PurePosixPath(m.name).parent, PurePosixPath(m.name).name
                if base.startswith(".") or "." not in base:
                    continue
                key, ext = f"{parent}/{base.split('.', 1)[0]}", base.split(".", 1)[1].lower()
                samples.setdefault(key.removeprefix("./"), {})[ext] = m
                if ext == "cls":
                    f = t.extractfile(m)
                    labels[key.removeprefix("./")] = f.read().decode().strip() if f else ""
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: not a readable (uncompressed) tar shard ({e})") from None
    items, skipped = [], []
    for key in sorted(samples):
        members = samples[key]
        images = sorted(ext for ext in members if _is_image(f"x.{ext}"))
        where = f"{path.name}/{key.removeprefix('./')}"
        if not images:
            exts = ", ".join(sorted(members))
            skipped.append({"path": where, "reason": f"no image in the sample ({exts})"})
            continue
        if labels and key not in labels:
            skipped.append({"path": where, "reason": "no cls label in the sample"})
            continue
        m = members[images[0]]
        cls = labels.get(key, default_class) or default_class
        items.append(RawItem(f"{where}.{images[0]}", cls, str(path.resolve()),
                             offset=m.offset_data, size=m.size))  # fmt: skip
    classes = sorted({it.class_name for it in items}, key=_class_order)
    return items, classes, skipped


def scan_archives(raw: Path, archives: list[Path], default_class: str) -> Scanned:
    """``archives`` (the ``*.zip`` or ``*.tar`` of ``raw``, one kind per dataset), merged;
    ``default_class`` names the class of unlabelled tar samples."""
    kinds = {p.suffix for p in archives}
    if len(kinds) > 1:
        raise DataError(f"{raw}: holds both zip and tar archives; use one kind per dataset")
    items, skipped, classes = [], [], set()
    for path in archives:
        got = scan_zip(path) if path.suffix == ".zip" else scan_tar(path, default_class)
        items += got[0]
        classes |= set(got[1])
        skipped += got[2]
    if not items:
        detail = f": {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise DataError(f"{raw}: the archives hold no usable image{detail}")
    return items, sorted(classes, key=_class_order), skipped


def read_members(items: list[tuple[int, RawItem]]) -> tuple[dict[int, bytes], dict[int, str]]:
    """({batch position: encoded bytes}, {batch position: why it could not be read}) of
    archive members, opening each archive once. A member that cannot be read (a bad CRC, an
    unsupported compression, a shard cut short) is an invalid input, as a corrupt file is."""
    out: dict[int, bytes] = {}
    bad: dict[int, str] = {}
    by_path: dict[str, list[tuple[int, RawItem]]] = {}
    for pos, it in items:
        by_path.setdefault(it.path, []).append((pos, it))
    for path, group in by_path.items():
        if path.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                for pos, it in group:
                    try:
                        out[pos] = z.read(it.member)
                    except (zipfile.BadZipFile, OSError, NotImplementedError, KeyError) as e:
                        bad[pos] = f"unreadable zip member ({type(e).__name__}: {e})"
        else:
            with open(path, "rb") as f:
                for pos, it in sorted(group, key=lambda g: g[1].offset):
                    f.seek(it.offset)
                    data = f.read(it.size)
                    if len(data) == it.size:
                        out[pos] = data
                    else:
                        bad[pos] = f"tar member cut short ({len(data)} of {it.size} bytes)"
    return out, bad
