"""Checkpoints: sharded (torch.distributed.checkpoint) model + optimizer, plus a JSON with
step, scheduler, data-loader state and per-rank RNG — everything needed to resume exactly.

Atomicity: a checkpoint is written to ``step_NNNNNNNN.tmp/`` and renamed to
``step_NNNNNNNN/`` by rank 0 only after every rank finished writing, so a crash mid-save
leaves the previous checkpoint as the latest complete one. Only directories without
``.tmp`` count. HF export writes a standard ``save_pretrained`` directory the same way.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from steelworks.platform.atomic import atomic_write_json


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def run_lock(ckpt_dir: str | Path, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold ``ckpt_dir/.lock`` (an flock) while training writes into ``ckpt_dir``.

    A killed driver does not take its Ray workers with it at once: they live in their own
    process groups and go on for seconds (tests/test_faults_driver.py saw up to ~30 s), long
    enough for a re-submitted run to start writing the same checkpoints. Rank 0 of each run
    takes this lock first, so the new run waits for the old worker to die (the kernel drops
    an flock with its process, however it ends) instead of racing it.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(ckpt_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    raise RuntimeError(
                        f"{ckpt_dir} is locked by another training process (pid {holder}) for "
                        f"over {timeout_s:.0f} s; is an earlier run of this stage still alive?"
                    ) from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpt_dir = Path(ckpt_dir)
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "meta.json").exists())
    return done[-1] if done else None


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, extra: dict[str, Any],
                    keep_last: int | None, before_commit: Callable[[], None] | None = None) -> Path:
    """Write ``step_NNNNNNNN/`` atomically; prune to the newest ``keep_last`` (None: the caller
    prunes, e.g. Ray Train's ``CheckpointConfig.num_to_keep``). ``before_commit`` runs after
    the data is written and before the rename (tests inject a crash there)."""
    rank, world = _dist()
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f"step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    atomic_write_json(tmp / f"rng_rank{rank}.json", {"torch": rng})
    if before_commit is not None:
        before_commit()
    _barrier()
    if rank == 0:
        atomic_write_json(tmp / "meta.json", {"step": step, "world_size": world, **extra})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in sorted(p for p in ckpt_dir.glob("step_*") if not p.name.endswith(".tmp"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model, optimizer) -> dict[str, Any]:
    """Restore model/optimizer in place (any world size: DCP reshards); returns meta."""
    rank, _ = _dist()
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = json.loads((path / "meta.json").read_text())
    rng_file = path / f"rng_rank{rank}.json"
    if rng_file.exists():
        raw = base64.b64decode(json.loads(rng_file.read_text())["torch"])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return meta


def export_hf(model, hf_config, tokenizer_dir: str | Path, out_dir: str | Path) -> Path | None:
    """Gather the full weights to rank 0 and write a standard HF directory (safetensors +
    config + tokenizer), atomically. Other ranks return None."""
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.models import build_model

    rank, _ = _dist()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        _barrier()
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export = build_model(hf_config, device="meta")
    export.load_state_dict({k: v.float() for k, v in full.items()}, assign=True)
    export.tie_weights()
    export.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(tokenizer_dir).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    _barrier()
    return out_dir
