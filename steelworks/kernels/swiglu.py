"""SwiGLU gate, ``silu(gate) * up``, as Triton forward/backward kernels.

Eager PyTorch runs SwiGLU as two kernels (silu, then mul) and autograd keeps silu(gate) alive
for the backward of the mul: one extra intermediate-sized activation per MLP, the widest
tensor of the layer. Here the forward is one elementwise pass computed in fp32 (one rounding
to the input dtype instead of eager's two), and the backward saves only the two inputs and
recomputes sigmoid(gate) from them: a few extra flops in a memory-bound kernel, in exchange
for never storing an activation. Float64 inputs are computed in float64 (for gradcheck).

Gradients, with sig = sigmoid(gate) and silu = gate * sig:
    d_up   = g * silu
    d_gate = g * up * sig * (1 + gate * (1 - sig))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elementwise over the flattened tensor: 1024 elements per program with 4 warps is 8 per
# thread, i.e. 16-byte vector loads for bf16/fp16, and plenty of programs to fill every SM.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sigmoid(a):
    # exp overflow for very negative a gives 1 / inf = 0: still the right limit.
    return 1.0 / (1.0 + tl.exp(-a))


@triton.jit
def _swiglu_fwd(G, U, Y, n, CT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(G + offs, mask=mask, other=0.0).to(CT)
    b = tl.load(U + offs, mask=mask, other=0.0).to(CT)
    tl.store(Y + offs, (a * _sigmoid(a) * b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, CT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(DY + offs, mask=mask, other=0.0).to(CT)
    a = tl.load(G + offs, mask=mask, other=0.0).to(CT)
    b = tl.load(U + offs, mask=mask, other=0.0).to(CT)
    sig = _sigmoid(a)  # recomputed, not saved
    silu = a * sig
    tl.store(DU + offs, (g * silu).to(DU.dtype.element_ty), mask=mask)
    d_gate = g * b * sig * (1.0 + a * (1.0 - sig))
    tl.store(DG + offs, d_gate.to(DG.dtype.element_ty), mask=mask)


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"gate and up must match in shape and dtype, got "
                             f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
        # A fused gate_up projection hands in strided halves; those are copied here.
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, y, n, CT=_compute_dtype(gate.dtype),
                                                  BLOCK=BLOCK, num_warps=NUM_WARPS)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dy, gate, up, d_gate, d_up, n,
                                                  CT=_compute_dtype(gate.dtype), BLOCK=BLOCK,
                                                  num_warps=NUM_WARPS)
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one Triton pass (fp32 math, result in the input dtype)."""
    return _SwiGLUFn.apply(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, as HF's MLP computes it: ``act_fn(gate_proj(x)) * up_proj(x)``."""
    return torch.nn.functional.silu(gate) * up
