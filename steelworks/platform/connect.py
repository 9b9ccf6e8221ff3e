"""Connecting to Ray with token auth kept on: the auth environment, the Ray CLI of this
interpreter, and :func:`connect`, which attaches this process to a cluster or starts a
private local one (what ``pipeline.py``, the CLI and the benchmarks use).

Ray 2.60 protects clusters with a shared token (``~/.ray/auth_token``, or ``$RAY_AUTH_TOKEN``
/ ``$RAY_AUTH_TOKEN_PATH``), but only a process that has ``RAY_AUTH_MODE=token`` in its
environment *sends* it.  ``ray.init()`` of a brand-new local cluster turns the mode on by
itself; ``ray start``, ``ray job submit``, ``ray status`` and ``ray.init(address=...)`` do not,
and then fail with "Authentication token is missing or incorrect".  Every Ray process or CLI
that steelworks runs (here, in ``cluster.py`` and in ``jobs.py``) therefore runs with
:func:`auth_env` (the mode forced to ``token``), and nothing turns auth off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

AUTH_MODE_VAR = "RAY_AUTH_MODE"
DEFAULT_PORT = 6379  # the GCS: what ray.init(address=...) and `ray status` connect to
DEFAULT_DASHBOARD_PORT = 8265  # the dashboard, which also serves the job API


class ClusterError(RuntimeError):
    """A cluster command could not do what was asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- auth + env


def auth_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``RAY_AUTH_MODE=token`` for Ray CLIs we spawn.

    The mode is forced rather than defaulted: a stray ``RAY_AUTH_MODE=disabled`` in a shell
    would otherwise make every command fail against our token-protected clusters.
    """
    env = dict(os.environ if base is None else base)
    env[AUTH_MODE_VAR] = "token"
    return env


def ray_cli(*args: str) -> list[str]:
    """The Ray CLI of *this* interpreter: ``ray`` on PATH may belong to another Python,
    and a head started by another Python could not import steelworks or its deps."""
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


def _enable_token_auth_in_process() -> None:
    """Turn token mode on for this process before ``ray.init`` connects anywhere.

    Setting the variable is not enough once ``ray`` is imported: Ray caches its config
    (which holds the auth mode) at import, and ``ray.init(address=...)`` to an existing
    cluster never re-reads it, so it would connect without the token.  Ray's own
    ``_enable_token_auth`` refreshes the cache with ``Config.initialize("")``; we do the same.
    """
    os.environ[AUTH_MODE_VAR] = "token"
    try:
        from ray._raylet import Config
    except ImportError:  # pragma: no cover - a Ray build without the C extension
        return
    Config.initialize("")


def ensure_token() -> None:
    """Create ``~/.ray/auth_token`` if no token exists yet.

    ``ray.init()`` generates one for a new local cluster, but ``ray start`` with
    ``RAY_AUTH_MODE=token`` refuses to start without one ("Token authentication is enabled
    but no authentication token was found").  ``ray get-auth-token --generate`` keeps an
    existing token (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or the file); it prints the
    token, which we discard so that it never reaches a log.
    """
    proc = subprocess.run(ray_cli("get-auth-token", "--generate"), env=auth_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"could not create a Ray auth token: {proc.stderr.strip()}")


# ----------------------------------------------------------------------------- connect


def cluster_attached(address: str | None = None) -> bool:
    """Whether ``connect(address)`` would join an existing cluster (an address, ``$RAY_ADDRESS``,
    or a Ray job's driver) rather than start a private local one.  Read from the environment
    only, without importing ray, so a caller can decide not to start Ray at all."""
    return bool(address or os.environ.get("RAY_ADDRESS")
                or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ)


def default_num_cpus() -> int:
    """Logical CPUs for a Ray we start on this machine when none are asked for.

    Overcommitted on purpose: Ray Train's 2 workers + its controller actor + Ray Data's tasks
    each reserve 1 CPU and would deadlock waiting for each other on a 2-core machine with
    num_cpus=2. They are mostly idle while waiting, so oversubscription costs little; a real
    cluster reports its real cores.
    """
    return max(4, os.cpu_count() or 1)


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect this process to Ray and return a one-line description for the logs.

    In order:

    1. Ray already initialised in this process: reuse it (idempotent).
    2. ``address`` or ``$RAY_ADDRESS`` set (a job started by ``ray job submit`` always has
       ``RAY_ADDRESS``): connect to that cluster with token auth.
    3. Running inside a Ray job without ``RAY_ADDRESS``: ``ray.init("auto")``.
    4. Otherwise start a fresh private local cluster (``address="local"``).  Never a plain
       ``ray.init()``: that silently attaches to whatever cluster ``ray start`` left in
       ``/tmp/ray/ray_current_cluster``, which is surprising for a local run.
    """
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return f"already connected to Ray at {ctx.gcs_address}"

    _enable_token_auth_in_process()
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target.startswith(("http://", "https://")):
        # That is a dashboard (job API) URL, not a GCS address: ray.init cannot use it.
        raise ClusterError(
            f"Ray address {target!r} is a dashboard URL; ray.init needs the cluster's GCS "
            "address (host:6379). For job submission set RAY_API_SERVER_ADDRESS instead of "
            "RAY_ADDRESS, or pass ray.address=host:6379."
        )
    if target:
        ray.init(address=target, configure_logging=False)
        return f"connected to Ray cluster at {target} (token auth)"
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set for every Ray job driver
        ray.init(address="auto", configure_logging=False)
        return "connected to the Ray cluster running this job"
    n = num_cpus or default_num_cpus()  # overcommitted on purpose, see default_num_cpus
    ray.init(address="local", num_cpus=n, configure_logging=False)
    return f"started a local Ray cluster with {n} logical CPUs (token auth)"


__all__ = [
    "AUTH_MODE_VAR", "ClusterError", "DEFAULT_DASHBOARD_PORT", "DEFAULT_PORT", "auth_env",
    "cluster_attached", "connect", "default_num_cpus", "ensure_token", "ray_cli",
]
