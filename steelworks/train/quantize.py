"""QLoRA's 4-bit base: the decoder's linear projections stored as NF4 by bitsandbytes.

QLoRA (Dettmers et al. 2023) keeps the frozen base model's linear weights in 4-bit NormalFloat
with double quantization of the block scales, and trains LoRA adapters in full precision on
top. It cuts the base's weight memory about 4x against bf16 (8x against fp32); the adapters
are what train. ``train.lora.quantize: 4bit`` turns it on; train/loop.py calls
``quantize_base`` after ``hf_io.from_hf`` and before ``lora.apply_lora``, so peft puts its
LoRA layers around bitsandbytes' ``Linear4bit`` (peft's bnb dispatcher does that by itself).

Where it runs: wherever bitsandbytes runs 4-bit layers. That is CUDA, and since
bitsandbytes 0.46 also the CPU (its CPU backend; slower, and how the tests run it). Without
bitsandbytes installed it is an error that names the install (``pip install -e '.[qlora]'``).

What stays full precision, as in QLoRA: embeddings, norms and the LM head (the head may be
tied to the embedding). What the rest of the training stack does with the 4-bit weights:

- FSDP2 leaves them alone (``parallelize`` passes them as ``ignored_params``): each rank
  holds the whole 4-bit base, already small, and the adapters are sharded as usual;
- checkpoints never hold them (checkpoint.py saves trainable parameters only, and the base
  is re-read and re-quantized on resume, deterministically);
- the merged export (``hf/``) folds the adapters into the ORIGINAL full-precision weights,
  read again from ``init_from``, not into the dequantized 4-bit ones: the export is the base
  the run started from plus the adapters, which is what peft's merge on the full-precision
  base gives too (the adapters were trained against the 4-bit base; that difference is
  QLoRA's, and the reason its papers evaluate the merged model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from steelworks.train.config import PROJECTIONS

INSTALL = "pip install -e '.[qlora]' (bitsandbytes)"


def bitsandbytes():
    """The bitsandbytes module, or a clear error saying how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        from steelworks.core.config import ConfigError

        raise ConfigError(f"lora.quantize=4bit (QLoRA) needs bitsandbytes, which is not "
                          f"installed here ({e}); install it with {INSTALL}, or remove "
                          "lora.quantize to train LoRA on a full-precision base") from None
    return bnb


def quantize_base(model: nn.Module, device: torch.device, compute_dtype: torch.dtype,
                  modules: Iterable[str] = PROJECTIONS) -> int:
    """Replace every ``nn.Linear`` named in ``modules`` inside the decoder layers of ``model``
    by a frozen NF4 ``Linear4bit`` on ``device`` (in place); -> how many were replaced.
    ``compute_dtype``: what the 4-bit weights are dequantized to for the matmul (bf16 on GPU
    with mixed precision, fp32 otherwise)."""
    bnb = bitsandbytes()
    wanted = set(modules)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layers." in f".{name}" and name.rsplit(".", 1)[-1] in wanted]
    for name, linear in targets:
        parent_name, leaf = name.rsplit(".", 1)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True,
                              quant_type="nf4", device="meta")
        # Params4bit quantizes when moved to the device; the fp32 copy is then dropped.
        q.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu", torch.float32), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().to("cpu", torch.float32), requires_grad=False)
        setattr(model.get_submodule(parent_name), leaf, q.to(device))
    # What transformers sets on a model loaded in 4 bit; peft reads it to wrap the layers with
    # its bitsandbytes LoRA layer (peft/tuners/lora/bnb.py) instead of the plain one.
    model.is_loaded_in_4bit = True
    return len(targets)


def quantized_params(model: nn.Module) -> set[nn.Parameter]:
    """The 4-bit weights of ``model`` (empty without QLoRA): what FSDP2 must not shard."""
    try:
        from bitsandbytes.nn import Params4bit
    except ImportError:
        return set()
    return {p for p in model.parameters() if isinstance(p, Params4bit)}


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_params(model))
