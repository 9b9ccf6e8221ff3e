"""Our decoder: one implementation of the Qwen2 and Llama families, architecture only.

Why our own: kernels, FSDP wrapping, activation checkpointing and ``torch.compile`` should see
plain modules, not a library's forward re-implemented and patched at run time (see
docs/architecture.md). Hugging Face stays the exchange format: parameter names are HF's, so
``hf_io.from_hf``/``to_hf`` move weights in and out without renaming, and what we export is
what ``AutoModelForCausalLM`` and vLLM open.

- RMSNorm, rotary position embedding (HF's "default" RoPE: cos/sin in fp32 from position ids),
  grouped-query attention, SwiGLU MLP, tied or untied embeddings. Qwen2 has biases on q/k/v;
  Llama takes ``attention_bias``/``mlp_bias`` from its config.
- Attention is PyTorch SDPA, causal; for packed rows it is document-causal: a new document
  starts where a position id is not the previous one + 1 (what ``train/data.py`` feeds and
  what transformers derives from position ids), and tokens attend only within their document.
  On CUDA in bf16/fp16 with ``flash-attn`` 2 installed, attention is its varlen kernel over
  the documents' boundaries (``cu_seqlens``) instead: no [L, L] mask, no compute across
  documents, and GQA without repeating k/v. SDPA with a dense mask is the fallback.
- ``train.kernels`` picks fused kernels (``steelworks.kernels``) per module: ``rmsnorm`` (with
  the residual add fused into the post-attention norm), ``rope``, ``swiglu``, ``ce`` (the LM
  head computes the fused linear cross-entropy: the [tokens x vocab] logits never exist).
  They are ordinary function calls chosen by flags (``Decoder.use_kernels``), not patches.
- ``forward(input_ids, position_ids, labels=None, loss_weights=None)``: logits, or with
  ``labels`` the fp32 scalar ``sum_i w_i * CE_i`` (-100 labels count nothing).

Parallelism (FSDP2, activation checkpointing, compile) lives in ``parallelize.py``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steelworks.kernels import KERNELS

log = logging.getLogger("steelworks.train")

ARCHS = ("qwen2", "llama")


@dataclass
class DecoderConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool | None = None  # None: the family's default (qwen2 q/k/v: yes; llama: no)
    mlp_bias: bool = False
    head_dim: int | None = None  # None: hidden_size // num_heads
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads})")
            self.head_dim = self.hidden_size // self.num_heads

    @property
    def qkv_bias(self) -> bool:
        return (self.arch == "qwen2") if self.attention_bias is None else self.attention_bias

    @property
    def o_bias(self) -> bool:
        # Qwen2's o_proj has no bias; Llama's attention_bias covers all four projections.
        return self.arch == "llama" and bool(self.attention_bias)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from steelworks.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin [B, L, head_dim] for position ids [B, L], computed in fp32 (as HF's default)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # rebuilt, never saved
        self.head_dim, self.theta = head_dim, theta

    def reset_inv_freq(self, device: torch.device | str) -> None:
        """Recompute the buffer on ``device`` (a model built on ``meta`` has no values)."""
        d = self.head_dim
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True where a document starts (a position id that is not the previous + 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Boolean [B, 1, L, L] mask, True where query i may attend to key j: j <= i within the
    same document. None when every row is one document (plain causal, SDPA's fast path)."""
    starts = _document_starts(position_ids)
    if not bool(starts[:, 1:].any()):
        return None
    doc = torch.cumsum(starts.long(), dim=1)
    same = doc[:, :, None] == doc[:, None, :]
    length = position_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn varlen boundaries over the flattened [B * L] tokens: int32 offsets of every
    document start plus the total, and the longest document. A row's first token always
    starts a document, so no document crosses rows."""
    starts = _document_starts(position_ids).flatten()
    offsets = torch.nonzero(starts).flatten()
    total = torch.tensor([starts.numel()], device=offsets.device)
    bounds = torch.cat((offsets, total)).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


@functools.cache
def flash_varlen() -> Any | None:
    """``flash_attn.flash_attn_varlen_func`` when flash-attn 2 is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@dataclass
class Documents:
    """Where each layer's attention may look, computed once per forward: a dense SDPA mask
    (None: plain causal), or flash-attn varlen boundaries when ``flash`` is set."""

    mask: torch.Tensor | None = None
    flash: Any | None = None  # flash_attn_varlen_func
    dtype: torch.dtype | None = None  # what flash-attn computes in
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @classmethod
    def of(cls, position_ids: torch.Tensor, x: torch.Tensor) -> Documents:
        dtype = _flash_dtype(x)
        flash = flash_varlen() if dtype is not None else None
        if flash is not None:
            bounds, longest = cu_seqlens(position_ids)
            return cls(flash=flash, dtype=dtype, cu_seqlens=bounds, max_seqlen=longest)
        return cls(mask=document_mask(position_ids))


