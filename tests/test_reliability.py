"""Reliability and security: a full disk while a checkpoint is written, files from another gm
version or another model, pickles that would run code, and the Ray dashboard's bind address."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gm
from gm.errors import DataError
from gm.train.checkpoint import load_checkpoint, save_checkpoint

from .conftest import REPO
from .test_models_contract import INFO, make

SOURCES = [p for d in ("gm", "pipelines", "bench") for p in (REPO / d).rglob("*.py")]


def saved(tmp_path, name="dcgan", steps=0):
    trainer, cfg = make(name)
    trainer.step = steps
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, name, cfg, INFO, trainer.state_dict())
    return path, trainer, cfg


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path, _, _ = saved(tmp_path, steps=7)
    before = path.read_bytes()
    # A child process whose file-size limit is half a checkpoint: the kernel refuses the write
    # (EFBIG) part-way, as a full disk would (ENOSPC).
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(REPO)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from tests.test_models_contract import INFO, make
from gm.train.checkpoint import save_checkpoint
trainer, cfg = make("dcgan", seed=3)
trainer.step = 8
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, {len(before) // 2}))
try:
    save_checkpoint({str(path)!r}, "dcgan", cfg, INFO, trainer.state_dict())
except OSError as e:
    print("refused:", e.errno, e)
    sys.exit(0)
sys.exit("the write did not fail")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("refused: 27"), r.stdout + r.stderr  # EFBIG
    assert f"{path}: checkpoint not written (File too large); the previous one is kept" in r.stdout
    assert path.read_bytes() == before  # the previous checkpoint, byte for byte
    assert load_checkpoint(path)["trainer"]["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


def test_a_checkpoint_of_another_format_names_both_gm_versions(tmp_path):
    path, _, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload |= {"format_version": 99, "gm_version": "9.0.0"}
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(DataError) as e:
        load_checkpoint(tmp_path / "future.pt")
    assert "future.pt: checkpoint format 99 written by gm 9.0.0" in str(e.value)
    assert f"this gm {gm.__version__} reads format 1" in str(e.value)
    # Another gm version writing the same format is read (the format, not the release, decides).
    payload |= {"format_version": 1, "gm_version": "0.0.1"}
    torch.save(payload, tmp_path / "older.pt")
    assert load_checkpoint(tmp_path / "older.pt", family="dcgan")["gm_version"] == "0.0.1"


class RunsCode:
    """A pickle payload that would create a file when unpickled with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    from gm.metrics.classifier import load_classifier

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": RunsCode(marker)}, evil)
    with pytest.raises(DataError, match="evil.pt: truncated or corrupt checkpoint"):
        load_checkpoint(evil)
    with pytest.raises(DataError, match="evil.pt"):
        load_classifier(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the same file, unpickled unsafely, does run code
    assert marker.exists()


def test_every_torch_load_in_gm_is_weights_only():
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw[
                    "weights_only"
                ].value is True  # fmt: skip
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert len(calls) >= 4  # checkpoints, classifiers, Inception and VGG weights
    assert [c for c, safe in calls if not safe] == []
    assert not any("pickle.load" in p.read_text() for p in SOURCES)


def test_a_local_ray_serves_its_dashboard_and_jobs_api_on_loopback_only():
    code = """
import json, os
os.environ.pop("RAY_ADDRESS", None)
from gm.train.job import init_ray
from gm.train.ray_train import RunSettings
init_ray(RunSettings())
import ray
from ray._private.worker import global_worker
print(json.dumps({"url": global_worker.node.address_info["webui_url"],
                  "api": os.environ.get("RAY_API_SERVER_ADDRESS")}))
ray.shutdown()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["url"].startswith("127.0.0.1:"), out
    # the State API of this process and of every Ray worker goes to this instance
    assert out["api"] == f"http://{out['url']}"


def test_a_ray_that_cannot_start_is_a_gm_error_not_a_traceback(tmp_path):
    import os

    from .conftest import BIN

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_TMPDIR": str(not_a_dir)
    }
    code = "from gm.cli import guarded\nfrom gm.train.job import init_ray\n" \
        "from gm.train.ray_train import RunSettings\n" \
        "raise SystemExit(guarded(init_ray)(RunSettings()) or 0)"  # fmt: skip
    r = subprocess.run([BIN / "python", "-c", code], capture_output=True, text=True,
                       timeout=300, env=env)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a local Ray did not start (NotADirectoryError"), last
    assert "Traceback" not in r.stderr and "ray stop --force" in last


@pytest.mark.slow
def test_ctrl_c_during_training_exits_130_and_a_second_local_ray_stays_quiet(ray_local, project):
    # Ctrl-C ended `gm train` with exit 1; and with a second local Ray on the host (here the
    # test session's), Ray Train's placement-group cleaner printed "Found multiple active Ray
    # instances" at every poll.
    import os
    import signal
    import time

    import yaml

    from .conftest import BIN

    params = {"datasets": {"toy": {"top_resolution": 16}}, "train": {"toy": {
        "family": "dcgan", "dataset": "toy", "model": {"z_dim": 8, "ngf": 8, "ndf": 8},
        "run": {"steps": 100000, "batch_size": 4, "checkpoint_every": 20}}}}  # fmt: skip
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    log = (project / "train.log").open("w")
    proc = subprocess.Popen([BIN / "gm", "train", "toy"], cwd=project, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((project / "runs").glob("*/checkpoint_*")):  # training is under way
        alive = proc.poll() is None and time.monotonic() < deadline
        assert alive, (project / "train.log").read_text()[-3000:]
        time.sleep(1)
    time.sleep(8)  # several of the cleaner's polls
    os.kill(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (project / "train.log").read_text()
    assert code == 130, out[-3000:]
    assert out.rstrip().endswith("interrupted")
    assert "Found multiple active Ray instances" not in out


@pytest.mark.slow
def test_training_outlives_an_mlflow_server_that_goes_away_and_flushes_when_it_returns(
    ray_local, project, tmp_path, monkeypatch
):
    import threading
    import time

    from mlflow import MlflowClient

    from gm.train.job import TrainConfig, run_job
    from gm.train.ray_train import RunSettings

    from .conftest import free_port, start_mlflow_server, stop_process_group
    from .test_models_contract import TINY

    store, port = tmp_path / "store", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = [start_mlflow_server(store, port)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    marker = tmp_path / "pause"

    def outage():
        while not (marker.exists() and marker.read_text() == "paused"):
            time.sleep(0.05)
        stop_process_group(server[0])  # the server goes away at step 5
        marker.write_text("go")
        time.sleep(8)  # steps 6-16 train meanwhile; the flushes at 8 and 12 find no server
        server[0] = start_mlflow_server(store, port)  # the same store comes back

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    run = RunSettings(steps=16, batch_size=4, checkpoint_every=4)
    cfg = TrainConfig(family="dcgan", dataset="toy", model=TINY["dcgan"], run=run)
    try:
        m = run_job(
            "toy",
            cfg,
            project / "datasets/pyramid/toy",
            project / "models/toy",
            project,
            progress=False,
            fault_injection={"step": 5, "marker": str(marker), "action": "pause"},
        )
        thread.join(timeout=120)
        client = MlflowClient(uri)
        r = client.get_run(m["mlflow_run_id"])
        assert r.info.status == "FINISHED" and m["step"] == 16
        # Every step's metrics reached the server, including those of the outage.
        steps = [x.step for x in client.get_metric_history(r.info.run_id, "loss/D")]
        assert steps == list(range(1, 17))
        assert r.data.metrics["mlflow_offline_s"] > 1.0
        grids = [f.path for f in client.list_artifacts(r.info.run_id, "images")]
        assert len([g for g in grids if g.endswith(".png")]) == 4  # steps 4, 8, 12, 16
        assert [x.value for x in client.get_metric_history(r.info.run_id, "start_step")] == [0]
    finally:
        stop_process_group(server[0])


def test_with_ray_gives_every_stage_of_a_command_one_ray_sized_for_its_params(tmp_path):
    # `make repro` runs `gm with-ray -- dvc repro`: each stage attaches to one local Ray
    # instead of starting its own; it has the CPUs the params' biggest job asks for, the
    # command's exit status comes back, and the Ray is gone afterwards.
    import os
    import socket

    import yaml

    from .conftest import BIN

    params = {"datasets": {"toy": {"top_resolution": 16}},
              "train": {"big": {"family": "dcgan", "dataset": "toy",
                                "run": {"num_workers": 3, "cpus_per_worker": 2}}}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "stage.py").write_text(
        "import json, os, sys\n"
        "from gm.cluster import init_ray\n"
        "init_ray()\n"
        "import ray\n"
        "ctx = ray.get_runtime_context()\n"
        "print(json.dumps({'env': os.environ['RAY_ADDRESS'], 'gcs': ctx.gcs_address,\n"
        "                  'cpus': ray.cluster_resources()['CPU'],\n"
        "                  'local': os.environ.get('GM_RAY_LOCAL')}))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    script = f"{BIN / 'python'} stage.py > a.json && {BIN / 'python'} stage.py > b.json; exit 3"
    r = subprocess.run([BIN / "gm", "with-ray", "--", "sh", "-c", script], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a == b and a["gcs"] == a["env"], (a, b)  # both stages on the same Ray
    assert a["local"] == "1"  # marked this machine's own (gm.data.prepare stays in-process)
    assert a["cpus"] == max(os.cpu_count() or 1, 6)
    host, port = a["gcs"].rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=5):
        pass  # its GCS stopped with the command


def test_with_ray_leaves_a_command_on_the_cluster_ray_address_names(tmp_path):
    import os

    from .conftest import BIN

    env = os.environ | {"RAY_ADDRESS": "10.0.0.7:6379"}
    cmd = [BIN / "gm", "with-ray", "--", "sh", "-c", "echo $RAY_ADDRESS"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "10.0.0.7:6379", r.stderr[-2000:]
    assert "Started a local Ray" not in r.stderr
    r = subprocess.run([BIN / "gm", "with-ray", "--", "no-such-command-here"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: with-ray: cannot run 'no-such-command-here' (No such file or directory)"
    )
