"""``steelworks submit``: a steelworks command (or any entrypoint) as a Ray job, through
``ray job submit`` with token auth on (``connect.auth_env``).

What a user needs for plain ``ray job submit`` against ``steelworks cluster up``::

    export RAY_AUTH_MODE=token
    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
    ray job submit -- sh -c "cd $PWD && python -m steelworks pipeline --config configs/demo.yaml"

(``steelworks submit ...`` does all of that, plus the ``runs_dir`` fix; to a remote cluster it
uploads the working directory as the job's package instead, without .venv, runs and .git.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from steelworks.platform.connect import AUTH_MODE_VAR, DEFAULT_DASHBOARD_PORT, auth_env, ray_cli

DEFAULT_RUNS_DIR = "runs"  # PipelineConfig.runs_dir's default

# Kept out of the job's working_dir upload: Ray refuses packages over 512 MiB and a venv or
# a runs/ tree full of checkpoints passes that quickly; neither is needed by the job (the
# cluster's Python brings the deps, outputs go to an absolute runs_dir).
SUBMIT_EXCLUDES = [
    ".venv", "venv", "runs", ".git", "__pycache__", "*.pyc", "*.egg-info",
    ".pytest_cache", ".ruff_cache", ".mypy_cache", "benchmarks/out",
]

# A dashboard on one of these hosts shares our filesystem, so an absolute runs_dir written by
# the job lands where the user will look for it.
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


# ----------------------------------------------------------------------------- addresses


def dashboard_address(address: str | None = None) -> str:
    """The job API URL: ``address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``
    if it is a URL (the same order as ``ray job submit``), else the local default."""
    for cand in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if cand and (cand is address or cand.startswith(("http://", "https://"))):
            return cand if "://" in cand else f"http://{cand}"
    return f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}"


def is_local_address(address: str) -> bool:
    """Whether a dashboard URL points at this machine (so the job shares our filesystem)."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


# ----------------------------------------------------------------------------- entrypoint


def _has_runs_dir_override(args: Sequence[str]) -> bool:
    # `--set runs_dir=X` (the CLI's form) or `--set=runs_dir=X`.
    return any(a.startswith(("runs_dir=", "--set=runs_dir=")) for a in args)


def _config_runs_dir(args: Sequence[str], working_dir: Path) -> str:
    """``runs_dir`` from the ``--config``/``-c`` file in ``args`` (default ``runs``)."""
    for i, a in enumerate(args):
        path = None
        if a in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        if path is not None:
            file = Path(path) if Path(path).is_absolute() else working_dir / path
            try:
                data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                return DEFAULT_RUNS_DIR  # the job will report the bad config itself
            value = data.get("runs_dir") if isinstance(data, dict) else None
            return str(value) if value else DEFAULT_RUNS_DIR
    return DEFAULT_RUNS_DIR


def steelworks_entrypoint(args: Sequence[str], address: str, working_dir: str = ".",
                          upload: bool = True) -> list[str]:
    """``python -m steelworks <args>``, with ``runs_dir`` made absolute for local clusters.

    A job runs in a copy of ``working_dir`` under the session's ``runtime_resources``, which
    Ray deletes later: a relative ``runs_dir`` would put every output there.  When the
    cluster is on this machine we point the job at ``<working_dir>/<runs_dir>`` instead
    (the same place a direct ``steelworks`` run writes).  For a remote cluster relative
    paths stay relative to the job's directory on the head: set ``runs_dir`` to shared
    storage there.

    Without ``upload`` (a cluster that shares this machine's disk, see ``submit``) the job
    runs this interpreter in ``working_dir`` itself: ``sh -c 'cd <dir> && exec python ...'``
    (Ray quotes each entrypoint word, so the ``cd`` goes inside one ``sh -c`` string).
    """
    entry = ["python" if upload else sys.executable, "-m", "steelworks", *args]
    wd = Path(working_dir).resolve()
    if is_local_address(address) and not _has_runs_dir_override(args):
        runs = Path(_config_runs_dir(args, wd))
        if not runs.is_absolute():
            entry += ["--set", f"runs_dir={wd / runs}"]
    return entry if upload else in_place(entry, wd)


