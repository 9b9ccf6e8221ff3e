"""Configuration of pretraining and SFT (one loop serves both; ``task`` tells them apart)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """A named size from ``steelworks.train.models`` plus optional field overrides."""

    arch: Literal["qwen2", "llama"] = "qwen2"
    size: str = "tiny"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    tie_word_embeddings: bool | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine/wsd decay to lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ValueError("optim.betas must have two values")
        if self.lr <= 0:
            raise ValueError("optim.lr must be > 0")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 100
    epochs: float | None = None  # if set, max_steps is derived from the data size
    micro_batch_size: int = 8  # sequences per worker per micro step
    grad_accum: int = 1
    num_workers: int = 2  # Ray Train workers (FSDP2 ranks)
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 2
    # Checkpoints written by a background thread while training goes on (DCP async_save):
    # the step only waits for the copy to host memory. None (auto): on CUDA, where training
    # runs on the GPU while the CPU writes; not on CPU, where the writer competes with
    # training for the same cores (measured on 2 cores, demo size: +0.18 s per save async
    # vs +0.09 s sync, benchmarks/RESULTS.md). True/False force it.
    async_checkpoint: bool | None = None
    # "token": every target token in the global batch weighs the same; "sample": every
    # sample (packed SFT: every segment) does, so short answers are not outweighed.
    loss_avg: Literal["token", "sample"] = "token"
    activation_checkpointing: bool = False
    compile: bool = False
    # Fused Triton kernels in our model (steelworks.kernels, Decoder.use_kernels): any of
    # rmsnorm, rope, swiglu, ce. Applied where Triton can run (CUDA); elsewhere a log line
    # says why not.
    kernels: list[str] = field(default_factory=list)
    # More shard directories trained together with the stage's own; adding one to a run
    # that already has checkpoints appends it (see train/data.py).
    extra_data: list[str] = field(default_factory=list)
    max_failures: int = 0  # Ray Train restarts the worker group from the last checkpoint
    tensorboard: bool = True  # event files under <out>/tensorboard
    wandb_project: str | None = None  # logs to wandb when set and wandb is installed

    def __post_init__(self) -> None:
        if self.max_steps < 1 and self.epochs is None:
            raise ValueError("train.max_steps must be >= 1")
        if self.micro_batch_size < 1 or self.grad_accum < 1 or self.num_workers < 1:
            raise ValueError("micro_batch_size, grad_accum and num_workers must be >= 1")
        from steelworks.kernels import KERNELS

        unknown = sorted(set(self.kernels) - set(KERNELS))
        if unknown:
            raise ValueError(f"train.kernels: unknown {unknown}; valid: {', '.join(KERNELS)}")
