"""RMSNorm (optionally fused with the decoder's residual add) as Triton forward/backward kernels.

Semantics are Hugging Face Qwen2/Llama ``RMSNorm`` exactly: normalise in fp32, round the
normalised row back to the input dtype, then multiply by the weight (so the output dtype is
``promote(x.dtype, weight.dtype)``). A decoder layer does ``s = x + residual; y = norm(s)``:
with ``residual`` given, one kernel pass reads x and residual once and writes both ``s`` (the
new residual stream) and ``y``, instead of three eager kernels and an extra round trip of s.

Backward saves only the row input (x, or s when fused: s is an output anyway, so saving it is
free) and one fp32 ``rstd`` per row; the normalised row is recomputed from them rather than
stored, which would cost another activation-sized tensor per norm. Each backward program walks
a contiguous block of rows and keeps a private fp32 partial of dW; the few partials are summed
by torch (cheaper than atomics, and deterministic). Float64 inputs are computed in float64
(instead of HF's fp32) so that ``torch.autograd.gradcheck`` can check the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steelworks.kernels.runtime import next_power_of_2

# One row lives in registers; past this the kernel would spill (no LLM here is that wide).
MAX_HIDDEN = 65536


def _launch_settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a whole row per program; more warps for wider rows so each thread
    holds ~8-16 elements (enough for 16-byte vector loads, few enough to stay in registers)."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm supports hidden sizes up to {MAX_HIDDEN}, got {n_cols}")
    block = next_power_of_2(n_cols)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else 32
    return block, num_warps


def _compute_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


@triton.jit
def _rsqrt(v, CT: tl.constexpr):
    # IEEE sqrt + div: tl.rsqrt lowers to an approximate instruction, sqrt_rn is fp32-only.
    if CT == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return 1.0 / tl.sqrt_rn(v)


@triton.jit
def _rms_norm_fwd(X, R, W, Y, S, RSTD, n_cols, eps,
                  HAS_RESIDUAL: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    off = row * n_cols + cols
    x = tl.load(X + off, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + off, mask=mask, other=0.0)
        x = (x.to(CT) + r.to(CT)).to(X.dtype.element_ty)  # s = x + residual, rounded as torch does
        tl.store(S + off, x, mask=mask)
    h = x.to(CT)
    rstd = _rsqrt(tl.sum(h * h, axis=0) / n_cols + eps, CT)
    tl.store(RSTD + row, rstd)
    n = (h * rstd).to(X.dtype.element_ty).to(CT)  # HF rounds the normalised row to x.dtype
    w = tl.load(W + cols, mask=mask, other=0.0).to(CT)
    tl.store(Y + off, (w * n).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(DY, DS_OUT, S, W, RSTD, DS, DW_PART, n_rows, n_cols, rows_per_program,
                  HAS_DS_OUT: tl.constexpr, COMPUTE_DW: tl.constexpr,
                  CT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(CT)
    dw = tl.zeros([BLOCK], dtype=CT)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for row in range(start, end):
        off = row * n_cols + cols
        dy = tl.load(DY + off, mask=mask, other=0.0).to(CT)
        h = tl.load(S + off, mask=mask, other=0.0).to(CT)
        rstd = tl.load(RSTD + row)
        n = h * rstd
        if COMPUTE_DW:
            dw += dy * n.to(S.dtype.element_ty).to(CT)
        # d/dh of h*rstd(h): rstd * (dn - n * mean(dn * n)); the dtype round trip is identity.
        dn = dy * w
        ds = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
        if HAS_DS_OUT:
            ds += tl.load(DS_OUT + off, mask=mask, other=0.0).to(CT)
        tl.store(DS + off, ds.to(DS.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _dw_programs(device: torch.device, n_rows: int) -> int:
    """Backward programs: two per SM keeps every SM busy while the dW partials stay tiny."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 2 * sms))
    return max(1, min(n_rows, 4))  # the interpreter runs programs one after another


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                eps: float):
        shape, n_cols = x.shape, x.shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"weight must have shape ({n_cols},), got {tuple(weight.shape)}")
        if residual is not None and (residual.shape != shape or residual.dtype != x.dtype):
            raise ValueError(f"residual must match x ({tuple(shape)}, {x.dtype}), "
                             f"got {tuple(residual.shape)}, {residual.dtype}")
        block, num_warps = _launch_settings(n_cols)
        ct_torch, ct = _compute_dtype(x.dtype)
        x2 = x.reshape(-1, n_cols).contiguous()
        w = weight.contiguous()
        n_rows = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=ct_torch, device=x.device)
        r2 = s = None
        if residual is not None:
            r2 = residual.reshape(-1, n_cols).contiguous()
            s = torch.empty_like(x2)
        if n_rows:
            _rms_norm_fwd[(n_rows,)](x2, r2, w, y, s, rstd, n_cols, eps,
                                     HAS_RESIDUAL=residual is not None, CT=ct, BLOCK=block,
                                     num_warps=num_warps)
        ctx.save_for_backward(x2 if s is None else s, w, rstd)
        ctx.shape, ctx.fused = shape, residual is not None
        ctx.set_materialize_grads(False)  # an unused s gets no grad: skip reading zeros
        if s is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, ds_out: torch.Tensor | None = None):
        s, w, rstd = ctx.saved_tensors
        n_rows, n_cols = s.shape
        block, num_warps = _launch_settings(n_cols)
        _, ct = _compute_dtype(s.dtype)
        if dy is None:  # only the returned s was used downstream
            dy = torch.zeros(s.shape, dtype=torch.promote_types(s.dtype, w.dtype), device=s.device)
        dy = dy.reshape(n_rows, n_cols).contiguous()
        if ds_out is not None:
            ds_out = ds_out.reshape(n_rows, n_cols).contiguous()
        compute_dw = ctx.needs_input_grad[1]
        n_prog = _dw_programs(s.device, n_rows)
        rows_per_program = -(-n_rows // n_prog)
        n_prog = -(-n_rows // rows_per_program) if n_rows else 1
        ds = torch.empty_like(s)
        dw_part = torch.zeros((n_prog, n_cols), dtype=rstd.dtype, device=s.device) if compute_dw else None
        if n_rows:
            _rms_norm_bwd[(n_prog,)](dy, ds_out, s, w, rstd, ds, dw_part, n_rows, n_cols,
                                     rows_per_program, HAS_DS_OUT=ds_out is not None,
                                     COMPUTE_DW=compute_dw, CT=ct, BLOCK=block,
                                     num_warps=num_warps)
        dw = dw_part.sum(0).to(w.dtype) if compute_dw else None
        ds = ds.view(ctx.shape)
        # s = x + residual: the same gradient flows to both addends.
        return ds, dw, (ds if ctx.fused else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF RMSNorm of ``x`` over its last dim; with ``residual``: ``(rms_norm(x + residual), x + residual)``."""
    return _RMSNormFn.apply(x, weight, residual, float(eps))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: HF Qwen2RMSNorm.forward (float64 stays float64, like the kernel)."""
    s = x if residual is None else x + residual
    h = s.to(torch.promote_types(s.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(s.dtype)
    return y if residual is None else (y, s)
