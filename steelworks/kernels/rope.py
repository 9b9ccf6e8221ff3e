"""Fused rotary position embedding: one Triton launch rotates q and k for all heads.

Hugging Face's ``apply_rotary_pos_emb`` (Llama/Qwen2 ``rotate_half`` layout) builds
``rotate_half`` with a ``cat`` and does four multiplies and two adds per tensor: about ten
kernel launches and as many full passes over q and k. Here one program per (batch,
position) loads that position's cos/sin row once, then rotates every q head and every kv
head (GQA: any head counts) in fp32 and stores in the input dtype: one read and one write
of q and k, with arbitrary strides, so HF's ``view(...).transpose(1, 2)`` outputs are used
as they are (for one position all heads of them are contiguous: coalesced, no copy).

Why the forward writes fresh outputs instead of rotating in place: q and k are views (of
the projection output), and autograd rejects a Function that returns more than one tensor
and modifies a view input in place (``mark_dirty`` then raises). Splitting q and k into two
Functions would cost two launches and a second cos/sin read. Out of place moves the same
bytes as in place; the un-rotated q/k are freed right after, since nothing saves them
(``nn.Linear`` saves its input, not its output). Inputs are left untouched, as HF does.

The backward is the transpose of the forward map (for duplicated cos/sin halves: the same
rotation with sin -> -sin) and runs IN PLACE on the incoming grads when that is safe: a
dense layout (no stride-0 broadcast) and dq, dk not sharing storage (``a + b`` hands both
the same tensor); otherwise it writes fresh tensors. Caveat of in place: a gradient tensor
a caller passes explicitly (``torch.autograd.grad(..., grad_outputs=g)``) is overwritten.
cos/sin are constants (HF computes them under ``no_grad``): they get no gradient.
"""

from __future__ import annotations

import torch

