"""Fused Triton kernels (RMSNorm, RoPE, SwiGLU, cross-entropy) and ``patch_model``.

Not built yet: this package is the home the training loop will import them from (see the
kernels issue). Until then models run PyTorch's eager ops and SDPA attention.
"""
