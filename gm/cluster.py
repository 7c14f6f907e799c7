"""Ray, local or a cluster: one place that starts or attaches to it (training, Tune, prepare)."""

from __future__ import annotations

import os

from gm.errors import GmError

# Set by `gm with-ray` in the command it runs: RAY_ADDRESS is then this machine's own local Ray,
# not a cluster (gm.data.prepare keeps small folders in-process, as without it).
LOCAL_RAY_ENV = "GM_RAY_LOCAL"


def on_cluster() -> bool:
    """True when this process's Ray is a user's cluster: ``RAY_ADDRESS`` set, and not by
    ``gm with-ray`` for this machine's own local Ray."""
    return bool(os.environ.get("RAY_ADDRESS")) and not os.environ.get(LOCAL_RAY_ENV)


def init_ray(need_cpus: float = 0.0) -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start a local Ray sized for the job.

    A local Ray is this run's own: its dashboard port is chosen here and exported as
    ``RAY_API_SERVER_ADDRESS`` before Ray starts, so its processes inherit it and every State
    API call (Ray Train's placement-group cleaner polls one) goes to this instance; without it,
    a second local Ray on the host made each poll fail with "Found multiple active Ray
    instances". A Ray that cannot start or be reached is a GmError naming the cause and what
    to do, not a traceback."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(log_to_driver=True)
            return
        need = need_cpus
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # The dashboard serves the State API and the Jobs API: on loopback only (a cluster's
        # head sets its own host; token auth, see README).
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                 dashboard_host="127.0.0.1", dashboard_port=port)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - Ray raises many kinds; all end here
        first = (str(e).strip().splitlines() or [""])[0]
        cause = f"{type(e).__name__}: {first}"
        if address:
            raise GmError(
                f"RAY_ADDRESS={address}: cannot attach to the Ray cluster ({cause}); check "
                "that it is up and reachable, and its auth token (RAY_AUTH_MODE=token, see "
                "README), or unset RAY_ADDRESS to train on a local Ray"
            ) from None
        raise GmError(
            f"a local Ray did not start ({cause}); `ray stop --force` ends stale local "
            "instances, check free memory and space in /tmp, or set RAY_ADDRESS to a cluster"
        ) from None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params_cpus(params_file: str | os.PathLike) -> float:
    """The most CPUs one training job of ``params_file`` asks for (``num_workers`` ×
    ``cpus_per_worker``; a Tune trial's ``cpus_per_trial``): a shared local Ray gets at least
    this many, as each stage's own local Ray would. A missing file counts 0."""
    from pathlib import Path

    from gm import params

    if not Path(params_file).is_file():
        return 0.0
    p = params.load(params_file)
    need = [job.run.num_workers * job.run.cpus_per_worker
            for section in params.JOB_SECTIONS for job in getattr(p, section).values()]  # fmt: skip
    need += [search.cpus_per_trial for search in p.tune.values()]
    return max(need, default=0.0)


def run_with_ray(cmd: list[str], need_cpus: float = 0.0) -> int:
    """Run ``cmd`` (``dvc repro``, say) with one local Ray for all of it: started here as
    :func:`init_ray` starts a stage's own, exported to ``cmd`` as ``RAY_ADDRESS`` (with its
    auth mode and State API address), and shut down when ``cmd`` ends. Each stage then attaches
    in about a second instead of starting and stopping a Ray of its own (3 to 33 s saved per
    training stage of the default pipeline on 2 cores, measured). With ``RAY_ADDRESS``
    already set, ``cmd`` runs on that cluster as is. Either way ``cmd`` gets a fork server
    (:mod:`gm.forkserver`, ``GM_FORKSERVER``): its pipeline stages skip importing torch, Ray
    and MLflow each; ``GM_FORKSERVER=0`` turns it off.
    Returns ``cmd``'s exit status (130 after Ctrl-C); ``cmd`` that cannot be started is a
    GmError naming it."""
    if not cmd:
        raise GmError("with-ray: no command to run (gm with-ray -- dvc repro)")
    if os.environ.get("RAY_ADDRESS"):
        return _call(cmd, dict(os.environ))
    import ray

    init_ray(need_cpus)
    try:
        env = dict(os.environ)  # init_ray set RAY_API_SERVER_ADDRESS; Ray its RAY_AUTH_MODE
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        env[LOCAL_RAY_ENV] = "1"
        return _call(cmd, env)
    finally:
        ray.shutdown()


def _call(cmd: list[str], env: dict[str, str]) -> int:
    import subprocess

    from gm import forkserver

    server = forkserver.start(env)
    if server:
        env = {**env, forkserver.ENV: server[1]}
    try:
        try:
            proc = subprocess.Popen(cmd, env=env)
        except OSError as e:
            raise GmError(f"with-ray: cannot run {cmd[0]!r} ({e.strerror})") from None
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT: let it stop cleanly
            proc.wait()
            return 130
    finally:
        if server:
            forkserver.stop(*server)
