"""Long runs lose nothing: which config changes may resume (train/resume.py), and every rank
resuming from the one checkpoint rank 0 chose while an earlier run's worker still writes.
The pipeline-level cases (checkpoints surviving each change) are in test_pipeline.py."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from steelworks.train.config import TrainConfig
from steelworks.train.resume import conflicts, make_key


def _key(inputs=None, **overrides):
    from steelworks.core.config import to_dict

    cfg = to_dict(TrainConfig(micro_batch_size=4, grad_accum=2, num_workers=2))
    for k, v in overrides.items():
        section, _, field = k.rpartition("__")
        (cfg[section] if section else cfg)[field] = v
    return make_key(cfg, inputs or {"tokenizer": "aaa"}, "0.1.0")


@pytest.mark.parametrize("change", [
    {"activation_checkpointing": True}, {"compile": True}, {"kernels": ["rmsnorm", "ce"]},
    {"max_steps": 10_000}, {"epochs": 2.0}, {"extra_data": ["/more"]}, {"ckpt_every": 50},
    {"micro_batch_size": 8, "grad_accum": 1},  # same global batch, 16
    {"micro_batch_size": 2, "grad_accum": 2, "num_workers": 4},  # same global batch, 16
    {"num_workers": 8},  # same per-worker batch: workers added
])
def test_speed_and_length_changes_resume(change):
    assert conflicts(_key(), _key(**change)) == []


@pytest.mark.parametrize("change, field", [
    ({"optim__lr": 1e-4}, "optim.lr"),
    ({"optim__schedule": "wsd"}, "optim.schedule"),
    ({"model__size": "small"}, "model.size"),
    ({"precision": "bf16"}, "precision"),
    ({"seed": 1}, "seed"),
    ({"micro_batch_size": 8}, "global batch"),  # 16 -> 32 sequences a step
])
def test_changes_of_the_maths_conflict_and_are_named(change, field):
    found = conflicts(_key(), _key(**change))
    assert found and any(c.field.startswith(field) for c in found), found
    text = "\n".join(map(str, found))
    assert "->" in text


def test_changed_input_content_conflicts():
    found = conflicts(_key({"tokenizer": "aaa"}), _key({"tokenizer": "bbb"}))
    assert [c.field for c in found] == ["content of input stage 'tokenizer' (sha256)"]
    assert (found[0].old, found[0].new) == ("aaa", "bbb")


# --- one resume point for all ranks ------------------------------------------------------------

def _complete(ckpt: Path, step: int) -> None:
    d = ckpt / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step}))


def _old_worker(ckpt: str, ready: str, started: list[str]) -> None:
    """An earlier run's rank 0, still alive: holds the lock until both new ranks are about to
    choose, then commits step 3, prunes step 1 and dies (the kernel drops its flock)."""
    ckpt = Path(ckpt)
    fd = os.open(ckpt / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    Path(ready).write_text("locked")
    while not all(Path(s).exists() for s in started):
        time.sleep(0.01)
    time.sleep(1.0)
    tmp = ckpt / "step_00000003.tmp"
    tmp.mkdir()
    (tmp / "meta.json").write_text(json.dumps({"step": 3}))
    tmp.rename(ckpt / "step_00000003")
    for p in sorted(ckpt.glob("step_00000001")):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    os._exit(0)


def _new_rank(rank: int, world: int, init: str, ckpt: str, out: str) -> None:
    import torch.distributed as dist

    from steelworks.train.loop import agree_resume_point

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    Path(out, f"started{rank}").write_text("")
    with contextlib.ExitStack() as stack:
        chosen, _ = agree_resume_point(Path(ckpt), {}, rank, stack)
    Path(out, f"rank{rank}.txt").write_text(str(chosen))
    dist.destroy_process_group()


@pytest.mark.faults  # kills a process: make test-faults
def test_every_rank_resumes_the_step_rank0_chose_while_an_old_worker_writes(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    _complete(ckpt, 1)
    _complete(ckpt, 2)
    ctx = mp.get_context("spawn")
    ready = tmp_path / "old.ready"
    started = [str(tmp_path / f"started{r}") for r in range(2)]
    old = ctx.Process(target=_old_worker, args=(str(ckpt), str(ready), started))
    old.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, "the old worker never took the lock"
        time.sleep(0.05)
    procs = [ctx.Process(target=_new_rank, args=(r, 2, f"file://{tmp_path / 'pg'}", str(ckpt), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in [old, *procs]:
        p.join(120)
        assert p.exitcode == 0
    chosen = {(tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    # Rank 1 alone would have scanned at once and taken step 2, before step 3 was committed.
    assert chosen == {str(ckpt / "step_00000003")}
