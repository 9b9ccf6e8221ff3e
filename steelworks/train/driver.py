"""Launch ``train_loop`` on Ray Train (``TorchTrainer``, FSDP2 over gloo on CPU or NCCL on
GPU), or in this process when Ray is not wanted (GPU boxes without Ray, debugging)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steelworks.train.config import TrainConfig
from steelworks.train.loop import train_loop
from steelworks.train.remote import stage_remote


def run_training(job: dict[str, Any], cfg: TrainConfig, use_ray: bool = True) -> dict[str, Any]:
    out_dir = Path(job["out_dir"]).resolve()
    job = {**job, "out_dir": str(out_dir)}
    remote = stage_remote(job)
    if not use_ray:
        return train_loop(job)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={**job, "ray": True},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": 1} if not cfg.use_gpu else None),
        # The run's storage directory is <stage>/checkpoints: workers write DCP checkpoints
        # there and report them, Ray keeps the newest keep_last and hands the latest to a
        # restarted worker group (FailureConfig). On a multi-node cluster that must be
        # storage every node reaches: the run's bucket when runs_dir is a URI (each worker
        # then uploads its own shard, train/checkpoint.py), else a shared filesystem.
        run_config=RunConfig(name="checkpoints", **_storage(job, out_dir),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    trainer.fit()
    if remote is not None:  # rank 0 may have run on another node: its summary is in the bucket
        return remote.read_json("summary.json")
    return json.loads((out_dir / "summary.json").read_text())


def _storage(job: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """RunConfig's storage arguments: the stage's directory in the run's bucket, or on disk."""
    remote = stage_remote(job)
    if remote is None:
        return {"storage_path": str(out_dir)}
    return {"storage_path": remote.root, "storage_filesystem": remote.fs}
