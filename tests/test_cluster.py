"""cluster.yaml against Ray's schema, submit's command building, and one real
`cluster up -> ray job submit -> cluster down` round trip with token auth on."""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from steelworks.platform import cli, cluster, jobs
from steelworks.platform import connect as conn

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


# ----------------------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def test_cluster_yaml_matches_ray_autoscaler_schema(cluster_cfg):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    # The file as written (the schema forbids unknown keys in node types, so typos fail) ...
    jsonschema.validate(cluster_cfg, schema)
    # ... and the way `ray up` sees it: merged with the AWS defaults, then Ray's own checks
    # (head type exists, sum of min_workers <= max_workers, ...).
    validate_config(prepare_config(copy.deepcopy(cluster_cfg)))

    broken = copy.deepcopy(cluster_cfg)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo'd key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_shape(cluster_cfg):
    types = cluster_cfg["available_node_types"]
    head = types[cluster_cfg["head_node_type"]]
    assert set(head["resources"]) == {"CPU"}
    gpu = [t for name, t in types.items() if name != cluster_cfg["head_node_type"]]
    assert gpu and all(t["resources"].get("GPU", 0) > 0 and t["min_workers"] == 0 for t in gpu)
    assert cluster_cfg["file_mounts"]["~/steelworks"] == "."
    assert any("pip install -e ~/steelworks" in c for c in cluster_cfg["setup_commands"])
    assert {".venv", "runs"} <= set(cluster_cfg["rsync_exclude"])
    assert cluster_cfg["idle_timeout_minutes"] > 0
    # Runs go to a bucket (the nodes share no disk): every node gets the instance profile
    # that grants it, and the documented submit line names an s3:// runs_dir.
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert "--set runs_dir=s3://" in CLUSTER_YAML.read_text(encoding="utf-8")


def test_cluster_yaml_keeps_token_auth_on(cluster_cfg):
    starts = cluster_cfg["head_start_ray_commands"] + cluster_cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for cmd in starts:
        # Each command runs in a fresh shell: the mode must be set in the command itself.
        assert "RAY_AUTH_MODE=token" in cmd, cmd
        assert "disabled" not in cmd
    # Workers verify the head's token, so every node must get the same one.
    assert cluster_cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The job API runs arbitrary code: loopback only (reached via `ray dashboard`).
    assert "--dashboard-host=127.0.0.1" in ray_starts[0]


# ----------------------------------------------------------------------------- submit building


def _runtime_env(cmd: list[str]) -> dict:
    (arg,) = [a for a in cmd if a.startswith("--runtime-env-json=")]
    return json.loads(arg.split("=", 1)[1])


