"""Configuration of the training stages: pretraining, SFT and DPO (one loop serves all three;
``task`` tells them apart).

Imported by light code (the CLI, the pipeline driver): no torch or peft here. The LoRA
dataclasses live here for that reason; ``train/lora.py`` holds what applies them.
"""

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


# Every nn.Linear inside a decoder layer (model.py's Attention and MLP).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """Low-rank adapters: each targeted weight W [out, in] is used as W + (alpha/r)·B·A with
    A [r, in] and B [out, r] trained and W frozen. ``dropout`` applies to the adapter's input
    only (peft's ``lora_dropout``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be an integer >= 1 (the adapter rank), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora.alpha must be a number > 0 (the scale is alpha / r), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be a number in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"lora.target_modules must be a non-empty list of module names from "
                             f"{', '.join(PROJECTIONS)}; got {targets!r}")
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown:
            raise ValueError(f"lora.target_modules: {', '.join(map(repr, unknown))} matches no "
                             f"linear layer of the decoder's layers; valid: {', '.join(PROJECTIONS)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"lora.target_modules lists a module twice: {list(targets)}")
        # A set in effect (peft stores one): kept in PROJECTIONS' order, so a config read back
        # from adapter_config.json equals the one saved.
        self.target_modules = [t for t in PROJECTIONS if t in targets]
        self.alpha, self.dropout = float(self.alpha), float(self.dropout)

    @property
    def scaling(self) -> float:
        """The factor on B·A (plain LoRA's alpha / r; rsLoRA's alpha / sqrt(r) is not used)."""
        return self.alpha / self.r


@dataclass
class LoraTrainConfig(LoraConfig):
    """``train.lora``: the adapter (``LoraConfig``'s fields) and how a training stage uses it.

    The stage always exports ``hf/`` as the merged model (W + (alpha/r)·B·A), so the eval and
    serve stages read it unchanged; ``save_adapter`` also writes ``adapter/`` in peft's format
    (``PeftModel.from_pretrained`` on the transformers base model opens it)."""

    save_adapter: bool = True
    # QLoRA: "4bit" stores the frozen base's projections in NF4 (bitsandbytes; train/quantize.py)
    # and trains the adapters in full precision on top. None: a full-precision base.
    quantize: str | None = None  # "4bit" or None; a str checked here, for a clearer error

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize not in (None, "4bit"):
            raise ValueError(f"lora.quantize must be '4bit' (QLoRA) or null, got {self.quantize!r}")


@dataclass
class ParallelConfig:
    """How the ``num_workers`` ranks split the model: FSDP over all of them (the default), or
    HSDP: ``replicate`` groups of ``shard`` ranks each. Every group holds a full copy of the
    model sharded over its ``shard`` ranks, and gradients are reduce-scattered within a group,
    then all-reduced across groups. Put one group on one node (``shard`` = its GPUs): the
    sharding traffic then stays on the node's fast links, and only the gradient all-reduce
    crosses nodes. The maths is FSDP's: a run may change its mesh and resume.

    ``replicate: auto``: one group per node, each sharded over that node's ranks (the node
    count is world / ranks per node, ``LOCAL_WORLD_SIZE`` as Ray Train and torchrun set it)."""

    replicate: int | Literal["auto"] = 1
    shard: int | None = None  # None: num_workers / replicate

    def __post_init__(self) -> None:
        for name in ("replicate", "shard"):
            v = getattr(self, name)
            if v is None or (name == "replicate" and v == "auto"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name} must be an integer >= 1"
                                 f"{' or auto' if name == 'replicate' else ''}, got {v!r}")

    def mesh_shape(self, world: int, local_world: int | None = None) -> tuple[int, int]:
        """(replicate, shard) for ``world`` ranks, ``local_world`` of them per node (for
        ``auto``); an error naming both when they do not fit."""
        replicate = self.replicate
        if replicate == "auto":
            per_node = local_world or world
            if world % per_node:
                raise ValueError(f"parallel.replicate=auto: {world} ranks do not split into nodes "
                                 f"of {per_node} (LOCAL_WORLD_SIZE); set replicate and shard")
            replicate = world // per_node
        shard = self.shard if self.shard is not None else world // replicate
        if replicate * shard != world:
            raise ValueError(f"parallel.replicate={self.replicate} x parallel.shard={shard} = "
                             f"{replicate * shard} ranks, but the run has {world} "
                             "(num_workers): they must be equal")
        return replicate, shard


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
    # A local Hugging Face directory (Qwen2/Llama: config.json, safetensors, tokenizer) to start
    # from instead of this run's own model: continued pretraining (pretrain.init_from) or SFT
    # of an existing base (sft.init_from, no pretrain stage needed). Its tokenizer and chat
    # template become the run's (the tokenizer stage uses them); ``model`` is then ignored.
    init_from: str | None = None
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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # FSDP, or HSDP
    # LoRA fine-tuning (None: every weight trains). Needs a base model to adapt, so the stage
    # must start from one (SFT's init_from, the pretrain stage's hf/); checkpoints then hold
    # the adapters and their optimizer state only, and the base is re-read on resume.
    lora: LoraTrainConfig | None = None

    def __post_init__(self) -> None:
        if self.max_steps < 1 and self.epochs is None:
            raise ValueError("train.max_steps must be >= 1")
        if self.micro_batch_size < 1 or self.grad_accum < 1 or self.num_workers < 1:
            raise ValueError("micro_batch_size, grad_accum and num_workers must be >= 1")
        from steelworks.kernels import KERNELS

        unknown = sorted(set(self.kernels) - set(KERNELS))
        if unknown:
            raise ValueError(f"train.kernels: unknown {unknown}; valid: {', '.join(KERNELS)}")


