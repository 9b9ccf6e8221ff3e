"""Driver faults: the pipeline's driver SIGKILLed mid-pretrain together with its local Ray
cluster, then the same command run again (a re-submission after a lost head node or a
`ray job stop`).

The re-run must skip the finished stages (data, tokenizer), resume pretraining from the last
*complete* checkpoint (a ``step_N.tmp/`` left by a kill mid-save does not count), never
rewrite a checkpoint written before the kill, and end with the loss curve of a run that was
never interrupted.

`ray job stop` (Ray 2.60, dashboard/modules/job/job_supervisor.py) sends SIGTERM to the
entrypoint and all its descendants, waits ``RAY_JOB_STOP_WAIT_TIME_S`` (default 3 s), then
SIGKILLs them; Ray's SIGTERM handler in a driver only calls ``sys.exit``, and nothing in the
pipeline catches that to clean up. The Ray Train controller and workers are actors owned by
the driver, so the GCS kills them when it dies, wherever they were -- the state this test
makes with SIGKILL. Checkpoints are written to ``step_N.tmp/`` and renamed only when
complete, so either way the run directory holds the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.faults, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 60
CKPT_EVERY = 5
TINY = [
    "tokenizer.vocab_size=600", "pack.seq_len=64",
    "pretrain.model.size=tiny", f"pretrain.max_steps={MAX_STEPS}", "pretrain.micro_batch_size=2",
    "pretrain.num_workers=1", "pretrain.optim.warmup_steps=1", "pretrain.tensorboard=false",
    # Log where it saves: each logged or saved step is a Ray Train report (a round trip to
    # the controller, seconds per step on a loaded 2-core machine); keep every checkpoint.
    f"pretrain.log_every={CKPT_EVERY}", f"pretrain.ckpt_every={CKPT_EVERY}", "pretrain.keep_last=1000",
    "ray.num_cpus=2",  # a Ray Train worker + Ray Data tasks; fewer idle workers to start
]
MARK = "STEELWORKS_FAULT_TEST"  # env var that every process of this test's runs inherits


def _marked(token: str) -> list:
    """Live processes (driver, GCS, raylet, Ray workers ...) whose environment carries
    ``token``. The environment survives setproctitle (``ray::RayTrainWorker``), which
    rewrites the command line that ``pgrep -f`` would search."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARK) == token:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _kill(procs: list) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=5)


