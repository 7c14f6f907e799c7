"""Ray, local or a cluster: one place that starts or attaches to it (training, Tune, prepare)."""

from __future__ import annotations

import os

from gm.errors import GmError


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
