"""Configuration of the data stage: the demo corpus, input sources, cleaning, tokenizer, packing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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
    val_per_subject: int = 3  # facts per subject in the val split (tuning); the rest is test
    exam_questions_per_fact: int = 2  # val/test questions per fact, each in its own phrasing
    # DPO pairs per fact (preference.jsonl): a question, the true answer chosen, the same
    # sentence with another value of the attribute rejected. Read only by the dpo stage.
    preference_per_fact: int = 2
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
                     "self_cognition_samples", "dev_per_subject", "val_per_subject",
                     "planted_duplicates", "preference_per_fact"):
            if getattr(self, name) < 0:
                raise ValueError(f"demo.{name} must be >= 0")
        from steelworks.data.demo_templates import ATTRIBUTES

        phrasings = min(len(a.exam) for a in ATTRIBUTES)
        if not 1 <= self.exam_questions_per_fact <= phrasings:
            raise ValueError(f"demo.exam_questions_per_fact must be in [1, {phrasings}] "
                             f"(each attribute has {phrasings} exam phrasings)")
        if not self.model_name.strip() or not self.model_author.strip():
            raise ValueError("demo.model_name and demo.model_author must be non-empty")


ExamStyle = Literal["answer_first", "cot", "both"]


@dataclass
class SourceConfig:
    """One input corpus.

    ``path`` is a file, a glob or a directory (every file below it with a known extension);
    ``.gz`` and ``.zst`` files are decompressed. ``format`` is a key of
    ``steelworks.data.formats.FORMATS`` (``jsonl``, ``json``, ``parquet`` for custom data,
    or a named real schema such as ``skypile``, ``firefly``, ``wanjuan_exam``).
    """

    name: str
    path: str
    format: str = "jsonl"
    # Canonical field -> the source's column, for custom data: {text: content} reads the
    # document from ``content``; {messages: dialog} reads an OpenAI-style list from ``dialog``.
    # A value with {braces} is a template of columns: {text: "{INSTRUCTION}\n{RESPONSE}"}
    # joins two columns into one document; {prompt: INSTRUCTION, response: RESPONSE,
    # system: SYSTEM} (each a column or a template) makes one SFT exchange per record.
    columns: dict[str, str] = field(default_factory=dict)
    # Target share of this source's tokens in the pretraining mix (all set or none; they
    # must sum to 1). None everywhere: every kept token once (the natural mix).
    ratio: float | None = None
    recipe: str | None = None  # cleaning recipe for this source (default: data.recipe)
    # Keep only records whose language tag is listed (Infinity-Instruct's ``langdetect``).
    languages: list[str] = field(default_factory=list)
    exam_style: ExamStyle = "both"  # WanJuan exam: answer-first ("非cot"), cot, or both
    task_type: str | None = None  # SFT ``task_type`` tag (default: the format's own)

    def __post_init__(self) -> None:
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"source {self.name!r}: ratio must be in (0, 1]")
        # columns: canonical field -> column, or a template of columns ("{TITLE}\n{BODY}").
        cols = set(self.columns)
        if unknown := cols - {"text", "messages", "prompt", "response", "system", "task_type",
                              "lang"}:
            raise ValueError(f"source {self.name!r}: unknown columns keys {sorted(unknown)}; "
                             "valid: text, messages, prompt, response, system, task_type, lang")
        if ("prompt" in cols) != ("response" in cols):
            raise ValueError(f"source {self.name!r}: columns needs both prompt and response")
        if len(cols & {"text", "messages", "prompt"}) > 1:
            raise ValueError(f"source {self.name!r}: columns maps one of text, messages or "
                             f"prompt/response, got {sorted(cols & {'text', 'messages', 'prompt'})}")
        if "system" in cols and "prompt" not in cols:
            raise ValueError(f"source {self.name!r}: columns.system goes with prompt/response")


@dataclass
class MinHashConfig:
    """Near-duplicate detection by MinHash-LSH (Broder 1997; Leskovec et al., MMDS ch. 3)."""

    enabled: bool = False
    shingle_size: int = 5  # characters per shingle (CJK has no spaces to split words on)
    num_perm: int = 128  # hash permutations per signature
    bands: int = 16  # LSH bands; rows per band = num_perm // bands
    # Candidates from a shared band are confirmed only when their estimated Jaccard
    # similarity (share of equal signature slots) reaches this.
    threshold: float = 0.7
    seed: int = 42

    def __post_init__(self) -> None:
        if self.num_perm % self.bands:
            raise ValueError("dedup.minhash.num_perm must be a multiple of dedup.minhash.bands")
        if self.shingle_size < 1 or not 0.0 < self.threshold <= 1.0:
            raise ValueError("need dedup.minhash.shingle_size >= 1 and threshold in (0, 1]")


@dataclass
class DedupConfig:
    exact: bool = True  # drop later copies of the same normalized text
    minhash: MinHashConfig = field(default_factory=MinHashConfig)


@dataclass
class DecontamConfig:
    """Benchmark decontamination (``steelworks.data.decontam``): kept documents (pretraining
    text after dedup, SFT conversations) that share an ``ngram``-token n-gram with a question
    of the benchmarks are dropped (status ``contaminated``) or flagged (kept, and listed)."""

    enabled: bool = False
    # C-Eval or CMMLU layout directories (``steelworks.data.benchmarks``); each one's name
    # (``cmmlu``) labels its counts in the manifest, so names must differ.
    benchmarks: list[str] = field(default_factory=list)
    splits: list[Literal["dev", "val", "test"]] = field(default_factory=list)  # []: every split there
    # Tokens per n-gram: a CJK character or a word is one token. 13: GPT-3's choice.
    ngram: int = 13
    action: Literal["drop", "flag"] = "drop"
    examples: int = 5  # matched documents listed per benchmark in the manifest

    def __post_init__(self) -> None:
        if self.enabled and not self.benchmarks:
            raise ValueError("data.decontam.enabled needs data.decontam.benchmarks (directories)")
        if self.ngram < 1 or self.examples < 0:
            raise ValueError("need data.decontam.ngram >= 1 and data.decontam.examples >= 0")
        names = [Path(b).name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"data.decontam.benchmarks: directory names must differ (they "
                             f"label the counts), got {names}")


@dataclass
class SelfCognitionConfig:
    """Self-cognition SFT samples ("你是谁？" -> name and author) for ``source: files``."""

    samples: int = 0  # 0: none
    name: str = "Steel"
    author: str = "steelworks"


@dataclass
class MixConfig:
    """How pretraining sources are brought to their ``ratio``s (``steelworks.data.pack.plan_mix``).

    ``downsample``: the total is the most the ratios allow with no document repeated, so the
    scarcest source (relative to its ratio) sets it and the others lose the rest.
    ``upsample``: the total is set by the most plentiful source (relative to its ratio), which
    is used once; scarcer sources repeat, at most ``max_epochs`` times, and fall short of their
    share when that cap binds. ``total_tokens`` fixes the total under either policy (sources
    short of their quota then repeat, also at most ``max_epochs`` times). Without ratios,
    neither matters: every kept token is used once (the natural mix), or, with
    ``total_tokens``, the natural shares are scaled to it.
    """

    policy: Literal["downsample", "upsample"] = "downsample"
    # Repeating data up to ~4 epochs costs little against unique data; beyond that returns fall
    # off fast (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").
    max_epochs: float = 4.0
    total_tokens: int | None = None  # pretraining tokens to emit (default: set by the policy)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in ("downsample", "upsample"):
            raise ValueError(f"mix.policy must be 'downsample' or 'upsample', got {self.policy!r}")
        # NaN fails the comparison too; inf would let a source repeat without bound.
        if not 1.0 <= self.max_epochs < float("inf"):
            raise ValueError(f"mix.max_epochs must be a finite number >= 1, got {self.max_epochs}")
        if self.total_tokens is not None and self.total_tokens <= 0:
            raise ValueError(f"mix.total_tokens must be > 0 (or unset), got {self.total_tokens}")


@dataclass
class DataConfig:
    source: Literal["demo", "files"] = "demo"
    demo: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    sources: list[SourceConfig] = field(default_factory=list)  # pretraining text
    sft_sources: list[SourceConfig] = field(default_factory=list)  # SFT conversations
    self_cognition: SelfCognitionConfig = field(default_factory=SelfCognitionConfig)
    # Cleaning recipe (normalizers and quality filters, in order): a YAML path, or the name
    # of a file in recipes/ (``steel_text``). None: NFKC + whitespace + the length bounds below.
    recipe: str | None = None
    min_chars: int = 5  # length bounds of the default recipe
    max_chars: int = 100_000
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    num_shards: int = 2  # output shards of cleaned text (Ray Data blocks written in parallel)
    # Input read per task: larger files are cut into tasks of about this size (JSON lines at
    # newlines, parquet at row groups), so one 10 GB file uses every worker. Compressed
    # files and JSON arrays are one streaming task each; memory per task stays bounded.
    read_block_mb: float = 64.0
    stats_sample: int = 200_000  # documents whose filter stats are kept for the histograms

    def __post_init__(self) -> None:
        if self.source == "files" and not self.sources and not self.sft_sources:
            raise ValueError("data.source is 'files' but data.sources and data.sft_sources are empty")
        if not self.read_block_mb > 0:
            raise ValueError(f"data.read_block_mb must be > 0, got {self.read_block_mb}")
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise ValueError("need 0 <= data.min_chars < data.max_chars")
        ratios = [s.ratio for s in self.sources]
        if any(r is not None for r in ratios):
            if any(r is None for r in ratios):
                raise ValueError("data.sources: set ratio on every source or on none")
            if abs(sum(ratios) - 1.0) > 1e-6:
                raise ValueError(f"data.sources: ratios must sum to 1, got {sum(ratios):.6g}")
        names = [s.name for s in self.sources + self.sft_sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data: source names must be unique, got {names}")


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
    # Pack several SFT samples per row (first-fit, in order) with their boundaries kept as
    # segment ids, instead of one padded sample per row.
    sft_pack: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 8 or self.sft_seq_len < 8:
            raise ValueError("pack.seq_len and pack.sft_seq_len must be >= 8")