@dataclass
class DpoConfig(TrainConfig):
    """The ``dpo`` stage: a ``TrainConfig`` (optimizer, steps, workers, ``lora`` ...) plus the
    preference data and the DPO objective (``train/dpo.py``).

    The policy starts from ``init_from`` (default: the run's SFT model, ``sft/hf``), and that
    same model is the frozen reference: its log-probabilities of every pair are computed
    once, before training, by a Ray Data batch-inference job and stored with the tokenized
    pairs (``dpo/pairs/``), so training holds one model, not two. ``micro_batch_size``
    counts pairs (each is two sequences: chosen and rejected)."""

    # Preference JSONL files ({prompt | messages, chosen, rejected}, or UltraFeedback-style
    # conversations: data/preference.py). Empty with the demo corpus: its preference.jsonl.
    data: list[str] = field(default_factory=list)
    beta: float = 0.1  # strength of the KL anchor to the reference (DPO's beta)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    # sigmoid only: the assumed fraction of flipped labels (conservative DPO); 0 = plain DPO
    label_smoothing: float = 0.0
    # Tokens of prompt + answer per sequence; a longer answer is cut at the end, and a pair
    # whose prompt leaves no room for the answer is quarantined (dpo/pairs/quarantine.jsonl).
    max_length: int = 512
    reference_replicas: int = 1  # Ray Data actors computing the reference log-probs
    reference_batch_size: int = 16  # pairs per reference forward pass

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("dpo.label_smoothing applies to loss_type 'sigmoid' only")
        if self.max_length < 2:
            raise ValueError(f"dpo.max_length must be >= 2 tokens, got {self.max_length}")
        if self.reference_replicas < 1 or self.reference_batch_size < 1:
            raise ValueError("dpo.reference_replicas and dpo.reference_batch_size must be >= 1")
        if self.extra_data:
            raise ValueError("dpo.extra_data is not supported: list every preference file in dpo.data")
        if self.loss_avg != "token":
            raise ValueError("dpo.loss_avg does not apply: the DPO loss is a mean over pairs")
