"""Ray connection, local cluster lifecycle and job submission, with token auth kept on.

Ray 2.60 protects clusters with a shared token (``~/.ray/auth_token``, or ``$RAY_AUTH_TOKEN``
/ ``$RAY_AUTH_TOKEN_PATH``), but only a process that has ``RAY_AUTH_MODE=token`` in its
environment *sends* it.  ``ray.init()`` of a brand-new local cluster turns the mode on by
itself; ``ray start``, ``ray job submit``, ``ray status`` and ``ray.init(address=...)`` do not,
and then fail with "Authentication token is missing or incorrect".  Every function here
therefore runs Ray with :func:`auth_env` (the mode forced to ``token``) and never turns
auth off.

What a user needs for plain ``ray job submit`` against ``steelworks cluster up``::

    export RAY_AUTH_MODE=token
    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
    ray job submit -- sh -c "cd $PWD && python -m steelworks pipeline --config configs/demo.yaml"

(``steelworks submit ...`` does all of that, plus the ``runs_dir`` fix; to a remote cluster it
uploads the working directory as the job's package instead, without .venv, runs and .git.)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

AUTH_MODE_VAR = "RAY_AUTH_MODE"
FAKE_CLUSTER_VAR = "RAY_FAKE_CLUSTER"
FAKE_PROVIDER = "fake_multinode"  # the autoscaler provider `cluster up --autoscaling` runs
DEFAULT_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
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


def _ray_cli(*args: str) -> list[str]:
    """The Ray CLI of *this* interpreter: ``ray`` on PATH may belong to another Python,
    and a head started by another Python could not import steelworks or its deps."""
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


def _head_env(fake_cluster: bool = False) -> dict[str, str]:
    """Env for ``ray start --head``: auth on, and this interpreter's bin dir first on PATH
    (plus ``RAY_FAKE_CLUSTER=1`` for a local autoscaling cluster, see :func:`cluster_up`).

    Ray runs a job's entrypoint through ``/bin/sh`` with the head's PATH, so ``python`` in
    ``ray job submit -- python -m steelworks`` is whichever python that PATH finds first.
    Starting the head as ``.venv/bin/steelworks cluster up`` without an activated venv would
    otherwise make jobs run the system Python, which has neither Ray nor steelworks.
    """
    env = auth_env()
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")]).rstrip(os.pathsep)
    if fake_cluster:
        # Ray's fake_multinode provider refuses to run without it; `ray start` also gives
        # the head the fixed node id the provider expects for it.
        env[FAKE_CLUSTER_VAR] = "1"
    return env


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


# ----------------------------------------------------------------------------- connect


def cluster_attached(address: str | None = None) -> bool:
    """Whether ``connect(address)`` would join an existing cluster (an address, ``$RAY_ADDRESS``,
    or a Ray job's driver) rather than start a private local one.  Read from the environment
    only, without importing ray, so a caller can decide not to start Ray at all."""
    return bool(address or os.environ.get("RAY_ADDRESS")
                or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ)


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
    # Logical CPUs are overcommitted on purpose: Ray Train's 2 workers + its controller
    # actor + Ray Data's tasks each reserve 1 CPU and would deadlock waiting for each other
    # on a 2-core machine with num_cpus=2. They are mostly idle while waiting, so
    # oversubscription costs little; a real cluster reports its real cores.
    n = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=n, configure_logging=False)
    return f"started a local Ray cluster with {n} logical CPUs (token auth)"


# ----------------------------------------------------------------------------- cluster up/down


def _port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def ensure_token() -> None:
    """Create ``~/.ray/auth_token`` if no token exists yet.

    ``ray.init()`` generates one for a new local cluster, but ``ray start`` with
    ``RAY_AUTH_MODE=token`` refuses to start without one ("Token authentication is enabled
    but no authentication token was found").  ``ray get-auth-token --generate`` keeps an
    existing token (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or the file); it prints the
    token, which we discard so that it never reaches a log.
    """
    proc = subprocess.run(_ray_cli("get-auth-token", "--generate"), env=auth_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"could not create a Ray auth token: {proc.stderr.strip()}")


def load_autoscaling_config(path: str | Path) -> dict[str, Any]:
    """Read a local autoscaling config (``fake_multinode`` provider) and check what
    :func:`cluster_up` relies on, with errors that say what to fix."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ClusterError(f"cannot read autoscaling config {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ClusterError(f"{path}: expected a mapping (a Ray autoscaler config)")
    kind = (cfg.get("provider") or {}).get("type")
    if kind != FAKE_PROVIDER:
        raise ClusterError(
            f"{path}: provider.type is {kind!r}; `cluster up --autoscaling` runs Ray's "
            f"{FAKE_PROVIDER!r} provider on this machine (see cluster-local.yaml). "
            "Cloud configs such as cluster.yaml are started with `ray up FILE`.")
    head = cfg.get("head_node_type")
    types = cfg.get("available_node_types") or {}
    if head not in types:
        raise ClusterError(f"{path}: head_node_type {head!r} is not one of "
                           f"available_node_types ({', '.join(types) or 'none'})")
    if "CPU" not in (types[head].get("resources") or {}):
        raise ClusterError(f"{path}: available_node_types.{head}.resources needs CPU: the "
                           "head is started with exactly those resources")
    return cfg


def head_resource_args(resources: Mapping[str, Any]) -> list[str]:
    """``ray start`` flags that give the head exactly ``resources`` (its node type's in the
    autoscaling config).  The autoscaler cannot resize the head, and it plans with the
    config's numbers, so the two must agree: we derive one from the other."""
    res = dict(resources)
    args = [f"--num-cpus={int(res.pop('CPU'))}"]
    if "GPU" in res:
        args.append(f"--num-gpus={int(res.pop('GPU'))}")
    if "object_store_memory" in res:
        args.append(f"--object-store-memory={int(res.pop('object_store_memory'))}")
    if "memory" in res:
        args.append(f"--memory={int(res.pop('memory'))}")
    if res:  # custom resources
        args.append(f"--resources={json.dumps(res, sort_keys=True)}")
    return args


def resolve_autoscaling_config(cfg: Mapping[str, Any], port: int, node_ip: str) -> dict[str, Any]:
    """A copy of ``cfg`` for a head whose GCS listens on ``port``: the fake provider starts
    its nodes against ``provider.gcs_address`` and defaults to port 6379 whatever port the
    head uses, so we fill it in (unless the config sets it)."""
    out = json.loads(json.dumps(dict(cfg)))  # deep copy of plain YAML data
    out["provider"].setdefault("gcs_address", f"{node_ip}:{port}")
    return out


def start_head_command(num_cpus: int | None, port: int = DEFAULT_PORT,
                       dashboard_port: int = DEFAULT_DASHBOARD_PORT,
                       temp_dir: str | None = None,
                       extra_args: Sequence[str] = (),
                       autoscaling_config: str | None = None,
                       head_resources: Mapping[str, Any] | None = None) -> list[str]:
    """The ``ray start --head`` command line that :func:`cluster_up` runs.

    With ``autoscaling_config`` (a resolved config file) the head runs Ray's autoscaler on
    it, and ``head_resources`` (its head node type's) replace ``--num-cpus``.
    """
    if head_resources is not None:
        res_args = head_resource_args(head_resources)
    else:
        n = num_cpus or max(4, os.cpu_count() or 1)  # overcommitted on purpose, see connect()
        res_args = [f"--num-cpus={n}"]
    cmd = _ray_cli("start", "--head", f"--port={port}", *res_args,
                   # The dashboard also serves the job API, which runs arbitrary code:
                   # loopback only (reach a remote head through `ray dashboard` / SSH).
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}")
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    if autoscaling_config:
        cmd.append(f"--autoscaling-config={autoscaling_config}")
    return cmd + list(extra_args)


def _write_autoscaling_config(path: str, port: int, temp_dir: str | None) -> tuple[str, dict]:
    """Load ``path``, resolve it for ``port`` and write it where the head's autoscaler reads
    it for the cluster's lifetime (Ray's temp dir); return (written path, config)."""
    from ray._private.services import get_node_ip_address

    cfg = load_autoscaling_config(path)
    # The IP the fake provider itself would use for the GCS (its default, with our port).
    resolved = resolve_autoscaling_config(cfg, port, get_node_ip_address())
    root = Path(temp_dir or "/tmp/ray")  # Ray's default temp dir
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"steelworks-autoscaling-{port}.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    tmp.replace(out)
    return str(out), resolved


def cluster_up(num_cpus: int | None, port: int = DEFAULT_PORT,
               dashboard_port: int = DEFAULT_DASHBOARD_PORT, temp_dir: str | None = None,
               extra_args: Sequence[str] = (), autoscaling: str | None = None) -> None:
    """Start a token-protected Ray head on this machine and print how to use it.

    The head runs with this interpreter and its bin dir first on PATH, so jobs submitted to
    it import steelworks and its deps.  With ``autoscaling`` (a ``fake_multinode`` autoscaler
    config such as cluster-local.yaml) the head also runs Ray's autoscaler, which
    adds "worker nodes" -- extra raylets on this machine -- while tasks wait for resources
    and removes them when idle (``RAY_FAKE_CLUSTER=1 ray start --head
    --autoscaling-config=...``; ``ray up`` cannot start that provider in the Ray 2.60 wheel).
    Raises :class:`ClusterError` if a port is taken (usually: a cluster is already running),
    the config is not usable, or ``ray start`` fails.
    """
    for what, p in (("GCS port", port), ("dashboard port", dashboard_port)):
        if _port_in_use(p):
            raise ClusterError(
                f"{what} {p} is already in use; a Ray cluster is probably running already "
                f"(`steelworks cluster status --port {port}`; stop it with `steelworks cluster "
                "down`), or choose other ports with --port / --dashboard-port"
            )
    config_path, head_resources, cfg = None, None, None
    if autoscaling:
        config_path, cfg = _write_autoscaling_config(autoscaling, port, temp_dir)
        head_resources = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
        if num_cpus is not None and num_cpus != head_resources["CPU"]:
            raise ClusterError(
                f"--num-cpus {num_cpus} disagrees with {autoscaling} (head node type "
                f"{cfg['head_node_type']!r} has CPU {head_resources['CPU']}); the autoscaler "
                "plans with the config's numbers: change the config, not the flag")
    ensure_token()
    # A new session: the daemons then belong to no terminal's process group, so a Ctrl-C
    # in the shell that ran `cluster up` can never reach them.
    proc = subprocess.run(start_head_command(num_cpus, port, dashboard_port, temp_dir,
                                             extra_args, config_path, head_resources),
                          env=_head_env(fake_cluster=bool(autoscaling)),
                          start_new_session=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ClusterError(f"`ray start --head` failed with exit code {proc.returncode}")
    url = f"http://127.0.0.1:{dashboard_port}"
    if cfg is not None:
        workers = {k: v for k, v in cfg["available_node_types"].items()
                   if k != cfg["head_node_type"]}
        print(f"\nsteelworks: autoscaling on ({config_path}): up to {cfg['max_workers']} "
              "worker node(s) of " + ", ".join(
                  f"{k} {v.get('resources', {})}" for k, v in workers.items())
              + f", removed after {cfg.get('idle_timeout_minutes', 5)} idle minute(s); "
              f"watch with `steelworks cluster status --port {port}`.", flush=True)
    print(
        f"\nsteelworks: Ray head is up (GCS 127.0.0.1:{port}, dashboard {url}, token auth on).\n"
        f"  steelworks submit pipeline --config configs/demo.yaml --address {url}\n"
        "For plain Ray CLIs (ray job submit / ray status) export first:\n"
        "  export RAY_AUTH_MODE=token\n"
        f"  export RAY_API_SERVER_ADDRESS={url}\n"
        # No --working-dir: this cluster shares the disk, and a package would be unpacked again
        # over running jobs by every node that joins (submit's docstring).
        "  ray job submit -- sh -c 'cd $PWD && python -m steelworks pipeline ...'\n"
        "(RAY_ADDRESS=" + url + " works for `ray job submit` too, but a plain ray.init()\n"
        f" then fails; for ray.init / ray status use RAY_ADDRESS=127.0.0.1:{port}.)\n"
        f"Stop it with: steelworks cluster down --port {port}",
        flush=True,
    )


def _cluster_processes(port: int) -> list[Any]:
    """The processes of the Ray cluster whose GCS listens on ``port`` on this machine.

    Found from Ray's own command lines (2.60): the head's ``gcs_server`` carries
    ``--gcs_server_port=<port>`` and ``--session-dir=<dir>``; the raylet, dashboard and
    monitors mention that session dir, the Ray client server ``--address=<ip>:<port>``;
    workers, agents and job drivers are descendants of those.  So are the worker nodes of
    a local autoscaling cluster: the autoscaler (monitor.py) starts their raylets as its
    children, in the head's session dir.
    """
    import psutil

    procs: list[tuple[Any, str]] = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            procs.append((p, " ".join(p.info["cmdline"] or [])))
        except psutil.Error:
            continue
    session_dirs: set[str] = set()
    gcs_flags: set[str] = set()  # how the client server / monitors name that GCS
    for _, cmd in procs:
        args = cmd.split()
        if "gcs_server" not in cmd or f"--gcs_server_port={port}" not in args:
            continue
        for arg in args:
            if arg.startswith("--session-dir="):
                session_dirs.add(arg.split("=", 1)[1])
            elif arg.startswith("--node-ip-address="):
                ip = arg.split("=", 1)[1]
                gcs_flags |= {f"--address={ip}:{port}", f"--gcs-address={ip}:{port}"}
    if not session_dirs:
        return []
    roots = [p for p, cmd in procs
             if any(d in cmd for d in session_dirs) or gcs_flags.intersection(cmd.split())]
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)  # never ourselves (we may be a job driver of that cluster)
    return list(found.values())


def _terminate(procs: list[Any], grace_s: float) -> None:
    """SIGTERM ``procs``, then SIGKILL whatever is still alive after ``grace_s`` seconds
    (the GCS and the autoscaler monitor routinely ignore SIGTERM while peers are exiting)."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)


def _is_autoscaler(proc: Any) -> bool:
    """Whether ``proc`` is Ray's autoscaler (``autoscaler/_private/monitor.py``, or v2's)."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # psutil.NoSuchProcess / AccessDenied
        return False
    return "autoscaler" in cmd and "monitor.py" in cmd


def cluster_down(port: int = DEFAULT_PORT, all_local: bool = False, grace_s: float = 10.0) -> int:
    """Stop the Ray cluster whose GCS listens on ``port`` here; return an exit code.

    ``ray stop`` would kill *every* Ray process on the machine, including private
    ``ray.init()`` sessions of other programs (a running test suite, a notebook).  So by
    default we stop only the processes of that one cluster; ``all_local=True`` is the
    ``ray stop`` behaviour, for clearing out leftovers.
    """
    if all_local:
        return subprocess.run(_ray_cli("stop"), env=auth_env()).returncode
    procs = _cluster_processes(port)
    if not procs:
        print(f"steelworks: no Ray cluster with its GCS on port {port} runs on this machine")
        return 0
    # The autoscaler first, and only then the final list: with `cluster up --autoscaling` it
    # starts worker nodes itself (raylets + agents, its children, in the same session dir),
    # and could start one more while we stop the others.  Nodes it started meanwhile are in
    # the second scan (the GCS still runs, so the session dir is still known).
    monitors = [p for p in procs if _is_autoscaler(p)]
    if monitors:
        _terminate(monitors, grace_s)
        seen = {p.pid for p in procs}
        procs = _cluster_processes(port)
        stopped = len(seen | {p.pid for p in procs})
    else:
        stopped = len(procs)
    # The order `ray stop` uses: the raylet first (agents fate-share with it and would log
    # spurious errors if it outlived them), the GCS last (others report to it on exit).
    buckets: list[list[Any]] = [[], [], []]
    for p in procs:
        try:
            name = p.name()
        except Exception:  # psutil.NoSuchProcess: already gone
            continue
        buckets[0 if name == "raylet" else 2 if name == "gcs_server" else 1].append(p)
    for bucket in buckets:
        _terminate(bucket, grace_s)
    print(f"steelworks: stopped the Ray cluster on port {port} ({stopped} processes)")
    return 0


def cluster_status(address: str | None = None) -> int:
    """``ray status`` with token auth; ``address`` is the GCS (``host:6379``), default: the
    cluster ``ray start`` recorded in /tmp/ray."""
    cmd = _ray_cli("status") + ([f"--address={address}"] if address else [])
    return subprocess.run(cmd, env=auth_env()).returncode


# ----------------------------------------------------------------------------- jobs


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
    cmd = _ray_cli("job", "submit", f"--address={address}", *package,
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


# ----------------------------------------------------------------------------- CLI


def _cmd_cluster(args: argparse.Namespace) -> int:
    try:
        if args.action == "up":
            cluster_up(args.num_cpus, args.port, args.dashboard_port, args.temp_dir,
                       extra_args=args.ray_arg, autoscaling=args.autoscaling)
            return 0
        if args.action == "down":
            return cluster_down(args.port, all_local=args.all)
        # A non-default --port names a cluster `ray status` cannot find by itself (Ray only
        # records the last `ray start` of the default temp dir).
        address = args.address or (f"127.0.0.1:{args.port}" if args.port != DEFAULT_PORT
                                   else None)
        return cluster_status(address)
    except ClusterError as e:
        print(f"steelworks: {e}", file=sys.stderr)
        return 1


def _split_submit_args(rest: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull submit's own options out of the job command: they may follow the steelworks
    command (``submit pipeline --config x --no-wait``); after a ``--`` nothing is ours."""
    opts: dict[str, Any] = {}
    job: list[str] = []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            job += rest[i + 1:]
            break
        if a == "--no-wait":
            opts["wait"] = False
        elif a in ("--upload", "--no-upload"):
            opts["upload"] = a == "--upload"
        elif a in ("--address", "--working-dir", "--env") and i + 1 < len(rest):
            opts.setdefault(a, []).append(rest[i + 1])
            i += 1
        elif a.split("=", 1)[0] in ("--address", "--working-dir", "--env") and "=" in a:
            key, value = a.split("=", 1)
            opts.setdefault(key, []).append(value)
        else:
            job.append(a)
        i += 1
    return job, opts


def _cmd_submit(args: argparse.Namespace) -> int:
    job, opts = _split_submit_args(list(args.job_args))
    if not job:
        print("steelworks: submit needs a steelworks command, e.g. "
              "`steelworks submit pipeline --config configs/demo.yaml`", file=sys.stderr)
        return 2
    address = (opts.get("--address") or [args.address])[-1]
    working_dir = (opts.get("--working-dir") or [args.working_dir])[-1]
    env: dict[str, str] = {}
    for item in list(args.env) + opts.get("--env", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"steelworks: --env {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        env[key] = value
    wait = opts.get("wait", not args.no_wait)
    upload = opts.get("upload", args.upload)
    return submit(job, address, working_dir, wait, env, upload)


def add_cluster_commands(subparsers: Any) -> None:
    """Add ``cluster up|down|status`` and ``submit`` to the ``steelworks`` CLI."""
    p = subparsers.add_parser(
        "cluster", help="start, stop or inspect a token-protected Ray cluster on this machine",
        description="Manage a local Ray head (`ray start --head` with RAY_AUTH_MODE=token). "
        "`up` prints what to export for plain `ray job submit`; `down` stops only the "
        "cluster on --port (use --all for `ray stop`, which kills every Ray process here).")
    p.add_argument("action", choices=["up", "down", "status"], help="what to do")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the head (default: max(4, cores), overcommitted so "
                   "Ray Train workers + controller + Ray Data fit on small machines)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="GCS port (default %(default)s)")
    p.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                   help="dashboard / job API port, bound to 127.0.0.1 (default %(default)s)")
    p.add_argument("--temp-dir", default=None,
                   help="Ray's temp/session dir for `up` (default /tmp/ray)")
    p.add_argument("--autoscaling", default=None, metavar="CONFIG",
                   help="`up`: run Ray's autoscaler with this fake_multinode config (e.g. "
                   "cluster-local.yaml): worker nodes are started on this machine "
                   "when tasks wait for resources and removed when idle; the head gets the "
                   "config's head resources")
    p.add_argument("--ray-arg", action="append", default=[], metavar="ARG",
                   help="`up`: pass ARG on to `ray start --head` (repeatable), e.g. "
                   "--ray-arg=--dashboard-agent-listen-port=52366 when another cluster on this "
                   "machine holds Ray's default ports (10001, 52365)")
    p.add_argument("--address", default=None,
                   help="GCS address for `status` (default: 127.0.0.1:PORT when --port is "
                   "given, else the cluster `ray start` recorded)")
    p.add_argument("--all", action="store_true",
                   help="`down`: run `ray stop`, stopping EVERY Ray process on this machine")
    p.set_defaults(func=_cmd_cluster)

    p = subparsers.add_parser(
        "submit", help="run a steelworks command as a Ray job (ray job submit, token auth)",
        description="Run `python -m steelworks COMMAND ...` on a Ray cluster as a job, "
        "uploading this directory (without .venv, runs, .git) to a remote cluster; a cluster "
        "on this machine shares its disk, so there the job runs in place (--upload/--no-upload "
        "override). On a local cluster the job's runs_dir is made absolute so outputs land in "
        "./runs. Example: "
        "steelworks submit pipeline --config configs/demo.yaml --set pretrain.max_steps=20",
        epilog="--address/--working-dir/--env/--no-wait/--upload/--no-upload may also follow the "
        "command; put the "
        "command after `--` to pass such options through to it unchanged.")
    p.add_argument("--address", default=None,
                   help="dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS if a "
                   f"URL, else http://127.0.0.1:{DEFAULT_DASHBOARD_PORT})")
    p.add_argument("--working-dir", default=".", help="the job's cwd: uploaded, or used in place "
                   "on a cluster that shares this disk")
    p.add_argument("--upload", dest="upload", action="store_true", default=None,
                   help="ship --working-dir as the job's package (default for a remote address)")
    p.add_argument("--no-upload", dest="upload", action="store_false",
                   help="run in --working-dir in place: the cluster shares this disk (default for "
                   "a local address, e.g. cluster-local.yaml's fake nodes)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--no-wait", action="store_true",
                   help="return after submitting instead of streaming the job's log")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="the steelworks command to run, e.g. pipeline --config FILE")
    p.set_defaults(func=_cmd_submit)


__all__ = [
    "ClusterError", "SUBMIT_EXCLUDES", "add_cluster_commands", "auth_env",
    "build_submit_command", "cluster_down", "cluster_status", "cluster_up", "connect",
    "dashboard_address", "ensure_token", "head_resource_args", "is_local_address",
    "load_autoscaling_config", "resolve_autoscaling_config", "run_job", "start_head_command",
    "steelworks_entrypoint", "submit",
]
