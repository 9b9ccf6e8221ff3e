"""Runs in a bucket (runs_dir: s3://...; platform/storage.py) against moto's S3 server on
loopback: the object operations, a stage's cache and manifest in the bucket, and a training
run killed mid-way that resumes on a "new node" (no local copy) from its bucket checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_train import _job, _losses, _run_in_subprocess, demo_data  # noqa: F401  (a fixture)

from steelworks.core.faults import fault
from steelworks.core.rundir import MANIFEST, Stage, StageInputError, stage_path
from steelworks.core.storage import Remote, is_uri, mirror_root


def test_uri_or_path():
    assert is_uri("s3://b/p") and is_uri("gs://b") and not is_uri("runs") and not is_uri("/tmp/x")
    with pytest.raises(ValueError, match="names no bucket"):
        Remote("s3:///x")


def test_object_operations(s3_bucket, tmp_path):
    r = Remote(f"{s3_bucket}/some/dir")
    assert r.size("a.txt") is None and r.listing() == {} and r.dirs() == []
    r.write_json("a.txt", {"x": 1})
    assert r.read_json("a.txt") == {"x": 1}
    (tmp_path / "big.bin").write_bytes(b"\0" * 3_000_000)
    r.upload(tmp_path / "big.bin", "sub/big.bin")
    assert r.listing() == {"a.txt": r.size("a.txt"), "sub/big.bin": 3_000_000}
    assert r.dirs() == ["sub"]
    got = r.download("sub/big.bin", tmp_path / "copy" / "big.bin")
    assert got.read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert not list((tmp_path / "copy").glob(".*.tmp")), "no temporary left behind"
    with pytest.raises(FileNotFoundError, match="some/dir/nope"):
        r.read_bytes("nope")
    r.delete("sub")
    assert r.listing() == {"a.txt": r.size("a.txt")}


def test_mirror_fetches_only_what_changed(s3_bucket, tmp_path):
    r = Remote(f"{s3_bucket}/ckpt")
    assert not r.mirror(tmp_path / "m", "meta.json"), "no marker: not complete"
    r.write_bytes("data.bin", b"one")
    r.write_bytes("meta.json", b'{"step": 1}')
    assert r.mirror(tmp_path / "m", "meta.json")
    assert (tmp_path / "m" / "data.bin").read_bytes() == b"one"
    # A new version under the same names (a re-saved step): the changed marker fetches all.
    r.write_bytes("data.bin", b"two")
    r.write_bytes("meta.json", b'{"step": 2}')
    assert r.mirror(tmp_path / "m", "meta.json")
    assert (tmp_path / "m" / "data.bin").read_bytes() == b"two"


def _finished(s3_bucket: str, name: str, text: str, inputs: tuple[str, ...] = ()) -> Stage:
    stage = Stage.open(f"{s3_bucket}/runs", "r", name, {"text": text}, inputs)
    assert not stage.is_current()
    stage.invalidate()
    stage.path("out/a.txt").write_text(text)
    stage.finish(["out/a.txt"])
    return stage


def test_stage_lives_in_the_bucket(s3_bucket, tmp_path):
    stage = _finished(s3_bucket, "first", "hello")
    remote = Remote(f"{s3_bucket}/runs/r/first")
    assert stage.dir == mirror_root(f"{s3_bucket}/runs/r") / "first"
    assert set(remote.listing()) == {"out/a.txt", MANIFEST}
    assert remote.read_json(MANIFEST)["outputs"]["out/a.txt"]["bytes"] == 5

    # Another node (no local mirror): the stage is current, from the bucket, and a stage
    # after it gets its input fetched.
    shutil.rmtree(stage.dir.parent)
    again = Stage.open(f"{s3_bucket}/runs", "r", "first", {"text": "hello"})
    assert again.is_current()
    assert (again.dir / "out/a.txt").read_text() == "hello"
    shutil.rmtree(stage.dir.parent)
    after = _finished(s3_bucket, "second", "world", inputs=("first",))
    assert (after.inputs["first"] / "out/a.txt").read_text() == "hello"
    assert after.input_manifest("first")["stage"] == "first"

    # An actor on another node, handed a URI inside a finished stage, gets a local copy.
    shutil.rmtree(stage.dir.parent)
    local = stage_path(f"{s3_bucket}/runs/r/first/out/a.txt")
    assert local == stage.dir / "out" / "a.txt" and local.read_text() == "hello"
    assert stage_path("/some/local/dir") == Path("/some/local/dir")

    # An output changed in the bucket: not current. invalidate() removes the marker there.
    remote.write_bytes("out/a.txt", b"hello, changed")
    assert not Stage.open(f"{s3_bucket}/runs", "r", "first", {"text": "hello"}).is_current()
    again.invalidate()
    assert not remote.exists(MANIFEST)
    with pytest.raises(StageInputError, match=f"{s3_bucket}/runs/r/first/manifest.json"):
        Stage.open(f"{s3_bucket}/runs", "r", "third", {}, ("first",)).fingerprint  # noqa: B018


def test_killed_training_resumes_from_the_bucket_on_a_new_node(demo_data, s3_bucket, tmp_path):  # noqa: F811
    """Killed right after step 6 (checkpoints every 4): the step-4 checkpoint and the metrics
    log are in the bucket. The local directory is then deleted, as on a node that never saw
    the run, and training resumes from the bucket with the losses of an uninterrupted run."""
    from steelworks.train.checkpoint import latest_remote_checkpoint
    from steelworks.train.driver import run_training

    straight = tmp_path / "straight"
    job, cfg = _job(demo_data, straight, ckpt_every=4, keep_last=1)
    run_training(job, cfg, use_ray=False)

    broken = tmp_path / "broken"
    job, cfg = _job(demo_data, broken, ckpt_every=4, keep_last=1)
    job["remote_dir"] = f"{s3_bucket}/runs/r/pretrain"
    armed = [fault("train.step", str(tmp_path / "killed"), step=6)]
    assert _run_in_subprocess({**job, "faults": armed}) == 17
    remote = Remote(job["remote_dir"])
    assert latest_remote_checkpoint(remote.child("checkpoints")) == "step_00000004"
    # the metrics log is uploaded with each checkpoint: it covers steps 1-4
    before = [json.loads(x) for x in remote.read_bytes("metrics.jsonl").splitlines()]
    assert [r["step"] for r in before] == list(range(1, 5))
    shutil.rmtree(broken)

    summary = run_training(job, cfg, use_ray=False)
    assert summary["final_step"] == 12
    # Resumed, not started over (which would give the same losses too): steps 1-4 are the
    # killed run's rows from the bucket, wall-clock timings and all.
    rows = [json.loads(x) for x in (broken / "metrics.jsonl").read_text().splitlines()]
    assert rows[:4] == before
    assert _losses(broken) == _losses(straight), "bit for bit, as a resume on local disk"
    # keep_last=1 pruned the bucket too; the exports and reports are there for the driver
    ckpts = remote.child("checkpoints")
    assert ckpts.dirs() == ["step_00000012"] and ckpts.exists("step_00000012/meta.json")
    listing = remote.listing()
    assert {"hf/config.json", "hf/model.safetensors", "summary.json", "metrics.jsonl"} <= set(listing)
    assert listing["hf/model.safetensors"] == (broken / "hf" / "model.safetensors").stat().st_size


@pytest.mark.ray
@pytest.mark.faults  # kills a Ray Train worker and waits for the restart: make test-faults
def test_ray_restart_after_a_killed_worker_resumes_from_the_bucket(demo_data, s3_bucket, tmp_path,  # noqa: F811
                                                                     ray_local):
    """2 Ray Train workers with storage_path in the bucket; rank 1 is killed after step 6.
    The restarted group is handed the step-4 checkpoint by Ray (a bucket path), fetches it
    and finishes with the loss curve of one uninterrupted process."""
    from steelworks.train.driver import run_training

    one = tmp_path / "one"
    job, cfg = _job(demo_data, one, micro_batch_size=4, ckpt_every=4)
    run_training(job, cfg, use_ray=False)

    two = tmp_path / "two"
    job, cfg = _job(demo_data, two, micro_batch_size=2, num_workers=2, ckpt_every=4, max_failures=1)
    job["remote_dir"] = f"{s3_bucket}/runs/r/pretrain"
    job["faults"] = [fault("train.step", str(tmp_path / "killed"), step=6, rank=1)]
    summary = run_training(job, cfg, use_ray=True)
    assert (tmp_path / "killed").exists() and summary["final_step"] == 12
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-4)
    remote = Remote(job["remote_dir"]).child("checkpoints")
    # Ray kept the newest keep_last=2 reported checkpoints, in the bucket
    assert remote.dirs() == ["step_00000008", "step_00000012"]
    assert remote.exists("step_00000012/__1_0.distcp") and remote.exists("checkpoint_manager_snapshot.json")


def test_s3_server_on_a_taken_port_is_an_error_not_a_foreign_endpoint():
    """CI once got a port for moto that another process (Ray's) had taken by the time moto
    started: the readiness check connected to that process, and every S3 test then timed out
    in HeadBucket. Starting on a taken port must fail at once and say so."""
    import socket
    import time

    from conftest import free_port, start_moto_server

    port = free_port()
    with socket.socket() as squatter:  # listens, never answers HTTP: like Ray's gRPC ports
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=f"port {port}"):
            proc = start_moto_server(port)
            proc.terminate()
        assert time.monotonic() - t0 < 30
