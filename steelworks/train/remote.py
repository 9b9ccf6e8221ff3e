"""A train stage whose run lives in a bucket (``runs_dir: s3://...``, platform/storage.py).

Every worker may run on a node that has never seen the run, so each fetches what it reads
into its node's mirror before it starts (``fetch_inputs``): the input stages (token shards,
tokenizer, the model it starts from), the DPO pairs, and, on rank 0, the metrics log that a
resumed run appends to. Checkpoints go to the bucket as they are committed
(train/checkpoint.py), with the metrics log beside them, and rank 0 uploads the exports and
reports at the end (``upload_outputs``), so the driver, wherever it runs, finds them there.

The job dict carries it (platform/pipeline.py fills it in):
``remote_dir`` the stage's URI; ``pull`` [[input stage URI, local dir], ...];
``pull_dirs`` [[URI, local dir, marker], ...] directories that are not stages (DPO pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steelworks.core.storage import Remote

# What the driver reads back after training, besides the checkpoints (uploaded as they go).
OUTPUT_DIRS = ("hf", "adapter", "tensorboard")
REPORTS = ("metrics.jsonl", "loss.png", "summary.json")


def stage_remote(job: dict[str, Any]) -> Remote | None:
    return Remote(job["remote_dir"]) if job.get("remote_dir") else None


def checkpoints_remote(job: dict[str, Any]) -> Remote | None:
    remote = stage_remote(job)
    return remote.child("checkpoints") if remote is not None else None


def fetch_inputs(job: dict[str, Any], rank: int) -> None:
    """Bring what this worker reads into its node's mirror (a no-op for files already there
    and unchanged). Ranks on one node may fetch at once: every file lands by an atomic rename."""
    from steelworks.core.rundir import pull_stage

    for uri, local in job.get("pull") or []:
        pull_stage(Remote(uri), Path(local))
    for uri, local, marker in job.get("pull_dirs") or []:
        if not Remote(uri).mirror(local, marker):
            raise FileNotFoundError(f"{uri}/{marker} does not exist: {local} was not uploaded")
    remote = stage_remote(job)
    if remote is not None and rank == 0 and remote.exists("metrics.jsonl"):
        # The log of the steps before the checkpoint a resume starts from.
        remote.download("metrics.jsonl", Path(job["out_dir"]) / "metrics.jsonl")


def upload_metrics(job: dict[str, Any]) -> None:
    """Rank 0, when a checkpoint is committed: the metrics log up to it, beside it."""
    remote, log = stage_remote(job), Path(job["out_dir"]) / "metrics.jsonl"
    if remote is not None and log.is_file():
        remote.upload(log, "metrics.jsonl")


def upload_outputs(job: dict[str, Any]) -> None:
    """Rank 0, at the end: the exports (``hf/``, ``adapter/``), the TensorBoard log and the
    reports, for the driver."""
    remote = stage_remote(job)
    if remote is None:
        return
    out = Path(job["out_dir"])
    files = [str(f.relative_to(out)) for d in OUTPUT_DIRS if (out / d).is_dir()
             for f in sorted((out / d).rglob("*")) if f.is_file() and not f.name.endswith(".tmp")]
    remote.push(out, files + [r for r in REPORTS if (out / r).is_file()], last="summary.json")


def ray_checkpoint(remote: Remote, name: str):
    """The Ray Train checkpoint for ``name`` in the bucket: Ray's storage_path is there too,
    so Ray manages (and prunes) it like a local one."""
    from ray.train import Checkpoint

    return Checkpoint(path=remote.child(name).root, filesystem=remote.fs)
