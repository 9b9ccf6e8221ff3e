"""Cross-entropy that computes its gradient in the forward pass, in place of the logits.

Why: with a 152k vocabulary the LM head's logits dominate activation memory. PyTorch's
``F.cross_entropy(logits.float(), ...)`` keeps the bf16 logits, their fp32 copy and then a
fp32 softmax-gradient of the same size: for N = 16k tokens and V = 152k that is
N*V*(2 + 4 + 4) bytes ~ 25 GB. The loss is the last op, so its gradient
``softmax(x) - onehot(y)`` (label smoothing: ``- (1-eps)*onehot(y) - eps/V``) is known as
soon as the forward pass has the log-sum-exp.

``cross_entropy`` runs one Triton program per row: pass 1 streams the row in vocab blocks
keeping a running max and sum (online softmax, fp32 accumulation); pass 2 writes
d loss_i / d logits_i over the logits themselves. The only thing saved for backward is
that buffer (no extra [N, V]); backward scales row i by grad_output[i], so any reduction
of the per-token losses (sum, a weighted sum) is differentiated correctly.
THE LOGITS TENSOR PASSED IN IS OVERWRITTEN when it requires grad (``inplace=True``, the
default): callers must not read it afterwards. ``inplace=False`` works on a copy. Without
grad (eval, ``torch.no_grad``) nothing is written.

``fused_linear_cross_entropy`` never materialises the [N, V] logits at all: tokens go
through in chunks, each chunk's logits = hidden_chunk @ weight.T (input dtype) turn in
place into w_i * d CE_i / d logits, and the chunk's grad_hidden rows (dlogits @ weight)
and its grad_weight share (dlogits.T @ hidden_chunk, accumulated in fp32) are computed
right away. Held between forward and backward: grad_hidden [N, H] (input dtype) and
grad_weight [V, H] (fp32) -- the size of the inputs, independent of N*V; the transient
peak adds one chunk of logits. Backward only scales them by the scalar grad_output.
The token weights w_i carry the train loop's averaging (1/targets per token, or per
sample 1/(targets in i's sample * samples)), known before the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from steelworks.kernels.runtime import can_run, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # the references below still work; the kernels say why they cannot run
    triton = None

# Largest vocab block one program holds in registers. ptxas for sm_90 (bf16, every feature
# on): 4096 over 8 warps takes 76 registers/thread, no spills, 3 programs per SM; 8192 over 8
# warps takes 164 (1 per SM). V = 152k streams in 38 blocks per pass. Tune on the H100.
MAX_BLOCK_V = 4096
# Default chunk: the largest power of two of rows whose logits fit in 256 MiB (V = 152k in
# bf16: 512 rows, 156 MB; V = 32k in bf16: 4096 rows, 262 MB), big enough for full-speed
# GEMMs and small beside the weights and their fp32 gradient (V*H*4 bytes).
CHUNK_BYTES = 256 * 2**20

if triton is not None:

    @triton.jit
    def _ce_kernel(x_ptr, x_row_stride, labels_ptr, w_ptr, loss_ptr, n_cols, ignore_index,
                   smoothing, WRITE_GRAD: tl.constexpr, HAS_W: tl.constexpr,
                   SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at N*V scale
        x_ptr += row * x_row_stride
        label = tl.load(labels_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        if label == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if WRITE_GRAD:  # the buffer still holds logits: ignored rows get a zero gradient
                zero = tl.zeros([BLOCK_V], dtype=x_ptr.dtype.element_ty)
                for start in range(0, n_cols, BLOCK_V):
                    tl.store(x_ptr + start + cols, zero, mask=start + cols < n_cols)
        else:
            # Pass 1: running max m and sum d of exp(x - m) over vocab blocks, in fp32.
            m = -float("inf")
            d = 0.0
            sum_x = 0.0
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                x = tl.load(x_ptr + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
                if SMOOTH:
                    sum_x += tl.sum(tl.where(offs < n_cols, x, 0.0), axis=0)
            lse = m + tl.log(d)
            # An out-of-range label reads nothing and gives a NaN loss (no device assert).
            valid = (label >= 0) & (label < n_cols)
            x_label = tl.load(x_ptr + label, mask=valid, other=float("nan")).to(tl.float32)
            loss = lse - (1.0 - smoothing) * x_label
            if SMOOTH:
                loss -= smoothing * sum_x / n_cols
            tl.store(loss_ptr + row, loss)
            if WRITE_GRAD:
                # Pass 2: d loss / d x_j = softmax_j - (1-eps)[j == y] - eps/V, times w_i.
                scale = 1.0
                if HAS_W:
                    scale = tl.load(w_ptr + row).to(tl.float32)
                for start in range(0, n_cols, BLOCK_V):
                    offs = start + cols
                    x = tl.load(x_ptr + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
                    g = tl.exp(x - lse)
                    if SMOOTH:
                        g -= smoothing / n_cols
                    g = tl.where(offs == label, g - (1.0 - smoothing), g)
                    tl.store(x_ptr + offs, (g * scale).to(x_ptr.dtype.element_ty), mask=offs < n_cols)


def _launch(x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, loss: torch.Tensor,
            ignore_index: int, smoothing: float, write_grad: bool) -> None:
    """Per-row CE of ``x`` [n, V] (row stride free, unit column stride) into ``loss`` [n];
    with ``write_grad`` also overwrite ``x`` with (weights *) d loss / d x."""
    ok, why = can_run(x.device)
    if not ok:
        raise RuntimeError(why)
    n, v = x.shape
    if n == 0:
        return
    block = min(next_power_of_2(v), MAX_BLOCK_V)
    _ce_kernel[(n,)](x, x.stride(0), labels, weights if weights is not None else loss, loss, v,
                     ignore_index, float(smoothing), WRITE_GRAD=write_grad, HAS_W=weights is not None,
                     SMOOTH=smoothing > 0, BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def _check(labels: torch.Tensor, label_smoothing: float) -> None:
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32 class ids, got {labels.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                label_smoothing: float, inplace: bool) -> torch.Tensor:
        v = logits.size(-1)
        buf = logits.detach().reshape(-1, v)  # a view when it can be: the caller's memory is reused
        if not inplace or buf.stride(-1) != 1:
            buf = buf.clone(memory_format=torch.contiguous_format)
        loss = torch.empty(buf.size(0), dtype=torch.float32, device=buf.device)
        _launch(buf, labels.reshape(-1).long().contiguous(), None, loss, ignore_index, label_smoothing, True)
        # The kernel wrote through a raw pointer: bump the version counter so any other graph
        # node that saved these logits fails loudly in backward instead of reading gradients.
        torch.autograd.graph.increment_version(buf)
        ctx.save_for_backward(buf)
        ctx.logits_shape = logits.shape
        ctx.used = False
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("cross_entropy's saved gradient is scaled in place: backward runs once")
        ctx.used = True
        (buf,) = ctx.saved_tensors
        buf.mul_(grad_loss.reshape(-1, 1))  # computed in fp32, stored in the logits dtype
        return buf.view(ctx.logits_shape), None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, inplace: bool = True) -> torch.Tensor:
    """Per-token CE in fp32, shape ``labels.shape`` (0 where label == ignore_index), equal to
    ``F.cross_entropy(logits.float(), labels, reduction="none", ...)``.

    When ``logits`` requires grad it is OVERWRITTEN with the gradient (see the module doc);
    pass ``inplace=False`` to keep it (costs one copy). Backward runs once."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} minus the vocab dim")
    _check(labels, label_smoothing)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropy.apply(logits, labels, ignore_index, label_smoothing, inplace)
    x = logits.reshape(-1, logits.size(-1))
    x = x if x.stride(-1) == 1 else x.contiguous()
    loss = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    _launch(x, labels.reshape(-1).long().contiguous(), None, loss, ignore_index, label_smoothing, False)
    return loss.view(labels.shape)


