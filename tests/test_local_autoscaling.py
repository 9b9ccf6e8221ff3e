"""`steelworks cluster up --autoscaling`: cluster-local.yaml against Ray's schema and
the autoscaler's own expectations, the head command/env it builds, and one real local
autoscaling cluster that adds worker nodes on demand, removes an idle one, and is stopped
completely by `cluster down` (fake nodes included)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from steelworks.platform import cli, cluster, jobs
from steelworks.platform import connect as conn

ROOT = Path(__file__).resolve().parents[1]
LOCAL_YAML = ROOT / "cluster-local.yaml"


@pytest.fixture(scope="module")
def local_cfg() -> dict:
    return yaml.safe_load(LOCAL_YAML.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the config


def test_cluster_local_yaml_is_what_the_autoscaler_reads(local_cfg):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import (
        fill_node_type_min_max_workers,
        hash_runtime_conf,
        validate_config,
    )

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(local_cfg, schema)  # node types forbid unknown keys: typos fail
    # The monitor reads the file as is (no defaults merged: `ray up`'s defaults file for this
    # provider is not in the wheel), validates it, then hashes these fields on every update;
    # a missing one is a KeyError in the autoscaler loop, not a startup error.
    cfg = cluster.load_autoscaling_config(LOCAL_YAML)
    validate_config(cfg)
    hash_runtime_conf(cfg["file_mounts"], cfg["cluster_synced_files"],
                      [cfg["worker_setup_commands"], cfg["worker_start_ray_commands"]])
    fill_node_type_min_max_workers(json.loads(json.dumps(cfg)))


def test_cluster_local_yaml_shape(local_cfg):
    provider = local_cfg["provider"]
    assert provider["type"] == "fake_multinode"
    assert provider["use_node_id_as_ip"] and provider["disable_node_updaters"]
    assert "gcs_address" not in provider  # filled in by cluster up for the chosen --port
    types = local_cfg["available_node_types"]
    # The fake provider tags the head with this type name; another name breaks the bookkeeping.
    assert local_cfg["head_node_type"] == "ray.head.default"
    head = types["ray.head.default"]
    assert head["resources"]["CPU"] <= 2 and head["max_workers"] == 0
    workers = [t for name, t in types.items() if name != "ray.head.default"]
    assert workers and all(t["min_workers"] == 0 and t["resources"]["CPU"] >= 1 for t in workers)
    assert 2 <= local_cfg["max_workers"] <= 3
    assert 0 < local_cfg["idle_timeout_minutes"] <= 1  # removal visible within a minute


def test_load_autoscaling_config_errors(tmp_path):
    with pytest.raises(conn.ClusterError, match="ray up"):
        cluster.load_autoscaling_config(ROOT / "cluster.yaml")  # aws: not for `cluster up`
    bad = tmp_path / "bad.yaml"
    bad.write_text("provider: {type: fake_multinode}\nhead_node_type: head\n"
                   "available_node_types: {ray.head.default: {resources: {CPU: 1}}}\n")
    with pytest.raises(conn.ClusterError, match="head_node_type 'head'"):
        cluster.load_autoscaling_config(bad)
    with pytest.raises(conn.ClusterError, match="cannot read"):
        cluster.load_autoscaling_config(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- command + env


def test_head_command_and_env_for_autoscaling(local_cfg, monkeypatch):
    head = local_cfg["available_node_types"]["ray.head.default"]["resources"]
    cmd = cluster.start_head_command(None, port=6390, dashboard_port=8290, temp_dir="/tmp/x",
                                     autoscaling_config="/tmp/x/as.yaml", head_resources=head)
    assert cmd[:5] == [sys.executable, "-m", "ray.scripts.scripts", "start", "--head"]
    assert {"--port=6390", "--dashboard-port=8290", "--dashboard-host=127.0.0.1",
            "--temp-dir=/tmp/x", "--autoscaling-config=/tmp/x/as.yaml",
            f"--num-cpus={head['CPU']}",
            f"--object-store-memory={head['object_store_memory']}"} <= set(cmd)
    # Exactly the config's head CPUs, never the overcommitted default on top.
    assert [a for a in cmd if a.startswith("--num-cpus")] == [f"--num-cpus={head['CPU']}"]
    assert cluster.head_resource_args({"CPU": 2, "GPU": 1, "accel": 4}) == [
        "--num-cpus=2", "--num-gpus=1", '--resources={"accel": 4}']
    # Without autoscaling: no autoscaler flag, and the usual CPU default.
    plain = cluster.start_head_command(None)
    assert not any(a.startswith("--autoscaling-config") for a in plain)

    env = cluster._head_env(fake_cluster=True)
    assert env["RAY_FAKE_CLUSTER"] == "1" and env["RAY_AUTH_MODE"] == "token"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    monkeypatch.delenv("RAY_FAKE_CLUSTER", raising=False)
    assert "RAY_FAKE_CLUSTER" not in cluster._head_env()


def test_resolve_fills_gcs_address_for_the_port(local_cfg):
    out = cluster.resolve_autoscaling_config(local_cfg, 6390, "10.0.0.7")
    assert out["provider"]["gcs_address"] == "10.0.0.7:6390"
    assert "gcs_address" not in local_cfg["provider"]  # a copy
    pinned = {**local_cfg, "provider": {**local_cfg["provider"], "gcs_address": "h:1"}}
    assert cluster.resolve_autoscaling_config(pinned, 6390, "x")["provider"]["gcs_address"] == "h:1"


def test_cluster_up_refuses_disagreeing_num_cpus(tmp_path):
    port, dash = _free_port(), _free_port()
    with pytest.raises(conn.ClusterError, match="disagrees"):
        cluster.cluster_up(3, port=port, dashboard_port=dash, temp_dir=str(tmp_path),
                           autoscaling=str(LOCAL_YAML))
    written = yaml.safe_load((tmp_path / f"steelworks-autoscaling-{port}.yaml").read_text())
    assert written["provider"]["gcs_address"].endswith(f":{port}")


def test_cli_cluster_up_autoscaling(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "cluster_up", lambda *a, **kw: calls.append((a, kw)))
    parser = argparse.ArgumentParser(prog="steelworks")
    cli.add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cluster", "up", "--autoscaling", "cluster-local.yaml",
                              "--port", "6390", "--dashboard-port", "8290",
                              "--ray-arg=--dashboard-agent-listen-port=52366"])
    assert args.func(args) == 0
    (a, kw), = calls
    assert a[1:3] == (6390, 8290)
    assert kw == {"autoscaling": "cluster-local.yaml",
                  "extra_args": ["--dashboard-agent-listen-port=52366"]}


class _Proc:
    def __init__(self, pid: int, name: str, cmd: str) -> None:
        self.pid, self._name, self._cmd = pid, name, cmd

    def name(self) -> str:
        return self._name

    def cmdline(self) -> list[str]:
        return self._cmd.split()


def test_cluster_down_stops_the_autoscaler_before_listing_nodes(monkeypatch):
    """The autoscaler may start a node while we stop the others: it is stopped first, and
    the nodes are listed after that (a node it started meanwhile is then found too)."""
    monitor = _Proc(1, "python3", "python -u .../ray/autoscaler/_private/monitor.py --logs-dir=x")
    head_raylet, late_raylet = _Proc(2, "raylet", "raylet"), _Proc(3, "raylet", "raylet")
    gcs = _Proc(4, "gcs_server", "gcs_server")
    scans = iter([[monitor, head_raylet, gcs], [head_raylet, late_raylet, gcs]])
    monkeypatch.setattr(cluster, "_cluster_processes", lambda port: next(scans))
    stopped: list[list[int]] = []
    monkeypatch.setattr(cluster, "_terminate", lambda procs, grace: stopped.append(
        [p.pid for p in procs]))
    assert cluster.cluster_down(6390) == 0
    assert stopped == [[1], [2, 3], [], [4]]  # monitor, raylets, others, GCS last


# ----------------------------------------------------------------------------- end to end


def _free_port() -> int:
    # Kernel-assigned ports lie above Ray's worker port range (10002-19999).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raylets(port: int) -> list[int]:
    out = []
    for p in cluster._cluster_processes(port):
        try:
            if p.name() == "raylet":
                out.append(p.pid)
        except Exception:  # gone meanwhile
            continue
    return out


def _wait(what: str, cond, deadline: float, poll_s: float = 1.0):
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


# One job: an actor needing 2 CPUs (the head has 1) holds one worker node; a task needing
# 2 CPUs then needs a second node, which turns idle when the task ends. Bounded: the driver
# exits by itself after 120 s if `cluster down` never comes.
_JOB = """
import ray, time
ray.init()
@ray.remote(num_cpus=2)
class Holder:
    def node(self):
        return ray.get_runtime_context().get_node_id()