def _flash_dtype(x: torch.Tensor) -> torch.dtype | None:
    """flash-attn runs on CUDA in bf16/fp16: parameters in half precision, or autocast to it.
    None where it cannot run."""
    half = (torch.bfloat16, torch.float16)
    if not x.is_cuda:
        return None
    if x.dtype in half:
        return x.dtype
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half:
        return torch.get_autocast_dtype("cuda")
    return None


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.fused_rope = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                docs: Documents) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.fused_rope:
            from steelworks.kernels.rope import apply_rope

            q, k = apply_rope(q, k, cos, sin)
        else:
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        if docs.flash is not None:
            # [B, H, L, D] -> [B * L, H, D] tokens; the kernel takes GQA's fewer k/v heads as is.
            def tokens(t: torch.Tensor) -> torch.Tensor:
                return t.transpose(1, 2).reshape(b * length, t.size(1), self.head_dim)

            dtype = docs.dtype  # RoPE in fp32 may have promoted q and k
            out = docs.flash(tokens(q).to(dtype), tokens(k).to(dtype), tokens(v).to(dtype),
                             docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen,
                             causal=True)
            return self.o_proj(out.reshape(b, length, -1))
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # GQA: each kv head serves `groups` query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask = docs.mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from steelworks.kernels.swiglu import swiglu

            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                docs: Documents) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, docs)
        norm = self.post_attention_layernorm
        if norm.fused:  # residual add + RMSNorm in one kernel pass
            from steelworks.kernels.rmsnorm import rms_norm

            # Under autocast without FSDP's bf16 parameters the residual stream stays fp32 and
            # o_proj returns bf16: eager PyTorch adds them in fp32, so must the kernel.
            y, x = rms_norm(h.to(x.dtype), norm.weight, norm.eps, residual=x)
        else:
            x = x + h
            y = norm(x)
        return x + self.mlp(y)


class DecoderBody(nn.Module):
    """HF's ``model.model``: embeddings, the layers and the final norm (names as HF's)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fused_ce = False

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def use_kernels(self, kernels: Sequence[str], device: torch.device | str) -> list[str]:
        """Switch the named fused kernels on (``train.kernels``); returns those applied. Where
        Triton cannot run (CPU without ``TRITON_INTERPRET=1``) a log line says why and the
        PyTorch ops stay."""
        from steelworks.kernels.runtime import can_run

        unknown = sorted(set(kernels) - set(KERNELS))
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; valid: {', '.join(KERNELS)}")
        if not kernels:
            return []
        ok, why = can_run(device)
        if not ok:
            log.warning("fused kernels %s not applied: %s; running PyTorch ops", list(kernels), why)
            return []
        for module in self.modules():
            if isinstance(module, RMSNorm) and "rmsnorm" in kernels:
                module.fused = True
            elif isinstance(module, Attention) and "rope" in kernels:
                module.fused_rope = True
            elif isinstance(module, MLP) and "swiglu" in kernels:
                module.fused = True
        self.fused_ce = "ce" in kernels
        log.info("fused kernels applied: %s", ", ".join(kernels))
        return list(kernels)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(x, position_ids)
        docs = Documents.of(position_ids, x)
        for layer in self.model.layers:
            x = layer(x, cos, sin, docs)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L, V]; with ``labels`` [B, L] (-100: no loss) the fp32 scalar
        ``sum_i w_i * CE_i`` (``loss_weights`` [B, L], default 1 per target). The LM head runs
        inside this forward on purpose: under FSDP2 its weight is whole only during the root
        module's forward."""
        h = self.hidden_states(input_ids, position_ids)
        if labels is None:
            return self.lm_head(h)
        if loss_weights is None:
            loss_weights = (labels != -100).float()
        if self.fused_ce:
            from steelworks.kernels.cross_entropy import fused_linear_cross_entropy

            return fused_linear_cross_entropy(h.reshape(-1, h.size(-1)), self.lm_head.weight,
                                              labels.reshape(-1), loss_weights.reshape(-1))
        logits = self.lm_head(h)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                             ignore_index=-100, reduction="none")
        return (ce * loss_weights.reshape(-1).float()).sum()


def build_decoder(cfg: DecoderConfig, device: torch.device | str = "cpu") -> Decoder:
    """The model on ``device`` (``meta``: no memory, for ``parallelize.materialize``)."""
    with torch.device(device):
        return Decoder(cfg)
