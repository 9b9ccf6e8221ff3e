"""Configuration of benchmark evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvalConfig:
    benchmark: str = "demo"  # "demo" (the demo exam) or a directory in C-Eval layout
    split: Literal["val", "dev", "test"] = "val"
    num_shots: int = 0
    # "loglik": the most likely of the four choices (scoring.py); "generative": the model
    # writes an answer and extract.py reads the letter from it (generative.py).
    mode: Literal["loglik", "generative"] = "loglik"
    scoring: Literal["letter", "option_text"] = "letter"  # what loglik mode scores
    max_new_tokens: int = 32  # generative mode's reply budget (greedy)
    chat: bool = True  # wrap the question in the chat template (for SFT models)
    batch_size: int = 16
    max_items: int | None = None
    # Model replicas, each a Ray Data actor holding one copy of the model (batch.py); the
    # items are spread over them, so a benchmark uses as many nodes as replicas fit on.  One
    # replica with no cluster attached runs in the calling process instead, without Ray
    # (platform.pipeline.eval_uses_ray), with cpus_per_replica torch threads as on Ray.
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    def __post_init__(self) -> None:
        if self.num_shots < 0:
            raise ValueError("eval.num_shots must be >= 0")
        if self.mode not in ("loglik", "generative"):
            raise ValueError(f"eval.mode must be 'loglik' or 'generative', got {self.mode!r}")
        if self.scoring not in ("letter", "option_text"):
            raise ValueError(f"eval.scoring must be 'letter' or 'option_text', got {self.scoring!r}")
        if self.max_new_tokens < 1:
            raise ValueError("eval.max_new_tokens must be >= 1")
        if self.batch_size < 1:
            raise ValueError("eval.batch_size must be >= 1")
        if self.replicas < 1:
            raise ValueError("eval.replicas must be >= 1")
        if self.cpus_per_replica <= 0 or self.gpus_per_replica < 0:
            raise ValueError("eval.cpus_per_replica must be > 0 and eval.gpus_per_replica >= 0")
