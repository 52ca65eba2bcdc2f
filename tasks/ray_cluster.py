"""Connecting to a Ray cluster: fail in seconds with a message that says what to fix."""

from __future__ import annotations

import logging
import os

__all__ = ["RayClusterError", "check_ray_cluster", "connect_failure"]

log = logging.getLogger(__name__)


class RayClusterError(RuntimeError):
    """The Ray cluster at ``ray_address`` cannot be used (unreachable, or it refused us)."""


_AUTH_HELP = ("the cluster requires token authentication (Ray 2.60's `ray start --head` turns it on whenever "
              "a token exists): set RAY_AUTH_MODE=token "
              "and give the cluster's token as RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> "
              "(on the head node: `ray get-auth-token` prints it) in the environment of the "
              "process that runs the audit (for deployments: the Prefect worker or `diffcam serve`)")


def _auth_mode() -> str:
    return os.environ.get("RAY_AUTH_MODE") or "unset"


def check_ray_cluster(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with a message that says what to fix, where ``ray.init(address=…)``
    would wait ~40 s and then report only "Failed to connect to Ray cluster": for a
    ``host:port`` address, a TCP connection to the GCS port and one authenticated GCS call.
    ``auto`` and ``ray://`` addresses are left to `ray.init` (their errors are wrapped by
    `CamPool`). Raises `RayClusterError`."""
    import socket

    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayClusterError(f"Ray address {address!r}: expected HOST:PORT (the GCS address `ray start --head` "
                              "prints), auto, or ray://HOST:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayClusterError(f"cannot reach the Ray cluster at {address}: {type(e).__name__}: {e} (is `ray start "
                              f"--head --port {port}` running there, and the port open from this host?)") from None
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RayError

    try:
        GcsClient(address=address).internal_kv_get(b"diffcam-connect-check", None, timeout=timeout_s)
    except AuthenticationError as e:
        raise RayClusterError(f"the Ray cluster at {address} refused the connection: authentication failed "
                              f"({str(e).split('.')[0]}; RAY_AUTH_MODE is {_auth_mode()}): {_AUTH_HELP}") from None
    except RayError as e:  # reachable but not answering as a GCS: ray.init says the rest
        log.warning("Ray GCS check of %s failed (%s: %s); trying ray.init anyway", address, type(e).__name__, e)


def connect_failure(address: str, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "auth" in text.lower() or "token" in text.lower():
        return f"could not connect to the Ray cluster at {address}: authentication failed ({text[:300]}): {_AUTH_HELP}"
    return (f"could not connect to the Ray cluster at {address}: {text[:500]}. If the cluster was started with "
            f"token authentication, {_AUTH_HELP.split(': ', 1)[1]} (RAY_AUTH_MODE is {_auth_mode()})")