def in_place(entry: Sequence[str], working_dir: str | Path) -> list[str]:
    """``entry`` run in ``working_dir`` on a cluster that shares this disk (no package)."""
    return ["sh", "-c", f"cd {shlex.quote(str(Path(working_dir).resolve()))} && exec {shlex.join(entry)}"]


# ----------------------------------------------------------------------------- submit


def build_submit_command(entrypoint: Sequence[str], address: str, working_dir: str = ".",
                         wait: bool = True, extra_env: Mapping[str, str] | None = None,
                         excludes: Sequence[str] = tuple(SUBMIT_EXCLUDES),
                         upload: bool = True) -> list[str]:
    """The ``ray job submit`` command line for ``entrypoint`` (a pure function, for tests).
    ``upload``: ship ``working_dir`` as the job's runtime_env package (Ray's way for a
    cluster on other machines); without it the job gets no package at all."""
    # The job's own env: auth on so that nested ray.init / Ray CLIs inside the job send the
    # token (the head passes its env down too, but a cluster started by hand may not have
    # it); unbuffered so that the streamed log keeps up with the job.
    env_vars = {AUTH_MODE_VAR: "token", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    package: list[str] = []
    if upload:
        runtime_env["excludes"] = list(excludes)
        package = [f"--working-dir={Path(working_dir).resolve()}"]
    cmd = ray_cli("job", "submit", f"--address={address}", *package,
                   f"--runtime-env-json={json.dumps(runtime_env, sort_keys=True)}")
    if not wait:
        cmd.append("--no-wait")
    return cmd + ["--", *entrypoint]


def run_job(entrypoint: Sequence[str], address: str | None = None, working_dir: str = ".",
            wait: bool = True, extra_env: Mapping[str, str] | None = None,
            upload: bool = True) -> int:
    """Submit any ``entrypoint`` as a Ray job; stream its log when ``wait``; return the exit
    code of ``ray job submit`` (0 when the job succeeded, 1 when it failed)."""
    cmd = build_submit_command(entrypoint, dashboard_address(address), working_dir, wait,
                               extra_env, upload=upload)
    return subprocess.run(cmd, env=auth_env()).returncode


def submit(entrypoint_args: list[str], address: str | None = None, working_dir: str = ".",
           wait: bool = True, extra_env: dict[str, str] | None = None,
           upload: bool | None = None) -> int:
    """Run ``python -m steelworks <entrypoint_args>`` as a Ray job on ``address``.

    ``upload`` None (auto): a cluster on this machine (a loopback address: ``cluster up``,
    ``cluster-local.yaml``'s fake nodes) shares this disk, so nothing is uploaded and the job
    runs in ``working_dir`` itself. That is also what keeps fake nodes from breaking a job:
    they share the head's session directory, and a node joining mid-job would re-unpack an
    uploaded package over the running workers' cwd (Ray's working_dir plugin installs with
    overwrite). Any other address gets the package (Ray's runtime_env, keyed by its content
    hash)."""
    url = dashboard_address(address)
    if upload is None:
        upload = not is_local_address(url)
    entry = steelworks_entrypoint(entrypoint_args, url, working_dir, upload)
    how = "uploading" if upload else "no upload: the cluster shares this disk; running in"
    print(f"steelworks: submitting to {url} ({how} {Path(working_dir).resolve()}): "
          f"{shlex.join(entry)}", flush=True)
    return run_job(entry, url, working_dir, wait, extra_env, upload)


__all__ = [
    "SUBMIT_EXCLUDES", "build_submit_command", "dashboard_address", "in_place",
    "is_local_address", "run_job", "steelworks_entrypoint", "submit",
]
