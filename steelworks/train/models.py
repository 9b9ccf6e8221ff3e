"""Model registry: named sizes of our decoder (``train/model.py``, the Qwen2 and Llama
families), as our config (``decoder_config``) or as the equivalent ``transformers`` config.

Only architecture lives here (docs/architecture.md, principle 2): sharding, checkpointing, compilation
and kernel patching are functions applied to the model elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from steelworks.train.config import ModelConfig

# name -> (hidden, layers, heads, kv_heads, intermediate, max_positions)
SIZES: dict[str, dict[str, Any]] = {
    # CPU tests: seconds per step.
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176,
                 max_position_embeddings=512),
    # The demo: learns the synthetic world in a few CPU minutes.
    "demo": dict(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2, intermediate_size=512,
                 max_position_embeddings=512),
    # ~100M parameters with a 32k vocabulary (GPT-2-small-like shape).
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                 max_position_embeddings=2048),
    # Steel-LLM's published shape (Qwen1.5-style decoder): hidden 1792, 18 layers, 32 heads,
    # seq 2048, rope_theta 1e6. Its intermediate size (4864) and full MHA (kv heads = heads)
    # are our reading of the released config; with the 151,936-token Qwen vocabulary and tied
    # embeddings it has 0.97B parameters.
    "steel-1b": dict(hidden_size=1792, num_layers=18, num_heads=32, num_kv_heads=32,
                     intermediate_size=4864, max_position_embeddings=2048, rope_theta=1e6),
}


def resolve_shape(cfg: ModelConfig) -> dict[str, Any]:
    """The named size with any explicit field of ``cfg`` overriding it."""
    if cfg.size not in SIZES:
        raise ValueError(f"unknown model size {cfg.size!r}; valid sizes: {', '.join(SIZES)}")
    shape = {"rope_theta": 1e4, "tie_word_embeddings": True, **SIZES[cfg.size]}
    for f in dataclasses.fields(cfg):
        if f.name not in ("arch", "size") and getattr(cfg, f.name) is not None:
            shape[f.name] = getattr(cfg, f.name)
    if shape["hidden_size"] % shape["num_heads"] or shape["num_heads"] % shape["num_kv_heads"]:
        raise ValueError(
            f"model shape {shape}: hidden_size must divide by num_heads and num_heads by num_kv_heads"
        )
    return shape


def decoder_config(cfg: ModelConfig, vocab_size: int, pad_token_id: int | None = None,
                   eos_token_id: int | None = None):
    """Our ``DecoderConfig`` (train/model.py) for ``cfg`` with the tokenizer's vocabulary."""
    from steelworks.train.model import DecoderConfig

    s = resolve_shape(cfg)
    return DecoderConfig(
        arch=cfg.arch, vocab_size=vocab_size, hidden_size=s["hidden_size"], num_layers=s["num_layers"],
        num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"], intermediate_size=s["intermediate_size"],
        max_position_embeddings=s["max_position_embeddings"], rope_theta=float(s["rope_theta"]),
        tie_word_embeddings=s["tie_word_embeddings"], rms_norm_eps=1e-6, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id)


def build_hf_config(cfg: ModelConfig, vocab_size: int, pad_token_id: int | None = None,
                    eos_token_id: int | None = None):
    """A ``transformers`` config for ``cfg`` with the tokenizer's vocabulary (the same model
    as ``decoder_config``; for the HF side of benchmarks and for inference fixtures)."""
    from transformers import LlamaConfig, Qwen2Config

    s = resolve_shape(cfg)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        intermediate_size=s["intermediate_size"],
        max_position_embeddings=s["max_position_embeddings"],
        rope_theta=float(s["rope_theta"]),
        tie_word_embeddings=s["tie_word_embeddings"],
        rms_norm_eps=1e-6,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    if cfg.arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def attention_implementation(device: str | torch.device) -> str:
    """flash-attn 2 on CUDA when it is installed (varlen kernels for packed rows), else
    PyTorch SDPA, which runs everywhere."""
    import importlib.util

    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_model(hf_config, seed: int | None = None, device: str | torch.device = "cpu",
                attn_implementation: str = "sdpa"):
    """Instantiate a causal LM from a config: randomly initialised (deterministic under
    ``seed``), or on ``meta`` for ``parallelize.materialize`` to fill after sharding."""
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa"):
    """Load a local HF model directory (safetensors); never the hub."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
    )
    return model.to(device)


def count_params(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n
