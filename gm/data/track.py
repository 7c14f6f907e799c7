"""The raw data folder and its ``.dvc`` file: check the hash, fill the local cache."""

from __future__ import annotations

import os
from pathlib import Path

from gm.errors import DataError


def verify_tracked(dvc_file: str | os.PathLike) -> str:
    """Raise DataError unless the tracked folder matches ``dvc_file``; cache it if needed.

    Returns a short description of what was found ("up to date" or "added to the DVC cache").
    """
    from dvc.repo import Repo

    dvc_file = Path(dvc_file).resolve()
    if not dvc_file.is_file():
        raise DataError(f"{dvc_file}: no such .dvc file")
    with Repo(str(dvc_file.parent)) as repo:
        rel = os.path.relpath(dvc_file, repo.root_dir)
        status = repo.status(targets=[rel])
        changes: dict[str, str] = {}
        for entry in status.get(rel, []):
            if isinstance(entry, dict):
                changes.update(entry.get("changed outs", {}))
        bad = {path: why for path, why in changes.items() if why != "not in cache"}
        if bad:
            path, why = next(iter(bad.items()))
            raise DataError(
                f"{path} is {why} with respect to {rel}. To keep your change: `dvc add {path}` "
                f"and commit {rel}; to restore the recorded data: `dvc checkout {rel}` "
                f"(or delete {path} and run `make repro`)."
            )
        if changes:
            repo.commit(rel, force=True)
            return "matches; added to the DVC cache"
    return "up to date"
