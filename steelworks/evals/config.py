"""Configuration of benchmark evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvalConfig:
    benchmark: str = "demo"  # "demo" (the demo exam) or a directory in C-Eval layout
    split: Literal["val", "dev", "test"] = "val"
    num_shots: int = 0
    scoring: Literal["letter", "option_text"] = "letter"
    chat: bool = True  # wrap the question in the chat template (for SFT models)
    batch_size: int = 16
    max_items: int | None = None

    def __post_init__(self) -> None:
        if self.num_shots < 0:
            raise ValueError("eval.num_shots must be >= 0")
