from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests: its dvc, gm, python
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    """Write an image file (creating folders); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kw) if mode else Image.fromarray(array).save(
        path, **kw
    )
    return path


def random_rgb(rng: np.random.Generator, h: int, w: int | None = None) -> np.ndarray:
    return rng.integers(0, 256, (h, w or h, 3), dtype=np.uint8)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def raw_folder(tmp_path, rng) -> Path:
    """A small raw folder: 3 classes of random 32x32 RGB PNGs (12, 10, 8 images)."""
    root = tmp_path / "raw" / "toy"
    for cls, n in (("cats", 12), ("dogs", 10), ("owls", 8)):
        for i in range(n):
            save(root / cls / f"{i:03d}.png", random_rgb(rng, 32))
    return root


@pytest.fixture
def toy_dataset(raw_folder, tmp_path) -> Path:
    """``raw_folder`` prepared as a pyramid up to 16x16 (levels 4, 8, 16)."""
    from gm.data.config import DatasetConfig
    from gm.data.prepare import prepare_dataset

    out = tmp_path / "ds"
    prepare_dataset(raw_folder, out, DatasetConfig(top_resolution=16), progress=False)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (never attaches to a cluster)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # More logical CPUs than cores, so Ray Data read tasks never starve (PITFALLS.md).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def git(root, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def project(tmp_path, raw_folder):
    """A git + DVC repository: data.dvc, a prepared 16x16 dataset and a stage `train` that
    depends on it."""
    from gm.data.config import DatasetConfig
    from gm.data.prepare import prepare_dataset

    root = tmp_path / "proj"
    root.mkdir()
    (root / "data.dvc").write_text(
        yaml.safe_dump({"outs": [{"md5": "abc123.dir", "path": "data", "hash": "md5"}]})
    )
    stage = {"cmd": "echo ok", "deps": ["datasets/pyramid/toy", "notes.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    (root / "notes.txt").write_text("a dependency\n")
    prepare_dataset(
        raw_folder, root / "datasets/pyramid/toy", DatasetConfig(top_resolution=16), progress=False
    )
    (root / ".gitignore").write_text("datasets/\nruns/\nmodels/\nmlflow.db\nmlartifacts/\n")
    git(root, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root
