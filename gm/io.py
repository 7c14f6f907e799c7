"""Atomic file and directory output: write to a temporary sibling, then rename.

A reader (or DVC) never sees a half-written file: either the old output, or the new one, or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _tmp_sibling(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "dir":
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    tmp = _tmp_sibling(path, "file")
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries a killed writer of ``path`` left behind (one writer per path)."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (old contents removed).

    Temporaries left by a killed earlier writer of the same path are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path, "dir")
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = _tmp_sibling(path, "dir")
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``folder``; on success each file written there
    replaces (atomically, one ``os.replace`` each) the file (or folder) of the same name in
    ``folder``,
    which is created if missing. Other files in ``folder`` are left as they are: a DVC stage
    whose outputs are files inside a folder must not delete the ``.gitignore`` DVC keeps
    beside them (:func:`atomic_dir` replaces the whole folder). On error nothing in
    ``folder`` changes and the temporary is removed."""
    folder = Path(folder)
    remove_stale_temporaries(folder)
    tmp = _tmp_sibling(folder, "dir")
    try:
        yield tmp
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.chmod(f, 0o644 if f.is_file() else 0o755)
            target = folder / f.name
            if f.is_dir() and target.is_dir():  # a folder replaces a folder: old one aside
                old = _tmp_sibling(target, "dir")  # empty: rename(2) replaces it
                os.replace(target, old)
                os.replace(f, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(f, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
