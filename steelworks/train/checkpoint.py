"""Checkpoints: sharded (torch.distributed.checkpoint) model + optimizer, plus a JSON with
step, scheduler, data-loader state and per-rank RNG — everything needed to resume exactly.

A model with frozen parameters (LoRA, ``train.lora``: the base is frozen) checkpoints only
what trains, the adapters and their optimizer state: the base is read again from the run's
``init_from`` on resume (train/loop.py), so saving it would cost a full model's disk per
checkpoint and buy nothing.

Atomicity: a checkpoint is written to ``step_NNNNNNNN.tmp/`` and renamed to
``step_NNNNNNNN/`` by rank 0 only after every rank finished writing, so a crash mid-save
leaves the previous checkpoint as the latest complete one. ``AsyncCheckpointer`` writes in
the background while training continues, with the same rename marking completion. Only directories without
``.tmp`` count. HF export writes a standard ``save_pretrained`` directory the same way.

With the run in a bucket (``runs_dir: s3://...``, ``remote``), the checkpoint is also written
to ``<stage>/checkpoints/step_NNNNNNNN/`` there: each rank uploads the files it wrote (its DCP
shard, its RNG state; rank 0 DCP's ``.metadata``), and after every rank has, rank 0 uploads
``meta.json``, last: a checkpoint in the bucket is complete when its ``meta.json`` exists
(platform/storage.py says why that is atomic). Resuming reads the bucket, so a run picks up
on any node, with or without the local copy.
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

from steelworks.core.atomic import atomic_write_json
from steelworks.core.storage import Remote


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


def _rank_files(tmp: Path, rank: int) -> list[Path]:
    """The files of a checkpoint that ``rank`` wrote: its DCP shard(s) ``__<rank>_<i>.distcp``,
    its RNG state, and on rank 0 DCP's ``.metadata``."""
    return sorted(f for f in tmp.iterdir() if f.name.startswith(f"__{rank}_")
                  or f.name == f"rng_rank{rank}.json" or (rank == 0 and f.name == ".metadata"))


def _upload_rank_files(tmp: Path, remote: Remote, rank: int) -> None:
    for f in _rank_files(tmp, rank):
        remote.upload(f, f.name)


def latest_remote_checkpoint(remote: Remote) -> str | None:
    """The name of the newest complete checkpoint in the bucket (``meta.json`` present)."""
    done = [d for d in remote.dirs() if d.startswith("step_") and remote.exists(f"{d}/meta.json")]
    return max(done) if done else None


def fetch_checkpoint(remote: Remote, name: str, ckpt_dir: str | Path) -> Path:
    """Copy checkpoint ``name`` from the bucket to ``ckpt_dir/name`` (the files this node has
    not got; ``meta.json`` last, so the local copy is complete when it is there too)."""
    local = Path(ckpt_dir) / name
    if not remote.child(name).mirror(local, "meta.json"):
        raise FileNotFoundError(f"{remote.uri}/{name}/meta.json does not exist: not a complete checkpoint")
    return local


