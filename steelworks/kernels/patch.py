"""``patch_model``: swap the fused kernels into a Hugging Face Qwen2/Llama model.

What each name replaces (``train.kernels``):

- ``rmsnorm``: every ``*RMSNorm`` module's forward, and in each decoder layer the residual add
  before ``post_attention_layernorm`` (add + norm in one kernel pass).
- ``rope``: ``apply_rotary_pos_emb`` as each attention module's forward sees it (q and k
  rotated in one launch).
- ``swiglu``: each MLP's ``act_fn(gate) * up`` (SiLU recomputed in backward).
- ``ce``: the LM head + loss. Inside ``loss_targets(model, labels, weights)`` the LM head
  returns ``sum_i w_i * CE_i`` from the fused linear cross-entropy instead of logits, so the
  [tokens x vocab] logits never exist. It runs inside the model's forward on purpose: under
  FSDP2 the LM head's weight is only whole (unsharded) during the root module's forward.

The patch is applied to one model instance and never to its class or modeling module, so
other models in the process keep HF's own ops (``_patch_rope`` says how). Patching is a no-op
with a log line when Triton or the device cannot run the kernels (CPU without
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from steelworks.kernels import KERNELS
from steelworks.kernels.runtime import can_run

log = logging.getLogger("steelworks.kernels")

SUPPORTED_MODELS = ("qwen2", "llama")


def patch_model(model: nn.Module, kernels: Sequence[str], device: torch.device | str) -> list[str]:
    """Patch ``model`` in place with the named kernels; returns those applied."""
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; valid: {', '.join(KERNELS)}")
    if not kernels:
        return []
    ok, why = can_run(device)
    if not ok:
        log.warning("fused kernels %s not applied: %s; running PyTorch ops", list(kernels), why)
        return []
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_MODELS:
        log.warning("fused kernels not applied: model type %r is not one of %s", model_type, SUPPORTED_MODELS)
        return []
    for name in kernels:
        {"rmsnorm": _patch_rmsnorm, "rope": _patch_rope, "swiglu": _patch_swiglu,
         "ce": _patch_lm_head}[name](model, torch.device(device))
    log.info("fused kernels applied: %s", ", ".join(kernels))
    return list(kernels)


# ---- RMSNorm (+ fused residual add) -------------------------------------------------------


def _rmsnorm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from steelworks.kernels.rmsnorm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _decoder_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None,
                           position_ids=None, past_key_values=None, use_cache=False,
                           position_embeddings=None, **kwargs) -> torch.Tensor:
    """The Qwen2/Llama decoder layer (transformers 5) with ``residual + attn`` and the
    following RMSNorm fused into one kernel."""
    from steelworks.kernels.rmsnorm import rms_norm

    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=past_key_values,
                                      use_cache=use_cache, position_embeddings=position_embeddings,
                                      **kwargs)
    norm = self.post_attention_layernorm
    hidden_states, residual = rms_norm(hidden_states, norm.weight, norm.variance_epsilon, residual=residual)
    return residual + self.mlp(hidden_states)


def _patch_rmsnorm(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
    for layer in model.model.layers:
        layer.forward = types.MethodType(_decoder_layer_forward, layer)


# ---- RoPE -------------------------------------------------------------------------------------


def _patch_rope(model: nn.Module, device: torch.device) -> None:
    """Give each attention module of ``model`` its own copy of its ``forward`` whose global
    ``apply_rotary_pos_emb`` is the kernel.

    transformers calls RoPE as a module-level function, so replacing it in the modeling
    module would switch every model of that class in the process to the kernel, including
    models loaded later for evaluation or serving (under the CPU interpreter, 100x slower).
    The copied function keeps the class's code and every other global; only this
    instance sees the kernel, and it stays a plain function for torch.compile."""
    from steelworks.kernels import rope as kernel

    def rope(q, k, cos, sin, unsqueeze_dim=1):
        return kernel.apply_rope(q, k, cos, sin, unsqueeze_dim)

    for layer in model.model.layers:
        attn = layer.self_attn
        forward = type(attn).forward
        if "apply_rotary_pos_emb" not in forward.__code__.co_names:
            raise RuntimeError(f"{type(attn).__name__}.forward does not call apply_rotary_pos_emb; "
                               "this transformers version needs a new rope patch")
        scope = {**forward.__globals__, "apply_rotary_pos_emb": rope}
        patched = types.FunctionType(forward.__code__, scope, forward.__name__,
                                     forward.__defaults__, forward.__closure__)
        patched.__kwdefaults__ = forward.__kwdefaults__
        attn.forward = types.MethodType(patched, attn)


# ---- SwiGLU -----------------------------------------------------------------------------------


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from steelworks.kernels.swiglu import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _patch_swiglu(model: nn.Module, device: torch.device) -> None:
    for layer in model.model.layers:
        mlp = layer.mlp
        if getattr(mlp.config, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"swiglu kernel needs a SiLU MLP, got {mlp.config.hidden_act!r}")
        mlp.forward = types.MethodType(_mlp_forward, mlp)


# ---- LM head + fused linear cross-entropy -------------------------------------------------


def _lm_head_forward(self: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    targets = getattr(self, "_steelworks_targets", None)
    if targets is None:
        return nn.functional.linear(hidden_states, self.weight, self.bias)
    from steelworks.kernels.cross_entropy import fused_linear_cross_entropy

    labels, weights = targets
    loss = fused_linear_cross_entropy(hidden_states.reshape(-1, hidden_states.size(-1)), self.weight,
                                      labels.reshape(-1), weights.reshape(-1))
    return loss.reshape(1, 1, 1)  # stands where the logits would be in the model output


def _patch_lm_head(model: nn.Module, device: torch.device) -> None:
    head = model.get_output_embeddings()
    if head.bias is not None:
        raise ValueError("the fused cross-entropy kernel supports LM heads without bias")
    head.forward = types.MethodType(_lm_head_forward, head)
    model._steelworks_fused_ce = True


def fused_ce_enabled(model: nn.Module) -> bool:
    return bool(getattr(model, "_steelworks_fused_ce", False))


@contextlib.contextmanager
def loss_targets(model: nn.Module, labels: torch.Tensor, weights: torch.Tensor) -> Iterator[None]:
    """Within this block the patched model's output ``logits`` is ``sum_i w_i * CE_i``
    (shape [1, 1, 1]) over ``labels`` (-100: no loss) instead of logits."""
    head = model.get_output_embeddings()
    head._steelworks_targets = (labels, weights)
    try:
        yield
    finally:
        head._steelworks_targets = None
