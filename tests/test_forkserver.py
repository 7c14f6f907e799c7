"""gm.forkserver: a pipeline stage run through the fork server behaves as its own process
would (argv, working directory, environment, standard streams, exit status, Ctrl-C, a killed
caller) while skipping the imports; a request it cannot serve runs in the caller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import BIN

PROBE = """\
import json, os, sys, time
from gm.forkserver import run_main

def main():
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[1:],
                      "cwd": os.getcwd(), "x": os.environ.get("PROBE_X"),
                      "torch_loaded": "torch" in sys.modules}), flush=True)
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "sleep":
        import subprocess
        child = subprocess.Popen(["sleep", "120"])
        open("child.pid", "w").write(str(child.pid))
        open("stage.pid", "w").write(str(os.getpid()))
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            open("interrupted", "w").write("yes")
            raise
    if sys.argv[1] == "raise":
        raise RuntimeError("probe failed")
    return int(sys.argv[1]) if sys.argv[1].isdigit() else 0

if __name__ == "__main__":
    code = run_main(__spec__.name, main)
    sys.stdout.flush()
    os._exit(code)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gm import forkserver

    root = tmp_path_factory.mktemp("forkserver")
    (root / "probe_stage.py").write_text(PROBE)
    cwd = os.getcwd()
    os.chdir(root)  # the server's sys.path[0]: the source tree it serves
    try:
        started = forkserver.start(dict(os.environ))
    finally:
        os.chdir(cwd)
    assert started, "no fork server on this platform"
    proc, path = started
    assert os.path.exists(path) and proc.poll() is None  # start() returns once it listens
    yield root, path
    forkserver.stop(proc, path)
    assert not os.path.exists(path)


def probe(root, path, *args, cwd=None, **kw):
    env = os.environ | {"GM_FORKSERVER": path, "PROBE_X": "from the caller"}
    return subprocess.Popen([BIN / "python", "-m", "probe_stage", *args], cwd=cwd or root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # fmt: skip


def test_a_stage_runs_in_the_server_with_the_callers_argv_cwd_env_streams_and_status(server):
    root, path = server
    proc = probe(root, path, "3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    seen = json.loads(out)
    # A fork of the server (torch already imported there), not the caller's process.
    assert seen["torch_loaded"] and seen["ppid"] != proc.pid and seen["pid"] != proc.pid
    assert seen["argv"] == ["3"] and seen["cwd"] == str(root)
    assert seen["x"] == "from the caller" and err.strip() == "to stderr"

    proc = probe(root, path, "raise")  # an uncaught exception: traceback, exit 1
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "RuntimeError: probe failed" in err


def test_a_request_from_another_source_tree_runs_in_the_caller(server, tmp_path):
    root, path = server
    (tmp_path / "probe_stage.py").write_text(PROBE)
    proc = probe(root, path, "0", cwd=tmp_path)  # sys.path[0] is tmp_path, not the server's
    out, err = proc.communicate(timeout=120)
    seen = json.loads(out)
    assert proc.returncode == 0 and seen["pid"] == proc.pid and not seen["torch_loaded"]


def test_no_server_listening_runs_in_the_caller(tmp_path):
    (tmp_path / "probe_stage.py").write_text(PROBE)
    proc = probe(tmp_path, str(tmp_path / "no-socket"), "5")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 5 and json.loads(out)["pid"] == proc.pid


def wait_for_pid(root) -> int:
    deadline = time.monotonic() + 60
    while not (root / "stage.pid").exists() or not (root / "stage.pid").read_text():
        assert time.monotonic() < deadline, "the stage did not start"
        time.sleep(0.05)
    return int((root / "stage.pid").read_text())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_reaches_the_stage_and_a_killed_caller_kills_it(server):
    root, path = server
    for name in ("stage.pid", "interrupted"):
        (root / name).unlink(missing_ok=True)
    proc = probe(root, path, "sleep")
    pid = wait_for_pid(root)
    assert pid != proc.pid and alive(pid)
    proc.send_signal(signal.SIGINT)  # the caller forwards it: KeyboardInterrupt in the stage
    proc.communicate(timeout=60)
    assert proc.returncode == 130 and (root / "interrupted").read_text() == "yes"
    assert not alive(pid)

    (root / "stage.pid").unlink()
    proc = probe(root, path, "sleep")
    pid = wait_for_pid(root)
    child = int((root / "child.pid").read_text())
    assert alive(child)
    proc.kill()  # as `kill -9` of a dvc repro's stage process
    proc.wait()
    deadline = time.monotonic() + 30
    while alive(pid) or alive(child):  # the stage and what it started
        assert time.monotonic() < deadline, "the stage outlived its killed caller"
        time.sleep(0.05)


def test_a_stage_killed_by_a_signal_kills_its_caller_with_it(server):
    root, path = server
    (root / "stage.pid").unlink(missing_ok=True)
    proc = probe(root, path, "sleep")
    os.kill(wait_for_pid(root), signal.SIGKILL)
    os.kill(int((root / "child.pid").read_text()), signal.SIGKILL)  # it holds stdout open
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_with_ray_serves_pipeline_stages_from_one_server(tmp_path):
    # `gm with-ray -- <cmd>` exports GM_FORKSERVER; a pipeline module run under it is a fork
    # of the server; GM_FORKSERVER=0 turns the server off.
    cmd = f"{BIN / 'python'} -m probe_stage 0 && echo $GM_FORKSERVER"
    (tmp_path / "probe_stage.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "GM_FORKSERVER"}
    env["RAY_ADDRESS"] = "127.0.0.1:1"  # a cluster: with-ray starts no Ray of its own
    r = subprocess.run([BIN / "gm", "with-ray", "--", "sh", "-c", cmd], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    first, sock = r.stdout.strip().splitlines()
    assert json.loads(first)["torch_loaded"] and sock.endswith("socket")
    assert not os.path.exists(sock)  # removed with the server
    r = subprocess.run([BIN / "gm", "with-ray", "--", "sh", "-c", cmd], cwd=tmp_path,
                       env=env | {"GM_FORKSERVER": "0"}, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and not json.loads(r.stdout.splitlines()[0])["torch_loaded"]


def test_every_pipeline_stage_goes_through_run_main():
    from .conftest import REPO

    for path in sorted((REPO / "pipelines").glob("*.py")):
        if path.name != "__init__.py":
            assert "exit_now(run_main(__spec__.name, main))" in path.read_text(), path.name
    assert sys.platform != "linux" or hasattr(os, "pidfd_open")


def test_an_orphaned_server_exits_and_removes_its_socket(tmp_path):
    # `gm with-ray` killed with SIGKILL cannot stop its server: the server notices (its parent
    # changed) within about a second and exits.
    sock = tmp_path / "socket"
    code = f"from gm.forkserver import serve; serve({str(sock)!r}, preimport=())"
    parent = subprocess.Popen(["sh", "-c", f"{BIN / 'python'} -c \"{code}\" & echo $!; sleep 2"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    pid = int(parent.stdout.readline())
    assert parent.wait(timeout=30) == 0
    deadline = time.monotonic() + 30
    while alive(pid) or sock.exists():
        assert time.monotonic() < deadline, "the orphaned server is still running"
        time.sleep(0.1)