def default_chunk_size(vocab: int, dtype: torch.dtype) -> int:
    """Largest power of two of rows whose [rows, vocab] logits fit in CHUNK_BYTES."""
    rows = max(1, CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))
    return 1 << (rows.bit_length() - 1)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with a fp32 ``acc``, whatever the dtype of ``a`` and ``b``."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:  # cuBLAS C = A @ B + C: bf16 A, B into fp32 C, no [V, H] temporary (torch >= 2.8)
        torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
    else:  # CPU has no mixed-dtype GEMM: a temporary product in the input dtype, added in fp32
        acc += a @ b


def _fused_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   token_weights: torch.Tensor | None, ignore_index: int, label_smoothing: float,
                   chunk_size: int | None, need_hidden: bool, need_weight: bool,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """-> (sum_i w_i CE_i, grad_hidden or None, fp32 grad_weight or None), chunk by chunk."""
    n, v = hidden.size(0), weight.size(0)
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # as autocast would
    chunk = chunk_size or default_chunk_size(v, hidden.dtype)
    write = need_hidden or need_weight
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_hidden else None
    grad_w = torch.zeros(v, hidden.size(1), dtype=torch.float32, device=hidden.device) if need_weight else None
    for s in range(0, n, chunk):
        h = hidden[s:s + chunk]
        logits = h @ w.t()  # [c, V]; becomes w_i * d CE_i / d logits in place
        tw = token_weights[s:s + chunk] if token_weights is not None else None
        _launch(logits, labels[s:s + chunk], tw, loss[s:s + chunk], ignore_index, label_smoothing, write)
        if grad_h is not None:
            torch.mm(logits, w, out=grad_h[s:s + chunk])
        if grad_w is not None:
            _add_product(grad_w, logits.t(), h)
        del logits
    total = (loss * token_weights).sum() if token_weights is not None else loss.sum()
    return total, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                token_weights: torch.Tensor | None, ignore_index: int, label_smoothing: float,
                chunk_size: int | None) -> torch.Tensor:
        total, grad_h, grad_w = _fused_forward(hidden, weight, labels, token_weights, ignore_index,
                                               label_smoothing, chunk_size, ctx.needs_input_grad[0],
                                               ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy's saved gradients are scaled in place: backward runs once")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_out)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               token_weights: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """``sum_i w_i * CE(hidden_i @ weight.T, labels_i)`` as a fp32 scalar, never holding the
    [N, V] logits (see the module doc). hidden [N, H], weight [V, H] (no bias), labels [N];
    ``token_weights`` [N] (default 1) get no gradient. ``chunk_size``: tokens per chunk,
    default ``default_chunk_size(V, hidden.dtype)``."""
    if hidden.dim() != 2 or weight.dim() != 2 or weight.size(1) != hidden.size(1):
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [N] = [{hidden.size(0)}]")
    if token_weights is not None and token_weights.shape != labels.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must match labels {tuple(labels.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check(labels, label_smoothing)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # As autocast runs a linear layer: both operands in its dtype (the GEMMs here are
        # explicit, and mixing a bf16 product into fp32 buffers would fail). The casts are
        # differentiable, so fp32 parameters still get their gradients.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return fused_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels, token_weights,
                                              ignore_index, label_smoothing, chunk_size)
    hidden = hidden.contiguous()
    labels = labels.long().contiguous()
    if token_weights is not None:
        token_weights = token_weights.detach().float().contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, token_weights, ignore_index,
                                              label_smoothing, chunk_size)
    return _fused_forward(hidden, weight, labels, token_weights, ignore_index, label_smoothing,
                          chunk_size, False, False)[0]


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                            label_smoothing: float = 0.0) -> torch.Tensor:
    """What ``cross_entropy`` computes, in plain PyTorch (fp32 or wider)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(x.reshape(-1, x.size(-1)), labels.reshape(-1), ignore_index=ignore_index,
                         label_smoothing=label_smoothing, reduction="none")
    return ce.view(labels.shape)


def fused_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                         token_weights: torch.Tensor | None = None, ignore_index: int = -100,
                                         label_smoothing: float = 0.0) -> torch.Tensor:
    """What ``fused_linear_cross_entropy`` computes, materialising the logits."""
    ce = cross_entropy_reference(hidden @ weight.t(), labels, ignore_index, label_smoothing)
    return (ce * token_weights.to(ce.dtype)).sum() if token_weights is not None else ce.sum()
