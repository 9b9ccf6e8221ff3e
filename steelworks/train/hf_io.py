"""Hugging Face in and out: ``from_hf`` loads a Qwen2/Llama checkpoint directory into our
``Decoder``; ``to_hf`` writes one that ``AutoModelForCausalLM``, vLLM and our serving and eval
code open unchanged. Parameter names are the same on both sides (model.py), so weights move
as they are: HF -> ours -> HF gives back the same tensors, bit for bit.

What is refused, with the file named: a directory without ``config.json`` or safetensors
weights, a ``model_type`` other than qwen2/llama, RoPE scaling, sliding-window attention,
an activation other than SiLU, and missing, unexpected or mis-shaped weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from steelworks.train.model import ARCHS, Decoder, DecoderConfig, build_decoder

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> DecoderConfig:
    """Our config from an HF ``config.json`` dict; unsupported features are errors."""
    arch = hf.get("model_type")
    if arch not in ARCHS:
        raise ValueError(f"{where}: model_type {arch!r} is not supported; steelworks trains "
                         f"{', '.join(ARCHS)}")
    rope = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise ValueError(f"{where}: RoPE scaling {rope_type!r} is not supported (default RoPE only)")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{where}: sliding-window attention is not supported")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (SiLU only)")
    theta = hf.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
    return DecoderConfig(
        arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch == "qwen2")),
        attention_bias=hf.get("attention_bias") if arch == "llama" else None,
        mlp_bias=bool(hf.get("mlp_bias", False)), head_dim=hf.get("head_dim"),
        initializer_range=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id"),
        eos_token_id=hf.get("eos_token_id"), bos_token_id=hf.get("bos_token_id"))


def hf_config(cfg: DecoderConfig):
    """The ``transformers`` config object that describes ``cfg``."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=float(cfg.rope_theta), tie_word_embeddings=cfg.tie_word_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, initializer_range=cfg.initializer_range,
        pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id, bos_token_id=cfg.bos_token_id,
        hidden_act="silu")
    if cfg.arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common, attention_bias=bool(cfg.attention_bias), mlp_bias=cfg.mlp_bias,
                       head_dim=cfg.head_dim)


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        index = json.loads((path / INDEX).read_text(encoding="utf-8"))
        files = sorted({path / f for f in index["weight_map"].values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX} names weight files that are missing: {', '.join(missing)}")
        return files
    if (path / WEIGHTS).exists():
        return [path / WEIGHTS]
    raise FileNotFoundError(f"{path}: no {WEIGHTS} or {INDEX} (safetensors weights); .bin "
                            "checkpoints are not read, convert them with save_pretrained first")


def check_base_model(path: str | Path, tokenizer_vocab: int | None = None) -> DecoderConfig:
    """What a stage checks before it starts from an HF directory (no weights are read): the
    directory and its config.json exist, the architecture is one our decoder implements, the
    safetensors weights are there, and the model's embedding covers the tokenizer's ids. Each
    failure names the file it concerns."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: {path} is not a Hugging Face model directory")
    cfg = config_from_hf(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))
    _weight_files(path)  # raises naming the missing weight file(s)
    if tokenizer_vocab is not None and tokenizer_vocab > cfg.vocab_size:
        raise ValueError(f"{config_file}: vocab_size {cfg.vocab_size} is smaller than the "
                         f"tokenizer's {tokenizer_vocab} tokens: the tokenizer is not this model's "
                         "(use the model directory's own tokenizer)")
    return cfg


def from_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Decoder:
    """Load an HF Qwen2/Llama directory (config.json + safetensors) into our ``Decoder``."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    cfg = config_from_hf(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))
    files = _weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    model = build_decoder(cfg, "meta")
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match a {cfg.arch} decoder of this config: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, the config "
                             f"({config_file}) implies {tuple(t.shape)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                          strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.reset_inv_freq(device)
    return model


def hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """The tensors an HF checkpoint of ``model`` holds (a tied head is not saved twice)."""
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def to_hf(model: Decoder | dict[str, torch.Tensor], cfg: DecoderConfig, out_dir: str | Path,
          tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``out_dir`` as an HF model directory: config.json, generation_config.json,
    model.safetensors and, when given, the tokenizer. ``model`` may be the module or its full
    state dict (what FSDP gathers to rank 0). Written to ``out_dir.tmp`` and renamed."""
    import shutil

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = hf_state_dict(model) if isinstance(model, Decoder) else dict(model)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    hf = hf_config(cfg)
    hf.architectures = ["Qwen2ForCausalLM" if cfg.arch == "qwen2" else "LlamaForCausalLM"]
    hf.dtype = "float32" if all(v.dtype == torch.float32 for v in state.values()) else str(
        next(iter(state.values())).dtype).replace("torch.", "")
    hf.save_pretrained(tmp)
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                     bos_token_id=cfg.bos_token_id).save_pretrained(tmp)
    if tokenizer_dir is not None:
        from steelworks.data.tokenizer import load_tokenizer

        load_tokenizer(tokenizer_dir).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
