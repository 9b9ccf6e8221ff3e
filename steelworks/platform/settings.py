"""The top-level pipeline config: one section per stage, each owned by its component."""

from __future__ import annotations

from dataclasses import dataclass, field

from steelworks.data.config import DataConfig, PackConfig, TokenizerConfig
from steelworks.evals.config import EvalConfig
from steelworks.serve.config import ServeConfig
from steelworks.train.config import DpoConfig, OptimConfig, TrainConfig

STAGES = ("data", "tokenizer", "pretrain", "sft", "dpo", "eval", "serve")
# dpo is opt-in (``stages:`` lists it): it needs preference data, and the demo's budget.
DEFAULT_STAGES = tuple(s for s in STAGES if s != "dpo")


@dataclass
class RayConfig:
    address: str | None = None  # default: $RAY_ADDRESS, else start a local cluster
    num_cpus: int | None = None  # logical CPUs of a local cluster (default: max(4, cores))


def _sft_defaults() -> TrainConfig:
    return TrainConfig(optim=OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0), max_steps=50)


def _dpo_defaults() -> DpoConfig:
    # TRL's DPOTrainer default learning rate (1e-6) is for billion-parameter models; one
    # epoch at a constant-after-warmup rate is the common recipe (Zephyr, Tulu).
    return DpoConfig(optim=OptimConfig(lr=1e-6, warmup_steps=10, weight_decay=0.0), max_steps=100)


@dataclass
class PipelineConfig:
    run: str = "demo"
    runs_dir: str = "runs"
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: TrainConfig = field(default_factory=_sft_defaults)
    dpo: DpoConfig = field(default_factory=_dpo_defaults)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage {bad[0]!r}; valid stages: {', '.join(STAGES)}")
