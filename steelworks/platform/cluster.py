"""``steelworks cluster up|down|status``: the lifecycle of a token-protected Ray cluster on
this machine, a plain head or a local autoscaling one.

``cluster_up`` starts ``ray start --head`` with this interpreter (so jobs import steelworks)
and auth on (``connect.auth_env``); with ``--autoscaling CONFIG`` the head also runs Ray's
autoscaler on a ``fake_multinode`` config such as cluster-local.yaml, whose "worker nodes"
are extra raylets on this machine.  ``cluster_down`` stops the processes of that one cluster
only, never every Ray process here (``ray stop``) unless asked.  Jobs are sent to the cluster
by ``jobs.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from steelworks.platform.connect import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_PORT,
    ClusterError,
    auth_env,
    default_num_cpus,
    ensure_token,
    ray_cli,
)

FAKE_CLUSTER_VAR = "RAY_FAKE_CLUSTER"
FAKE_PROVIDER = "fake_multinode"  # the autoscaler provider `cluster up --autoscaling` runs


# ----------------------------------------------------------------------------- env + ports


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


def _port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# ----------------------------------------------------------------------------- autoscaling config


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


# ----------------------------------------------------------------------------- up


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
        n = num_cpus or default_num_cpus()  # overcommitted on purpose, see default_num_cpus
        res_args = [f"--num-cpus={n}"]
    cmd = ray_cli("start", "--head", f"--port={port}", *res_args,
                   # The dashboard also serves the job API, which runs arbitrary code:
                   # loopback only (reach a remote head through `ray dashboard` / SSH).
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}")
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    if autoscaling_config:
        cmd.append(f"--autoscaling-config={autoscaling_config}")
    return cmd + list(extra_args)


def _write_autoscaling_config(path: str, port: int, temp_dir: str | None) -> tuple[str, dict[str, Any]]:
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
        # over running jobs by every node that joins (jobs.submit's docstring).
        "  ray job submit -- sh -c 'cd $PWD && python -m steelworks pipeline ...'\n"
        "(RAY_ADDRESS=" + url + " works for `ray job submit` too, but a plain ray.init()\n"
        f" then fails; for ray.init / ray status use RAY_ADDRESS=127.0.0.1:{port}.)\n"
        f"Stop it with: steelworks cluster down --port {port}",
        flush=True,
    )


# ----------------------------------------------------------------------------- down + status


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
        return subprocess.run(ray_cli("stop"), env=auth_env()).returncode
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
    cmd = ray_cli("status") + ([f"--address={address}"] if address else [])
    return subprocess.run(cmd, env=auth_env()).returncode


__all__ = [
    "FAKE_PROVIDER", "cluster_down", "cluster_status", "cluster_up", "head_resource_args",
    "load_autoscaling_config", "resolve_autoscaling_config", "start_head_command",
]
