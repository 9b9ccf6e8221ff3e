"""Atomic writes, manifests and stage caching."""

from __future__ import annotations

import json
import os

import pytest

from steelworks.core.atomic import atomic_open, atomic_write_json, sha256_file
from steelworks.core.rundir import MANIFEST, Stage, StageInputError


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["out.json"]


def test_crash_mid_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(p) as f:
        f.write("new, half written")
        raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["data.txt"]


def test_killed_process_leaves_old_file(tmp_path):
    """A process killed (SIGKILL) mid-write: the target still holds the previous content."""
    import subprocess
    import sys

    p = tmp_path / "data.bin"
    p.write_bytes(b"previous")
    code = ("import os,sys\nfrom steelworks.core.atomic import atomic_open\n"
            f"with atomic_open({str(p)!r}, 'wb') as f:\n"
            "    f.write(b'x' * 1000)\n    f.flush()\n    os.kill(os.getpid(), 9)\n")
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -9
    assert p.read_bytes() == b"previous"


def _stage(tmp_path, config, inputs=()):
    return Stage.open(tmp_path, "run1", "stage_b" if inputs else "stage_a", config, list(inputs))


def test_manifest_records_outputs_and_caching(tmp_path):
    s = _stage(tmp_path, {"x": 1})
    assert not s.is_current()
    s.path("out/a.txt").write_text("hello")
    m = s.finish(["out/a.txt"], metrics={"n": 3})
    assert m["outputs"]["out/a.txt"] == {"sha256": sha256_file(s.dir / "out/a.txt"), "bytes": 5}
    assert m["config"] == {"x": 1} and m["metrics"] == {"n": 3}
    assert {"started_at", "ended_at", "steelworks_version", "fingerprint"} <= set(m)
    assert _stage(tmp_path, {"x": 1}).is_current()  # unchanged -> skipped
    assert not _stage(tmp_path, {"x": 2}).is_current()  # config changed -> re-run
    (s.dir / "out/a.txt").write_text("changed!")  # output damaged -> re-run
    assert not _stage(tmp_path, {"x": 1}).is_current()


def test_downstream_reruns_when_input_manifest_changes(tmp_path):
    a = _stage(tmp_path, {"x": 1})
    a.path("a.txt").write_text("a")
    a.finish(["a.txt"])
    b = _stage(tmp_path, {"y": 1}, inputs=["stage_a"])
    b.path("b.txt").write_text("b")
    b.finish(["b.txt"])
    assert b.dir.joinpath(MANIFEST).exists() and _stage(tmp_path, {"y": 1}, ["stage_a"]).is_current()
    a2 = _stage(tmp_path, {"x": 2})
    a2.path("a.txt").write_text("a2")
    a2.finish(["a.txt"])
    assert not _stage(tmp_path, {"y": 1}, ["stage_a"]).is_current()


def test_missing_input_stage_is_a_clear_error(tmp_path):
    b = _stage(tmp_path, {}, inputs=["stage_a"])
    with pytest.raises(StageInputError, match="stage_a.*has not completed"):
        b.fingerprint  # noqa: B018


def test_declared_output_must_exist(tmp_path):
    s = _stage(tmp_path, {})
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        s.finish(["nope.txt"])
    assert not (s.dir / MANIFEST).exists()


def test_invalidate_removes_manifest_first(tmp_path):
    s = _stage(tmp_path, {})
    s.path("a").write_text("1")
    s.finish(["a"])
    s.invalidate()
    assert not os.path.exists(s.dir / MANIFEST) and not s.is_current()
