"""Fused Triton kernels for training, each beside its plain PyTorch reference:

- ``rmsnorm``: RMSNorm, optionally with the residual add fused in (``rms_norm``)
- ``rope``: rotary embedding of q and k in one launch (``apply_rope``, HF's signature)
- ``swiglu``: ``silu(gate) * up`` with SiLU recomputed in backward (``swiglu``)
- ``cross_entropy``: online-softmax cross-entropy whose gradient reuses the logits buffer
  (``cross_entropy``), and the fused LM head + loss that never builds the [tokens x vocab]
  logits (``fused_linear_cross_entropy``)

``patch.patch_model(model, kernels, device)`` swaps them into a Qwen2/Llama model
(``train.kernels``). They need CUDA; on CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them.
"""

# The names ``train.kernels`` accepts, here rather than in ``patch`` so that validating a
# config does not import torch (seconds on every CLI call, and transformers' tokenizer
# import then pulls in its torch modules too).
KERNELS = ("rmsnorm", "rope", "swiglu", "ce")