def test_build_submit_command(tmp_path):
    cmd = jobs.build_submit_command(["python", "-m", "steelworks", "pipeline"],
                                    "http://127.0.0.1:8265", str(tmp_path), wait=True,
                                    extra_env={"FOO": "bar"})
    assert cmd[:3] == [sys.executable, "-m", "ray.scripts.scripts"]
    assert cmd[3:5] == ["job", "submit"]
    assert "--address=http://127.0.0.1:8265" in cmd
    assert f"--working-dir={tmp_path.resolve()}" in cmd
    assert "--no-wait" not in cmd
    # The entrypoint comes last, after `--`, untouched.
    sep = cmd.index("--")
    assert cmd[sep + 1:] == ["python", "-m", "steelworks", "pipeline"]
    env = _runtime_env(cmd)
    assert {".venv", "runs", ".git"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert env["env_vars"]["FOO"] == "bar"
    assert "--no-wait" in jobs.build_submit_command(["true"], "http://h:1", wait=False)


def test_a_local_cluster_gets_no_package_and_runs_in_place(tmp_path, monkeypatch):
    """Issue 19, point 4: on a cluster that shares this disk (a loopback address) `submit`
    uploads nothing, and the job runs this interpreter in the working directory; a remote
    address gets the working_dir package as before. --upload/--no-upload override."""
    calls = []
    monkeypatch.setattr(jobs, "run_job", lambda entry, url, wd, wait, env, upload: calls.append(
        (entry, upload)) or 0)
    assert jobs.submit(["data", "--config", "c.yaml"], "http://127.0.0.1:8265", str(tmp_path)) == 0
    entry, upload = calls[-1]
    assert upload is False and entry[:2] == ["sh", "-c"]
    inner = shlex.split(entry[2])
    assert inner[:3] == ["cd", str(tmp_path.resolve()), "&&"] and inner[3] == "exec"
    assert inner[4:8] == [sys.executable, "-m", "steelworks", "data"]
    assert jobs.submit(["data"], "http://10.0.0.5:8265", str(tmp_path)) == 0
    assert calls[-1] == (["python", "-m", "steelworks", "data"], True)
    assert jobs.submit(["data"], "http://127.0.0.1:8265", str(tmp_path), upload=True) == 0
    assert calls[-1][1] is True and calls[-1][0][0] == "python"
    # Without a package the submit command has no --working-dir and no excludes.
    cmd = jobs.build_submit_command(entry, "http://127.0.0.1:8265", str(tmp_path), upload=False)
    assert not [a for a in cmd if a.startswith("--working-dir")]
    assert "excludes" not in _runtime_env(cmd) and _runtime_env(cmd)["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert cmd[cmd.index("--") + 1:] == entry


def test_auth_env_forces_token_mode(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("SOME_VAR", "kept")
    env = conn.auth_env()
    assert env["RAY_AUTH_MODE"] == "token" and env["SOME_VAR"] == "kept"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # a copy: our own env is untouched
    assert cluster._head_env()["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_runs_dir_made_absolute_for_local_cluster(tmp_path):
    entry = jobs.steelworks_entrypoint(["pipeline", "--config", "c.yaml"],
                                       "http://127.0.0.1:8265", str(tmp_path))
    assert entry[:4] == ["python", "-m", "steelworks", "pipeline"]
    assert entry[-2:] == ["--set", f"runs_dir={tmp_path.resolve() / 'runs'}"]
    assert Path(entry[-1].split("=", 1)[1]).is_absolute()

    # A relative runs_dir from the config file is kept, but anchored to the working dir.
    (tmp_path / "c.yaml").write_text("run: x\nruns_dir: out/runs\n")
    entry = jobs.steelworks_entrypoint(["pipeline", "-c", "c.yaml"], "http://localhost:8265",
                                       str(tmp_path))
    assert entry[-1] == f"runs_dir={tmp_path.resolve() / 'out' / 'runs'}"


@pytest.mark.parametrize("args,address", [
    (["pipeline", "--set", "runs_dir=/data/runs"], "http://127.0.0.1:8265"),  # user override
    (["pipeline", "--set=runs_dir=/data/runs"], "http://127.0.0.1:8265"),
    (["pipeline"], "http://10.0.0.5:8265"),  # remote: its filesystem is not ours
])
def test_runs_dir_left_alone(args, address, tmp_path):
    assert jobs.steelworks_entrypoint(args, address, str(tmp_path)) == [
        "python", "-m", "steelworks", *args]


def test_runs_dir_absolute_in_config_left_alone(tmp_path):
    (tmp_path / "c.yaml").write_text("runs_dir: /abs/runs\n")
    args = ["pipeline", "--config", "c.yaml"]
    assert jobs.steelworks_entrypoint(args, "http://127.0.0.1:8265", str(tmp_path))[3:] == args


def test_dashboard_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.dashboard_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not a job API URL
    assert jobs.dashboard_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert jobs.dashboard_address() == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.2:8265")
    assert jobs.dashboard_address() == "http://10.0.0.2:8265"
    assert jobs.dashboard_address("127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert jobs.is_local_address("http://localhost:8265")
    assert not jobs.is_local_address("https://ray.example.com")


def test_start_head_command():
    cmd = cluster.start_head_command(None, port=6390, dashboard_port=8275, temp_dir="/tmp/x")
    assert cmd[3:5] == ["start", "--head"]
    assert {"--port=6390", "--dashboard-port=8275", "--dashboard-host=127.0.0.1",
            "--temp-dir=/tmp/x"} <= set(cmd)
    assert f"--num-cpus={max(4, os.cpu_count() or 1)}" in cmd


# ----------------------------------------------------------------------------- CLI + connect


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steelworks")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_cluster_commands(sub)
    return parser


def test_cli_submit_collects_its_options_anywhere(monkeypatch):
    seen = {}

    def fake_submit(*a) -> int:
        seen["call"] = a
        return 0

    monkeypatch.setattr(cli, "submit", fake_submit)
    args = _parser().parse_args(["submit", "--env", "A=1", "pipeline", "--config", "c.yaml",
                                 "--set", "x.y=2", "--address", "http://h:8265", "--no-wait"])
    assert args.func(args) == 0
    job, address, working_dir, wait, env, upload = seen["call"]
    assert job == ["pipeline", "--config", "c.yaml", "--set", "x.y=2"]
    assert (address, working_dir, wait, env, upload) == ("http://h:8265", ".", False, {"A": "1"}, None)
    args = _parser().parse_args(["submit", "pipeline", "--no-upload"])
    assert args.func(args) == 0 and seen["call"][5] is False
    args = _parser().parse_args(["submit", "--upload", "pipeline"])
    assert args.func(args) == 0 and seen["call"][5] is True

    # After `--` everything belongs to the job, even options named like ours.
    args = _parser().parse_args(["submit", "--", "pipeline", "--no-wait"])
    assert args.func(args) == 0
    assert seen["call"][0] == ["pipeline", "--no-wait"] and seen["call"][3] is True

    args = _parser().parse_args(["submit"])
    assert args.func(args) == 2  # no command: a usage error, not a job


def test_cli_cluster_parses(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "cluster_down",
                        lambda port, all_local: calls.append((port, all_local)) or 0)
    args = _parser().parse_args(["cluster", "down", "--port", "6390"])
    assert args.func(args) == 0 and calls == [(6390, False)]
    statuses = []
    monkeypatch.setattr(cli, "cluster_status", lambda address: statuses.append(address) or 0)
    for argv in (["cluster", "status"], ["cluster", "status", "--port", "6390"]):
        args = _parser().parse_args(argv)
        assert args.func(args) == 0
    assert statuses == [None, "127.0.0.1:6390"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["cluster", "sideways"])


class _FakeRay:
    """Stands in for `ray` so that connect()'s choices can be checked without a cluster."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)


@pytest.fixture
def fake_ray(monkeypatch):
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    # The real refresh would reset the config of a Ray session this process may hold.
    monkeypatch.setattr(conn, "_enable_token_auth_in_process",
                        lambda: os.environ.__setitem__("RAY_AUTH_MODE", "token"))
    for var in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    return fake


def test_connect_choices(fake_ray, monkeypatch):
    assert "local" in conn.connect(num_cpus=3)
    assert fake_ray.calls[-1]["address"] == "local" and fake_ray.calls[-1]["num_cpus"] == 3
    assert os.environ["RAY_AUTH_MODE"] == "token"
    conn.connect()
    assert fake_ray.calls[-1]["num_cpus"] >= 4  # overcommitted on small machines

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    conn.connect()
    assert fake_ray.calls[-1]["address"] == "10.0.0.1:6379"
    conn.connect("10.0.0.9:6379")
    assert fake_ray.calls[-1]["address"] == "10.0.0.9:6379"

    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    conn.connect()
    assert fake_ray.calls[-1]["address"] == "auto"

    with pytest.raises(conn.ClusterError, match="dashboard URL"):
        conn.connect("http://127.0.0.1:8265")


# ----------------------------------------------------------------------------- end to end


def _free_port() -> int:
    # Kernel-assigned ports lie above Ray's worker port range (10002-19999).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_cluster_up_submit_down(capfd):
    """A real head on free ports and its own temp dir, a job through `ray job submit`, and a
    teardown that stops only this cluster's processes (`ray stop` would also kill the
    session-wide `ray_local` fixture and any other Ray program on the machine)."""
    port, dashboard, client, agent = (_free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="sw-ray-", dir="/tmp")  # short: unix socket paths
    url = f"http://127.0.0.1:{dashboard}"
    try:
        cluster.cluster_up(2, port=port, dashboard_port=dashboard, temp_dir=temp_dir,
                           extra_args=[f"--ray-client-server-port={client}",
                                       f"--dashboard-agent-listen-port={agent}"])
        out = capfd.readouterr().out
        assert "export RAY_AUTH_MODE=token" in out and url in out
        with pytest.raises(conn.ClusterError, match="already in use"):
            cluster.cluster_up(2, port=port, dashboard_port=dashboard, temp_dir=temp_dir)

        code = jobs.run_job(
            ["python", "-c", "import ray, steelworks; ray.init(); "
             "print('RESOURCES', ray.cluster_resources()['CPU'])"],
            url, working_dir=str(ROOT))
        out = capfd.readouterr().out
        assert code == 0, out
        assert "RESOURCES 2.0" in out

        # Token auth really is on: the same submission without the mode is refused.
        cmd = jobs.build_submit_command(["python", "-c", "pass"], url, str(ROOT))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        denied = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert denied.returncode != 0
        assert "Unauthorized" in denied.stdout + denied.stderr
    finally:
        cluster.cluster_down(port, grace_s=5)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert cluster._cluster_processes(port) == []
