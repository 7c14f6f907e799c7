from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The real digits dataset up to 16x16 (levels 4, 8, 16; materialized from scikit-learn,
    like the default)."""
    from gm.data.config import DatasetConfig
    from gm.data.prepare import prepare_dataset
    from gm.data.sources import materialize

    root = tmp_path_factory.mktemp("digits")
    materialize(root / "raw", only=["digits"], progress=False)
    cfg = DatasetConfig(top_resolution=16, channels=1, undersize="upscale", resample="bicubic")
    prepare_dataset(root / "raw/digits", root / "ds", cfg, progress=False)
    return root / "ds"


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


def wait_until_serving(proc: subprocess.Popen, url: str, name: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200; kill ``proc``'s group and fail the test if it exits
    or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{name} did not start (exit {proc.poll()})")
        time.sleep(0.3)


def registered_checkpoints(run_dirs) -> frozenset[str]:
    """The checkpoints Ray Train has registered in the runs ``run_dirs`` (its checkpoint
    manager's snapshot lists them among its checkpoint results): what a relaunch resumes from.
    A reported checkpoint's folder exists before that, and a run killed then resumes from the
    one before it."""
    names = set()
    for run in run_dirs:
        try:
            snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
            names |= {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
        except (OSError, ValueError, KeyError):  # not there yet, or being written
            continue
    return frozenset(names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on loopback (one worker, no job runner) over the SQLite file and
    artifact folder in ``store``; answers /health when this returns."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [
            BIN / "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store}/server.db",
            "--artifacts-destination",
            str(store / "server-artifacts"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until_serving(proc, f"http://127.0.0.1:{port}/health", "mlflow server", timeout=120)
    return proc


def stop_process_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback, stopped afterwards; yields its URI."""
    port = free_port()
    proc = start_mlflow_server(tmp_path, port)
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)


@pytest.fixture
def s3_server():
    """A real S3-protocol server on loopback (moto's standalone server) with a bucket
    ``gm-test``; yields the environment a client needs (endpoint, dummy credentials), which
    boto3, DVC's s3 remote and pyarrow's S3 filesystem (Ray's storage_path) all read."""
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    wait_until_serving(proc, endpoint + "/moto-api/", "moto_server", timeout=60)
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="gm-test")
    yield {"endpoint": endpoint, "env": env, "client": s3}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def chromium() -> str | None:
    """Debian's chromium (make test installs it where it can), or None."""
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(url: str, tmp_path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium (Debian's package)."""
    r = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout
