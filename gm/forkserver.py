"""A fork server for pipeline stages: one process imports torch, torchvision, Ray, MLflow,
torchmetrics and gm once; each stage's ``python -m pipelines.<stage>`` then runs as a fork of
it instead of importing them again (8 to 14 s per stage process on 2 cores, measured).

``gm with-ray`` starts the server (:func:`start`) and exports its socket as ``GM_FORKSERVER``
to the command it runs (``dvc repro``). A stage's ``__main__`` calls :func:`run_main`, which,
when ``GM_FORKSERVER`` is set, sends the server its module, argv, working directory,
environment and standard streams (the file descriptors themselves, ``SCM_RIGHTS``) and waits
for the exit status; without a server, or one that cannot run it (another interpreter or
source tree, a server not yet listening), the stage runs in its own process as before. The
same scheme as Python's ``multiprocessing`` forkserver start method and Android's zygote.

Per request the server forks a *supervisor*, which forks the *stage*; neither process ever
starts a thread before it forks. The supervisor relays what the stage process would have seen
from its caller: the signals the client receives (SIGINT, SIGTERM, SIGHUP: Ctrl-C stops a
stage cleanly) and SIGKILL when the client dies (a ``dvc repro`` killed with SIGKILL leaves
no stage running), each to the stage's own process group (it and the processes it started);
and the stage's exit status back to the client, which exits with it (or dies of the same
signal). DVC sees the same process lifetime and status as without the server.

The server preimports modules only and runs nothing else (no torch operation, no Ray or MLflow
connection), so no OpenMP pool, gRPC channel or pyarrow thread pool exists to be forked. The
native helper threads some libraries start at import (torch, OpenBLAS under scipy, jemalloc
under pyarrow) are the ones a torch ``DataLoader`` forks past on Linux, and those libraries
register fork handlers; a Python thread would not be safe to fork past, and with one running
:func:`serve` refuses every request.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys

ENV = "GM_FORKSERVER"  # the server's socket path; "0" or empty: no server
PREIMPORT = (
    "torch", "torchvision", "numpy", "pyarrow", "pyarrow.parquet", "PIL.Image", "yaml",
    "ray", "ray.train", "ray.train.torch", "ray.tune", "ray.data", "mlflow", "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store", "torchmetrics", "sklearn.metrics", "optuna",
    "matplotlib.pyplot", "constriction", "bjontegaard",
    "gm.params", "gm.cli", "gm.tracking", "gm.train.job", "gm.train.ray_train", "gm.models",
    "gm.metrics.evaluate", "gm.metrics.rd", "gm.data.prepare", "gm.data.pairs", "gm.tune",
    "gm.detect", "gm.codec", "gm.compress", "gm.plots", "gm.sample",
)  # fmt: skip
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct("!I")
_in_stage = False  # set in a stage process forked by the server: it runs main itself


def run_main(module: str, main) -> int:
    """Run a pipeline stage: in the fork server named by ``GM_FORKSERVER`` when there is one
    that can run it, else ``main()`` here. Returns the exit status (a stage killed by a signal
    in the server makes this process die of the same signal)."""
    path = os.environ.get(ENV, "")
    if _in_stage or path in ("", "0"):
        return main()
    status = _delegate(path, module)
    return main() if status is None else status


def _send(sock: socket.socket, obj, fds=()) -> None:
    data = json.dumps(obj).encode()
    socket.send_fds(sock, [_HEADER.pack(len(data)) + data], list(fds))


def _recv(sock: socket.socket, maxfds: int = 0):
    """One message (and up to ``maxfds`` file descriptors); (None, []) at end of stream."""
    head, fds, _, _ = socket.recv_fds(sock, _HEADER.size, maxfds)
    if not head:
        return None, fds
    head += _read(sock, _HEADER.size - len(head))
    return json.loads(_read(sock, _HEADER.unpack(head)[0])), fds


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("fork server: message cut short")
        data += chunk
    return data


def _delegate(path: str, module: str) -> int | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = {"module": module, "argv": sys.argv, "cwd": os.getcwd(),
                   "env": dict(os.environ), "path0": sys.path[0],
                   "executable": sys.executable}  # fmt: skip
        _send(sock, request, fds=(0, 1, 2))
        reply, _ = _recv(sock)
    except OSError:  # no server (yet), or it went away: run here
        sock.close()
        return None
    if not reply or "refused" in reply:
        sock.close()
        return None

    def forward(signum, frame):
        try:
            sock.sendall(bytes([signum]))
        except OSError:
            pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    status, _ = _recv(sock)  # a forwarded signal interrupts recv, which resumes (PEP 475)
    if status is None:  # the supervisor died: nothing to report
        return 1
    if "signal" in status:
        sig = status["signal"]
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two keep no handler
            signal.signal(sig, signal.SIG_DFL)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), sig)
        return 128 + sig
    return status["exit"]


def _preimport(names) -> None:
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a module that fails here fails in the stage
            print(f"fork server: {name} not preimported ({type(e).__name__}: {e})",
                  file=sys.stderr)  # fmt: skip


def serve(path: str, preimport=PREIMPORT) -> None:
    """Listen on the unix socket ``path``, import the modules ``preimport`` names, then serve
    stages until terminated, or until orphaned (then the socket is removed). Refuses (the
    client then runs the stage itself) a request from another interpreter or source tree
    (``sys.path[0]``), or when the preimports left a Python thread running."""
    source_tree = sys.path[0]  # before the imports: Ray puts its third-party folder first
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    _preimport(preimport)
    import threading

    threads = threading.active_count()
    unsafe = threads > 1 and f"{threads} Python threads after the imports"
    if unsafe:
        print(f"fork server: {unsafe}; every stage runs in its own process", file=sys.stderr)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    try:
        _accept_loop(listener, source_tree, unsafe)
    finally:
        listener.close()
        if os.path.exists(path):
            os.unlink(path)


def _accept_loop(listener: socket.socket, source_tree: str, unsafe) -> None:
    parent = os.getppid()
    while True:
        if not select.select([listener], [], [], 1.0)[0]:
            if os.getppid() != parent:  # `gm with-ray` died without stopping us
                break
            continue
        conn, _ = listener.accept()
        try:
            request, fds = _recv(conn, maxfds=3)
        except (OSError, ValueError):
            conn.close()
            continue
        refused = (
            unsafe
            or (request is None or len(fds) != 3) and "bad request"
            or request["executable"] != sys.executable and "another interpreter"
            or request["path0"] != source_tree and f"another source tree ({request['path0']})"
        )  # fmt: skip
        if refused:
            try:
                _send(conn, {"refused": refused})
            except OSError:
                pass
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        sys.stdout.flush()  # nothing buffered here may be written again by every stage
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            _supervise(conn, request, fds)  # never returns
        conn.close()
        for fd in fds:
            os.close(fd)


def _supervise(conn: socket.socket, request: dict, fds: list[int]) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_stage(request, fds)  # never returns
        try:  # the stage leads a process group of its own (as a shell's job), set by both
            os.setpgid(pid, pid)  # processes so no signal finds it before
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        _send(conn, {"pid": pid})
        pidfd = os.pidfd_open(pid)
        client_gone = False
        while True:
            ready, _, _ = select.select([conn, pidfd], [], [])
            if pidfd in ready:
                break
            data = b"" if client_gone else conn.recv(16)
            if not data:  # the client died: so does its stage (as a process killed would)
                client_gone = True
                _signal_group(pid, signal.SIGKILL)
                select.select([pidfd], [], [])
                break
            for sig in data:
                _signal_group(pid, sig)
        _, status = os.waitpid(pid, 0)
        if not client_gone:
            if os.WIFSIGNALED(status):
                _send(conn, {"signal": os.WTERMSIG(status)})
            else:
                _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
        code = 0
    finally:
        os._exit(code)


def _signal_group(pid: int, sig: int) -> None:
    """``sig`` to the stage and the processes it started, as a terminal's Ctrl-C reaches a
    foreground job's whole process group."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        os.kill(pid, sig)


def _run_stage(request: dict, fds: list[int]) -> None:
    global _in_stage
    code = 1
    try:
        _in_stage = True
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=os.isatty(stream.fileno()) or stream is sys.stderr,
                               write_through=unbuffered)  # fmt: skip
        sys.argv = list(request["argv"])
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # as the interpreter exits: None is 0, a message is 1
            code = 0 if e.code is None else e.code
            if not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # noqa: BLE001 - reported as the interpreter would
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def start(env: dict[str, str]):
    """Start a fork server for a command run with ``env`` and wait until it listens (its imports
    go on while the command starts); returns (process, socket path), or None where unavailable
    (not Linux, or ``GM_FORKSERVER=0``). The server gets ``env`` too, so what modules read at
    import matches the stages'."""
    import subprocess
    import tempfile
    import time

    if env.get(ENV) == "0" or not hasattr(os, "pidfd_open"):
        return None
    folder = tempfile.mkdtemp(prefix="gm-forkserver-")
    path = os.path.join(folder, "socket")
    proc = subprocess.Popen([sys.executable, "-m", "gm.forkserver", path], env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 30  # it listens before importing: a stage never finds no one
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, path


def stop(proc, path: str) -> None:
    """Stop a server from :func:`start` and remove its socket (stages still running are
    their supervisors' and end on their own)."""
    import shutil

    proc.terminate()
    try:
        proc.wait(timeout=10)
    except Exception:  # noqa: BLE001
        proc.kill()
        proc.wait()
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