from steelworks.kernels.runtime import can_run, next_power_of_2, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(x_ptr, o_ptr, n_heads, sx_h, sx_d, so_h, so_d, c1, c2, s1, s2,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # o1 = x1*c1 - x2*s1, o2 = x2*c2 + x1*s2: HF's x*cos + rotate_half(x)*sin, halves split.
        offs_d = tl.arange(0, BLOCK_D)
        for h0 in range(0, n_heads, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < HALF)
            x_off = offs_h[:, None] * sx_h + offs_d[None, :] * sx_d
            o_off = offs_h[:, None] * so_h + offs_d[None, :] * so_d
            x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + x_off + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
            # Both halves are loaded before either is stored, so o_ptr == x_ptr is safe.
            tl.store(o_ptr + o_off, (x1 * c1 - x2 * s1).to(o_ptr.dtype.element_ty), mask=mask)
            tl.store(o_ptr + o_off + HALF * so_d, (x2 * c2 + x1 * s2).to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, seq_len, n_qh, n_kh,
                     sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d,
                     sqo_b, sqo_h, sqo_l, sqo_d, sko_b, sko_h, sko_l, sko_d,
                     sc_b, sc_l, sc_d, ss_b, ss_l, ss_d,
                     HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
                     BLOCK_HK: tl.constexpr, BACKWARD: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # int64: batch*stride can pass 2**31 elements
        b = pid // seq_len
        pos = pid % seq_len
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HALF
        cos_row = cos_ptr + b * sc_b + pos * sc_l + offs_d * sc_d
        sin_row = sin_ptr + b * ss_b + pos * ss_l + offs_d * ss_d
        c1 = tl.load(cos_row, mask=dmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_row + HALF * sc_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_row, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_row + HALF * ss_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        if BACKWARD:
            # Transpose of the forward map: d1 = g1*c1 + g2*s2, d2 = g2*c2 - g1*s1.
            s_lo = -s2
            s2 = -s1
            s1 = s_lo
        _rotate_heads(q_ptr + b * sq_b + pos * sq_l, qo_ptr + b * sqo_b + pos * sqo_l, n_qh,
                      sq_h, sq_d, sqo_h, sqo_d, c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_D)
        _rotate_heads(k_ptr + b * sk_b + pos * sk_l, ko_ptr + b * sko_b + pos * sko_l, n_kh,
                      sk_h, sk_d, sko_h, sko_d, c1, c2, s1, s2, HALF, BLOCK_HK, BLOCK_D)


def _launch(q: torch.Tensor, k: torch.Tensor, qo: torch.Tensor, ko: torch.Tensor,
            cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """q, k (and outputs qo, ko) are [B, H, L, D]; cos, sin are [B, L, D] (stride 0 if broadcast)."""
    bsz, n_qh, seq_len, head_dim = q.shape
    if q.numel() == 0 or k.numel() == 0:
        return
    half = head_dim // 2
    block_d = next_power_of_2(half)
    # Cap the tile near 2048 elements per half so registers stay bounded for many heads.
    cap = max(1, 2048 // block_d)
    block_hq = min(next_power_of_2(n_qh), cap)
    block_hk = min(next_power_of_2(k.shape[1]), cap)
    _rope_kernel[(bsz * seq_len,)](
        q, k, qo, ko, cos, sin, seq_len, n_qh, k.shape[1],
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *cos.stride(), *sin.stride(),
        HALF=half, BLOCK_D=block_d, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BACKWARD=backward,
        num_warps=4,
    )


def _writable_in_place(g: torch.Tensor) -> bool:
    # Dense layouts only: a stride-0 (expanded) grad would have several programs write one slot.
    return g.is_contiguous() or g.transpose(1, 2).is_contiguous()


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # keeps q's (transposed) layout
        _launch(q, k, q_out, k_out, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        shared = dq.untyped_storage().data_ptr() == dk.untyped_storage().data_ptr()
        dq_out = dq if _writable_in_place(dq) and not shared else torch.empty_like(dq, memory_format=torch.contiguous_format)
        dk_out = dk if _writable_in_place(dk) and not shared else torch.empty_like(dk, memory_format=torch.contiguous_format)
        _launch(dq, dk, dq_out, dk_out, cos, sin, backward=True)
        return dq_out, dk_out, None, None


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> int:
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"expected 4-d q, k and 3-d cos == sin shapes; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    dim = unsqueeze_dim % 4 if -4 <= unsqueeze_dim <= 3 else unsqueeze_dim
    if dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ([B, H, L, D]) or 2 ([B, L, H, D]); got {unsqueeze_dim}")
    seq_dim = 3 - dim  # the sequence axis of q/k: 2 for [B, H, L, D], 1 for [B, L, H, D]
    bsz, seq_len, head_dim = q.shape[0], q.shape[seq_dim], q.shape[-1]
    if head_dim % 2 or k.shape[0] != bsz or k.shape[seq_dim] != seq_len or k.shape[-1] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, length and an even head_dim")
    if cos.shape[0] not in (1, bsz) or cos.shape[1:] != (seq_len, head_dim):
        raise ValueError(f"cos/sin {tuple(cos.shape)} must be [1 or {bsz}, {seq_len}, {head_dim}]")
    ok, why = can_run(q.device)
    if not ok:
        raise RuntimeError(f"apply_rope: {why}")
    return dim


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's ``apply_rotary_pos_emb``: returns (q_embed, k_embed) in q's/k's dtypes.

    q [B, H, L, D], k [B, Hkv, L, D] (or [B, L, H, D] with ``unsqueeze_dim=2``), any strides;
    cos, sin [B or 1, L, D] as Qwen2RotaryEmbedding/LlamaRotaryEmbedding return them.
    """
    dim = _check(q, k, cos, sin, unsqueeze_dim)
    cos = cos.expand(q.shape[0], -1, -1)  # batch-1 cos/sin become stride 0: read, never copied
    sin = sin.expand(q.shape[0], -1, -1)
    if dim == 2:  # the kernel indexes [B, H, L, D]; a transposed view is free
        q_out, k_out = _RopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return _RopeFunction.apply(q, k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's formula in plain PyTorch (the definition the kernel is tested against)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