def prune_remote(remote: Remote, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints in the bucket."""
    steps = sorted(d for d in remote.dirs() if d.startswith("step_"))
    for old in steps[:-keep_last]:
        remote.delete(old)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpt_dir = Path(ckpt_dir)
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "meta.json").exists())
    return done[-1] if done else None


def _state(model, optimizer) -> tuple[dict[str, Any], StateDictOptions]:
    """{"model", "optim"} state dicts to save or load into, and the options that made them:
    every parameter, or for a model with frozen ones the trainable parameters only."""
    if all(p.requires_grad for p in model.parameters()):
        options = StateDictOptions()
    else:
        # strict=False: set_state_dict then accepts a model state without the frozen base
        # (load_checkpoint checks that nothing trainable was missed).
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if options.ignore_frozen_params:
        # ignore_frozen_params drops each frozen parameter under its named_parameters() name;
        # a tied LM head is in state_dict() under its own name too and would be kept.
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return {"model": model_sd, "optim": optim_sd}, options


def _prepare(ckpt_dir: Path, step: int, rank: int, remote: Remote | None) -> Path:
    """Rank 0 empties ``step_N.tmp/`` (and step_N/ in the bucket: a crashed save may have left
    shards of another world size there); then every rank may write. -> the tmp directory."""
    tmp = ckpt_dir / f"step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if remote is not None:
            remote.delete(f"step_{step:08d}")
    _barrier()
    tmp.mkdir(parents=True, exist_ok=True)  # ranks on other nodes have their own disk
    return tmp


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, extra: dict[str, Any],
                    keep_last: int | None, before_commit: Callable[[], None] | None = None,
                    after_commit: Callable[[], None] | None = None, remote: Remote | None = None) -> Path:
    """Write ``step_NNNNNNNN/`` atomically; prune to the newest ``keep_last`` (None: the caller
    prunes, e.g. Ray Train's ``CheckpointConfig.num_to_keep``). ``before_commit`` runs after
    the data is written and before the rename (tests inject a crash there). ``remote``: the
    checkpoints directory in the run's bucket, written too (module docstring)."""
    rank, world = _dist()
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = _prepare(ckpt_dir, step, rank, remote)
    dcp.save(_state(model, optimizer)[0], checkpoint_id=str(tmp))
    atomic_write_json(tmp / f"rng_rank{rank}.json", rng_state())
    if remote is not None:
        _upload_rank_files(tmp, remote.child(final.name), rank)
    if before_commit is not None:
        before_commit()
    _barrier()
    if rank == 0:
        _commit(ckpt_dir, step, tmp, {"step": step, "world_size": world, **extra}, keep_last, remote)
    if after_commit is not None:
        after_commit()
    _barrier()
    return final


def _commit(ckpt_dir: Path, step: int, tmp: Path, meta: dict[str, Any], keep_last: int | None,
            remote: Remote | None = None) -> Path:
    """Rank 0, after every rank finished writing ``tmp``: meta.json, the rename that marks the
    checkpoint complete (in the bucket: meta.json uploaded last), and pruning to the newest
    ``keep_last``. Under Ray Train (``keep_last`` None) Ray prunes what was reported, in the
    bucket too; the local copies are then only a cache, of which the newest is kept."""
    final = ckpt_dir / f"step_{step:08d}"
    atomic_write_json(tmp / "meta.json", meta)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if remote is not None:
        remote.child(final.name).upload(final / "meta.json", "meta.json")
        if keep_last:
            prune_remote(remote, keep_last)
    keep_local = keep_last or (1 if remote is not None else None)
    if keep_local:
        for old in sorted(p for p in ckpt_dir.glob("step_*") if not p.name.endswith(".tmp"))[:-keep_local]:
            shutil.rmtree(old, ignore_errors=True)
    return final


class AsyncCheckpointer:
    """Checkpoints written in the background while training goes on (DCP ``async_save``).

    ``save`` stages a copy of the model and optimizer state in host memory (the only part
    the step waits for) and returns; a thread writes it into ``step_N.tmp/``. Completion is
    marked as before, by rank 0 renaming to ``step_N/`` once every rank has written, so a
    crash while a save is in flight leaves the previous checkpoint the newest complete one.
    ``poll`` (every step, every rank) commits a finished save; the ranks agree on "finished"
    with one all-reduce, so they commit, and report to Ray, at the same step. At most one
    save is in flight: the next ``save``, and ``wait``, first finish the one before.

    The background thread's collectives run on a process group of their own (gloo: DCP's
    async save needs a CPU backend), never on the training group the main thread uses."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int | None, device: torch.device,
                 remote: Remote | None = None) -> None:
        self.ckpt_dir, self.keep_last, self.device = Path(ckpt_dir), keep_last, device
        self.remote = remote  # the bucket's copy is uploaded when a save is committed
        self.group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
        self._pending: dict[str, Any] | None = None

    def save(self, step: int, model, optimizer, extra: dict[str, Any],
             before_commit: Callable[[], None] | None = None,
             after_launch: Callable[[], None] | None = None,
             after_commit: Callable[[], None] | None = None) -> Path | None:
        """Start writing step ``step``; returns the previous save's directory if finishing it
        here committed it. The hooks are for tests that kill the process: ``after_launch``
        runs while the write is in flight, ``before_commit``/``after_commit`` around the
        rename when it is committed."""
        committed = self.wait()
        rank, world = _dist()
        tmp = _prepare(self.ckpt_dir, step, rank, self.remote)
        future = dcp.async_save(_state(model, optimizer)[0], checkpoint_id=str(tmp),
                                process_group=self.group)
        atomic_write_json(tmp / f"rng_rank{rank}.json", rng_state())
        # What meta.json will say, fixed now: the loader and scheduler move on meanwhile.
        meta = json.loads(json.dumps({"step": step, "world_size": world, **extra}))
        self._pending = {"step": step, "tmp": tmp, "future": future, "meta": meta,
                         "before_commit": before_commit, "after_commit": after_commit}
        if after_launch is not None:
            after_launch()
        return committed

    def poll(self) -> Path | None:
        """Commit the save in flight if every rank has finished writing it (no waiting)."""
        if self._pending is None:
            return None
        done = torch.tensor([1 if self._pending["future"].done() else 0], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self._finish() if int(done.item()) else None

    def wait(self) -> Path | None:
        """Finish and commit the save in flight, if any; returns its directory."""
        return self._finish() if self._pending is not None else None

    def _finish(self) -> Path:
        p, self._pending = self._pending, None
        p["future"].result()  # a failed write raises here, and the checkpoint stays .tmp
        rank, _ = _dist()
        final = self.ckpt_dir / f"step_{p['step']:08d}"
        if self.remote is not None:
            _upload_rank_files(p["tmp"], self.remote.child(final.name), rank)
        if p["before_commit"] is not None:
            p["before_commit"]()
        _barrier()
        if rank == 0:
            _commit(self.ckpt_dir, p["step"], p["tmp"], p["meta"], self.keep_last, self.remote)
        if p["after_commit"] is not None:
            p["after_commit"]()
        _barrier()
        return final


def load_checkpoint(path: str | Path, model, optimizer) -> dict[str, Any]:
    """Restore model/optimizer in place (any world size: DCP reshards); returns meta."""
    rank, _ = _dist()
    path = Path(path)
    state, options = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    loaded = set_state_dict(model, optimizer, model_state_dict=state["model"],
                            optim_state_dict=state["optim"], options=options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missed = sorted(set(loaded.missing_keys) & trainable) + sorted(loaded.unexpected_keys)
    if missed:
        raise RuntimeError(f"{path}: the checkpoint does not fit this model: {missed[:5]}")
    meta = json.loads((path / "meta.json").read_text())
    rng_file = path / f"rng_rank{rank}.json"
    if rng_file.exists():
        restore_rng_state(json.loads(rng_file.read_text()))
    return meta


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, str]:
    """This rank's random number generators: the CPU one, and the current CUDA device's when
    CUDA is in use (dropout and any sampling on the GPU draw from it)."""
    state = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def restore_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(state["cuda"]))


def export_hf(model, cfg, tokenizer_dir: str | Path, out_dir: str | Path,
              base_dir: str | Path | None = None) -> Path | None:
    """Gather the full weights to rank 0 and write a standard HF directory (safetensors +
    config + tokenizer, ``hf_io.to_hf``), atomically. Other ranks return None. A model with
    LoRA adapters is written merged (W + (alpha/r)·B·A), a plain model any HF loader runs.
    ``base_dir`` (QLoRA): the HF directory the 4-bit base was quantized from; the adapters are
    merged into its full-precision weights (train/quantize.py says why)."""
    from steelworks.train.hf_io import from_hf, hf_state_dict, to_hf
    from steelworks.train.lora import is_adapter_param, merge_adapters

    rank, _ = _dist()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        _barrier()
        return None
    if base_dir is not None:
        adapters = {k: v for k, v in full.items() if is_adapter_param(k)}
        full = {**hf_state_dict(from_hf(base_dir)), **adapters}
    if any(is_adapter_param(k) for k in full):
        full = merge_adapters(full, model)
    out = to_hf({k: v.float() for k, v in full.items()}, cfg, out_dir, tokenizer_dir)
    _barrier()
    return out
