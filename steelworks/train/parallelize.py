"""Functions applied to a model: FSDP2 sharding, activation checkpointing, compile, and
materializing a model that was built on the meta device.

Why meta: a 1B model built in full on every rank costs each rank 4 GB of host memory and
seconds of init before sharding throws 7/8 of it away. Built on ``meta`` it costs nothing;
``fully_shard`` then lays out DTensor parameters and ``materialize`` allocates only each
rank's shard and fills it.

Init is per parameter, from a generator seeded by (seed, parameter name), with the same
distributions as ``transformers`` (normal(0, initializer_range) for linear and embedding
weights, zeros for biases, ones for norms). Every rank computes the parameter's full value
and keeps its own slice, so the weights are identical whatever the world size: one process
and N FSDP ranks start from the same model (the loss-curve parity test relies on it).
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the decoder (``model.model.layers``, HF's naming)."""
    return list(model.model.layers)


def _checkpoint_forward(layer: nn.Module) -> None:
    """Recompute ``layer`` in backward instead of keeping its activations (non-reentrant
    ``torch.utils.checkpoint``). Set on the instance's ``forward`` rather than by wrapping the
    module, so parameter names, and with them checkpoints, do not change: a run may turn
    activation checkpointing on or off and resume (train/resume.py)."""
    import types

    from torch.utils.checkpoint import checkpoint

    inner = type(layer).forward

    def forward(self, *args, **kwargs):
        return checkpoint(inner, self, *args, use_reentrant=False, **kwargs)

    layer.forward = types.MethodType(forward, layer)


def device_mesh(replicate: int, shard: int, device_type: str):
    """None for flat FSDP (one mesh dimension, FSDP2's default), else the 2-D HSDP mesh
    ``(replicate, shard)``: ranks ``g*shard .. g*shard+shard-1`` form shard group g, so with
    ranks numbered node by node (torchrun, Ray Train) a group is a node."""
    if replicate == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "shard"))


def parallelize(model: nn.Module, *, bf16: bool, activation_checkpointing: bool = False,
                compile: bool = False, mesh=None) -> nn.Module:
    """Shard with FSDP2 (``fully_shard`` per decoder layer, then the root) when a process group
    is up; otherwise return the model unchanged (one process). ``mesh``: a 2-D mesh from
    ``device_mesh`` makes it HSDP (replicated across the first dimension, sharded along the
    second); None shards over every rank."""
    if activation_checkpointing:
        for layer in decoder_layers(model):
            _checkpoint_forward(layer)
    if compile:
        for layer in decoder_layers(model):
            layer.compile()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from steelworks.train.quantize import quantized_params

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    # QLoRA's 4-bit weights (packed bytes with their quantization state) are not sharded: every
    # rank keeps the small frozen base whole, and FSDP2 shards what trains.
    ignored = quantized_params(model) or None
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    return model


def _initial_value(name: str, module: nn.Module, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in type(module).__name__.lower():
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    value = torch.empty(shape).normal_(0.0, std, generator=gen)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        value[module.padding_idx] = 0  # as transformers: the pad row starts at zero
    return value


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta-device model (sharded or not) on ``device`` and initialize it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    # to_empty gives every module its own new Parameter, which unties tied weights (the
    # embedding and the LM head): note who shares what and re-tie afterwards.
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, pname))
    model.to_empty(device=device)
    for shared in owners.values():
        first = getattr(shared[0][0], shared[0][1])
        for module, pname in shared[1:]:
            setattr(module, pname, first)
    std = model.config.initializer_range
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():  # tied weights appear once
        module = modules[name.rsplit(".", 1)[0]] if "." in name else model
        full = _initial_value(name, module, param.shape, std, seed).to(device)
        if isinstance(param, DTensor):
            # Every rank holds the same full value; keep this rank's slice, no communication.
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)
    # The RoPE inverse frequencies are a non-persistent buffer, neither a parameter nor in
    # the state dict: recompute them on the device.
    for module in model.modules():
        if hasattr(module, "reset_inv_freq"):
            module.reset_inv_freq(device)
    return model