@ray.remote(num_cpus=2)
def task():
    return ray.get_runtime_context().get_node_id()
holder = Holder.remote()
print("TASK_NODE", ray.get(task.remote(), timeout=100), flush=True)
print("ACTOR_NODE", ray.get(holder.node.remote(), timeout=100), flush=True)
time.sleep(120)
"""


@pytest.mark.ray
@pytest.mark.faults
def test_local_autoscaling_adds_and_removes_nodes(tmp_path, monkeypatch):
    """cluster up --autoscaling on free ports with its own temp dir; work that does not fit
    on the 1-CPU head makes the autoscaler add two 2-CPU nodes, the one whose task finished
    is removed when idle, and cluster down stops everything, the node still held included.
    About 60-80 s on 2 busy cores; every wait has a deadline."""
    t0 = time.monotonic()
    cfg = yaml.safe_load(LOCAL_YAML.read_text(encoding="utf-8"))
    cfg["idle_timeout_minutes"] = 0.25  # 15 s instead of 30: keeps the test short
    cfg_path = tmp_path / "cluster-local.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")  # Ray's default is 5 s
    monkeypatch.setenv("AUTOSCALER_METRIC_PORT", str(_free_port()))  # 44217 may be taken
    port, dashboard, client, agent = (_free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="sw-as-", dir="/tmp")  # short: unix socket paths
    url = f"http://127.0.0.1:{dashboard}"
    fake_raylets: set[int] = set()
    try:
        cluster.cluster_up(None, port=port, dashboard_port=dashboard, temp_dir=temp_dir,
                           extra_args=[f"--ray-client-server-port={client}",
                                       f"--dashboard-agent-listen-port={agent}"],
                           autoscaling=str(cfg_path))
        (head_raylet,) = _raylets(port)
        # As `steelworks submit` sends a job to a local cluster: no working_dir package (fake
        # nodes share the head's session dir, and one joining mid-job would re-unpack it over
        # the running driver's cwd), the job run in place in its directory.
        (tmp_path / "job.py").write_text(_JOB)
        assert jobs.run_job(jobs.in_place([sys.executable, "job.py"], tmp_path), url,
                            str(tmp_path), wait=False, upload=False) == 0

        nodes = _wait("two worker nodes", lambda: (r := _raylets(port)) and len(r) == 3 and r,
                      time.monotonic() + 75)
        fake_raylets = set(nodes) - {head_raylet}
        log = Path(temp_dir) / "session_latest" / "logs" / "monitor.log"
        _wait("the idle node's removal",
              lambda: "Removing 1 nodes of type cpu_worker (idle)" in log.read_text(),
              time.monotonic() + 45)
        remaining = _wait("two raylets left", lambda: (r := _raylets(port)) and len(r) == 2
                          and r, time.monotonic() + 15)
        assert re.search(r"Adding \d node\(s\) of type cpu_worker", log.read_text())
        (held,) = set(remaining) - {head_raylet}
        assert held in fake_raylets
    finally:
        cluster.cluster_down(port, grace_s=5)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert cluster._cluster_processes(port) == []
    import psutil

    for pid in fake_raylets:  # the node the actor held was a live fake node at `down`
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert time.monotonic() - t0 < 150
