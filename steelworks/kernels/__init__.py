"""Fused Triton kernels for training, each beside its plain PyTorch reference:

- ``rmsnorm``: RMSNorm, optionally with the residual add fused in (``rms_norm``)
- ``rope``: rotary embedding of q and k in one launch (``apply_rope``, HF's signature)
- ``swiglu``: ``silu(gate) * up`` with SiLU recomputed in backward (``swiglu``)
- ``cross_entropy``: online-softmax cross-entropy whose gradient reuses the logits buffer
  (``cross_entropy``), and the fused LM head + loss that never builds the [tokens x vocab]
  logits (``fused_linear_cross_entropy``)

Our decoder (``train/model.py``) calls them where ``train.kernels`` names them
(``Decoder.use_kernels``). They need CUDA; on CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them.
"""

# The names ``train.kernels`` accepts, here so that validating a config does not import
# torch (seconds on every CLI call).
KERNELS = ("rmsnorm", "rope", "swiglu", "ce")
