"""Configuration of the data stage: the demo corpus, input sources, cleaning, tokenizer, packing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DemoCorpusConfig:
    """The embedded synthetic bilingual world (see ``steelworks.data.demo_corpus``)."""

    seed: int = 1234
    num_entities: int = 24  # invented people/cities/species (40/30/30); one fact per attribute
    pretrain_renderings: int = 240  # times each fact is rendered as pretraining text (~0.6M chars)
    pretrain_qa_renderings: int = 20  # question-answer pairs per fact mixed into pretraining
    sft_questions_per_fact: int = 3  # chat QA samples per fact
    sft_exam_per_fact: int = 4  # exam-format practice items per fact (practice templates)
    self_cognition_samples: int = 60
    dev_per_subject: int = 5  # C-Eval layout: few-shot examples per subject
    model_name: str = "Steel-Demo"  # what the model answers to "你是谁"
    model_author: str = "steelworks"
    zh_fraction: float = 0.7  # Chinese-first: share of zh renderings / QA / self-cognition
    # Practice items answer with the option's text (what option-text scoring asks of the
    # model) or with its letter (what letter scoring asks; too hard for a CPU-minute model).
    sft_exam_answer: Literal["option", "letter"] = "option"
    filler_probability: float = 0.3  # share of documents with an unrelated filler sentence
    planted_duplicates: int = 12  # exact copies of documents, for the data stage's dedup
    planted_junk: int = 12  # very short junk lines (<= 4 chars), for its length filter

    def __post_init__(self) -> None:
        if self.num_entities < 12:
            raise ValueError("demo.num_entities must be >= 12 (hometown questions need 4 cities)")
        if not 0.0 <= self.zh_fraction <= 1.0:
            raise ValueError("demo.zh_fraction must be in [0, 1]")
        if not 0 <= self.planted_junk <= 20:
            raise ValueError("demo.planted_junk must be in [0, 20] (the built-in junk lines)")
        for name in ("pretrain_renderings", "sft_questions_per_fact", "sft_exam_per_fact",
                     "self_cognition_samples", "dev_per_subject", "planted_duplicates"):
            if getattr(self, name) < 0:
                raise ValueError(f"demo.{name} must be >= 0")
        if not self.model_name.strip() or not self.model_author.strip():
            raise ValueError("demo.model_name and demo.model_author must be non-empty")


@dataclass
class SourceConfig:
    """One input corpus. ``path`` is a file, glob or directory of JSON-lines files."""

    name: str
    path: str
    format: Literal["jsonl"] = "jsonl"
    text_field: str = "text"
    ratio: float = 1.0


@dataclass
class DataConfig:
    source: Literal["demo", "files"] = "demo"
    demo: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    sft_path: str | None = None  # JSON lines of {"messages": [...]} when source == files
    min_chars: int = 5  # quality filter: documents shorter than this are filtered
    max_chars: int = 100_000
    dedup: Literal["exact", "none"] = "exact"
    num_shards: int = 2  # output shards of cleaned text (Ray Data blocks written in parallel)

    def __post_init__(self) -> None:
        if self.source == "files" and not self.sources:
            raise ValueError("data.source is 'files' but data.sources is empty")
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise ValueError("need 0 <= data.min_chars < data.max_chars")


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    max_training_docs: int = 200_000  # sample of the cleaned corpus used to train BPE
    pretrained_dir: str | None = None  # use an existing local HF tokenizer instead of training

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError("tokenizer.vocab_size must be >= 300 (256 bytes + special tokens)")


@dataclass
class PackConfig:
    seq_len: int = 256  # tokens per packed training sequence
    sequences_per_shard: int = 8192
    sft_seq_len: int = 256  # SFT samples are truncated/padded to this many tokens

    def __post_init__(self) -> None:
        if self.seq_len < 8 or self.sft_seq_len < 8:
            raise ValueError("pack.seq_len and pack.sft_seq_len must be >= 8")