def _kill_run(proc: subprocess.Popen, token: str) -> list[str]:
    """SIGKILL the driver's process group (driver, GCS, raylet), then, by pid, the Ray
    workers that live in process groups of their own; returns those workers' names."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    # Orphaned workers notice the dead raylet only after a while (2.5 s to ~30 s seen here)
    # and a RayTrainWorker keeps training until then (it logged one more step after the
    # kill): left alone, it could still write into the run directory during the re-run.
    orphans, names = _marked(token), []
    for p in orphans:
        try:
            names.append(p.name())
        except psutil.Error:
            continue
    _kill(orphans)
    return sorted(names)


def _wait_gone(token: str, wait_s: float) -> list:
    deadline = time.monotonic() + wait_s
    while (left := _marked(token)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _complete(ckpts: Path) -> list[Path]:
    """Checkpoint directories the trainer would resume from (see train/checkpoint.py)."""
    return sorted(p for p in ckpts.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "meta.json").exists())


def _fingerprint(d: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file below ``d``."""
    return {str(f.relative_to(d)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(d.rglob("*")) if f.is_file()}


def _rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


@pytest.fixture
def driver_env(tmp_path):
    """Env for the drivers: a unique marker and a private, short Ray temp dir (unix socket
    paths are limited to 107 bytes), so nothing collides with other Ray users here."""
    ray_tmp = tempfile.mkdtemp(prefix="swf-", dir="/tmp")
    env = {**os.environ, MARK: uuid.uuid4().hex, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # never a developer's cluster
        env.pop(var, None)
    yield env
    _kill(_marked(env[MARK]))  # only processes of this test's runs, by pid
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def run_config(tmp_path) -> Path:
    """A files-source run on the demo world's pretraining text, without SFT data and dedup:
    the data and tokenizer stages are real (Ray Data) but as small as they get."""
    from steelworks.data.config import DemoCorpusConfig
    from steelworks.data.demo_corpus import generate

    generate(DemoCorpusConfig(num_entities=12, pretrain_renderings=4), tmp_path / "corpus")
    cfg = {"run": "faulty", "runs_dir": str(tmp_path / "runs"),
           "stages": ["data", "tokenizer", "pretrain"],
           "data": {"source": "files", "dedup": {"exact": False},  # no shuffle: seconds less
                    "sources": [{"name": "demo", "path": str(tmp_path / "corpus" / "pretrain.jsonl")}]}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_killed_driver_resubmitted_resumes_without_overwriting(tmp_path, driver_env, run_config):
    from steelworks.train.checkpoint import latest_checkpoint

    root = tmp_path / "runs" / "faulty"
    ckpts = root / "pretrain" / "checkpoints"
    cmd = [sys.executable, "-m", "steelworks", "pipeline", "--config", str(run_config),
           *(a for s in TINY for a in ("--set", s))]
    token = driver_env[MARK]

    # ---- 1. run until pretrain has a complete checkpoint, then SIGKILL everything
    log1 = tmp_path / "run1.log"
    with open(log1, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=driver_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group
    try:
        deadline = time.monotonic() + 400  # a bound for a loaded 2-core machine, not a target
        while not _complete(ckpts):
            assert proc.poll() is None, f"driver exited ({proc.returncode}) before a checkpoint:\n" \
                + log1.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time:\n" + log1.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        orphans = _kill_run(proc, token)
    assert _marked(token) == [], "processes of the killed run are still alive"
    assert not (root / "pretrain" / "manifest.json").exists(), "pretrain finished before the kill"
    before = {p.name: _fingerprint(p) for p in _complete(ckpts)}
    last = latest_checkpoint(ckpts)
    last_step = json.loads((last / "meta.json").read_text())["step"]
    assert last_step < MAX_STEPS
    upstream = {s: ((root / s / "manifest.json").read_bytes(), (root / s / "manifest.json").stat().st_mtime_ns)
                for s in ("data", "tokenizer")}
    rows_before = _rows(root / "pretrain" / "metrics.jsonl")

    # A kill mid-save leaves step_N.tmp/. If this one did not, plant one: a copy of the last
    # good checkpoint claiming the next step, as a save that wrote meta.json but was killed
    # before the rename. Resuming from it would show up as a resume at that step.
    pending = last_step + CKPT_EVERY
    killed_tmp = sorted(p.name for p in ckpts.glob("step_*.tmp"))
    if not (ckpts / f"step_{pending:08d}.tmp").exists():
        planted = ckpts / f"step_{pending:08d}.tmp"
        shutil.copytree(last, planted)
        meta = json.loads((planted / "meta.json").read_text())
        (planted / "meta.json").write_text(json.dumps({**meta, "step": pending}))

    # ---- 2. the same command again (the re-submission)
    log2 = tmp_path / "run2.log"
    try:
        with open(log2, "wb") as out:
            rerun = subprocess.run(cmd, cwd=ROOT, env=driver_env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, timeout=400)
    finally:
        leftovers = _wait_gone(token, 15.0)  # ray.shutdown() at exit stops its own cluster
        _kill(leftovers)
    text2 = log2.read_text()
    assert rerun.returncode == 0, text2[-4000:]

    # The finished stages were not re-run: same manifests, and the log says so.
    for s, (manifest, mtime) in upstream.items():
        assert (root / s / "manifest.json").read_bytes() == manifest, f"{s} was re-run"
        assert (root / s / "manifest.json").stat().st_mtime_ns == mtime, f"{s} was re-run"
        assert f"stage {s} is up to date" in text2, f"no skip message for {s}"

    # Pretrain resumed from the last complete checkpoint, not from the .tmp one ...
    assert f"stage pretrain: resuming from {ckpts}" in text2
    assert f"resumed from {last} at step {last_step}" in text2, text2[-4000:]
    assert f"at step {pending}" not in text2
    # ... so the rows up to it are the killed run's, then one row per log window, each once.
    rows = _rows(root / "pretrain" / "metrics.jsonl")
    logged = list(range(CKPT_EVERY, MAX_STEPS + 1, CKPT_EVERY))
    assert [r["step"] for r in rows] == logged, "each logged step once, in order"
    kept = [r for r in rows_before if r["step"] <= last_step]
    assert rows[:len(kept)] == kept and len(kept) == last_step // CKPT_EVERY
    assert json.loads((root / "pretrain" / "manifest.json").read_text())["metrics"]["final_step"] == MAX_STEPS

    # No checkpoint written before the kill was rewritten (bytes and mtimes) or removed; the
    # unfinished one was written again from scratch.
    for name, files in before.items():
        assert _fingerprint(ckpts / name) == files, f"{name} was overwritten"
    assert not list(ckpts.glob("step_*.tmp"))
    assert [p.name for p in _complete(ckpts)] == [f"step_{s:08d}" for s in logged]
    assert json.loads((ckpts / f"step_{pending:08d}" / "meta.json").read_text())["step"] == pending

    # ---- 3. the loss curve of an uninterrupted run (one process, CPU, fp32). Each row is
    # the mean over its log window, so a step skipped or repeated by the resume shows too.
    import numpy as np
    import torch

    from steelworks.core.config import load, to_dict
    from steelworks.platform.settings import PipelineConfig
    from steelworks.train.driver import run_training

    cfg = load(PipelineConfig, run_config, [*TINY, "pretrain.ckpt_every=0"])  # no saves needed
    tok = root / "tokenizer"
    ref = tmp_path / "reference"
    job = {"task": "pretrain", "train": to_dict(cfg.pretrain), "tokenizer_dir": str(tok / "tokenizer"),
           "data_dir": str(tok / "shards" / "pretrain"), "out_dir": str(ref)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray gives a 1-CPU worker; and 2 threads crawl on a busy box
    try:
        run_training(job, cfg.pretrain, use_ray=False)
    finally:
        torch.set_num_threads(threads)
    # Equal bit for bit in practice; the tolerance only keeps float summation order from
    # ever making this flaky. A wrong resume point, loader position or RNG state moves the
    # loss by ~1e-2.
    np.testing.assert_allclose([r["loss"] for r in rows],
                               [r["loss"] for r in _rows(ref / "metrics.jsonl")], rtol=1e-6)
    print(f"\nkilled after the step-{last_step} checkpoint; .tmp left by the kill: {killed_tmp or 'none'};"
          f" Ray workers that outlived the process group: {orphans or 'none'}")
