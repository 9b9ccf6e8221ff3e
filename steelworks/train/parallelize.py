"""Functions applied to a model: FSDP2 sharding, activation checkpointing, compile."""

from __future__ import annotations

import torch
import torch.distributed as dist


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (Llama/Qwen2: ``model.model.layers``)."""
    return list(model.model.layers)


def parallelize(model: torch.nn.Module, *, bf16: bool, activation_checkpointing: bool = False,
                compile: bool = False) -> torch.nn.Module:
    """Shard with FSDP2 (``fully_shard`` per decoder layer, then the root) when a process group
    is up; otherwise return the model unchanged (one process)."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        for layer in decoder_layers(model):
            layer.compile()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model
