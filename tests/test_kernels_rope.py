"""The fused RoPE kernel against HF's formula: forward and backward, GQA, odd lengths,
HF's non-contiguous q/k, real Qwen2 cos/sin with packed positions, and a patched tiny Qwen2.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so
shapes stay tiny; STEELWORKS_TEST_DEVICE=cuda runs the same tests compiled on a GPU."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from steelworks.kernels.rope import apply_rope, apply_rope_reference  # noqa: E402
from steelworks.kernels.runtime import can_run  # noqa: E402

DEVICE = os.environ.get("STEELWORKS_TEST_DEVICE", "cpu")
_ok, _why = can_run(DEVICE)
pytestmark = [pytest.mark.kernels, pytest.mark.skipif(not _ok, reason=_why)]


def _hf_qk(bsz: int, seq: int, heads: int, kv_heads: int, dim: int, dtype=torch.float32):
    """Leaf projection outputs and the q/k views HF makes of them: view(B, L, H, D).transpose(1, 2)."""
    pq = torch.randn(bsz, seq, heads * dim, device=DEVICE, dtype=dtype, requires_grad=True)
    pk = torch.randn(bsz, seq, kv_heads * dim, device=DEVICE, dtype=dtype, requires_grad=True)
    q = pq.view(bsz, seq, heads, dim).transpose(1, 2)
    k = pk.view(bsz, seq, kv_heads, dim).transpose(1, 2)
    return pq, pk, q, k


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check_against_float64(q, k, pq, pk, cos, sin, loss_fn) -> None:
    """Kernel (fp32) vs reference (fp64) on the same inputs: outputs and grads of the projections."""
    ref_pq, ref_pk = (p.detach().double().requires_grad_() for p in (pq, pk))
    ref_q = ref_pq.view(q.transpose(1, 2).shape).transpose(1, 2)
    ref_k = ref_pk.view(k.transpose(1, 2).shape).transpose(1, 2)
    q_before, k_before = q.detach().clone(), k.detach().clone()
    qo, ko = apply_rope(q, k, cos, sin)
    rqo, rko = apply_rope_reference(ref_q, ref_k, cos.double(), sin.double())
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == q.dtype
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs must be left untouched"
    assert _rel(qo, rqo) < 1e-5 and _rel(ko, rko) < 1e-5
    loss_fn(qo, ko).backward()
    loss_fn(rqo, rko).backward()
    assert _rel(pq.grad, ref_pq.grad) < 1e-5 and _rel(pk.grad, ref_pk.grad) < 1e-5


def _weighted(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    cache: dict = {}

    def loss(qo: torch.Tensor, ko: torch.Tensor) -> torch.Tensor:
        if "w" not in cache:  # the same weights for kernel and reference
            cache["w"] = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in (qo, ko)]
        wq, wk = cache["w"]
        return (qo * wq.to(qo.dtype)).sum() + (ko * wk.to(ko.dtype)).sum()

    return loss


@pytest.mark.parametrize(
    "bsz,seq,heads,kv_heads,dim,cos_batch",
    [(1, 7, 4, 2, 32, 1), (2, 13, 4, 2, 64, 2), (2, 5, 4, 4, 128, 1), (2, 3, 6, 1, 64, 2)],
)
def test_matches_reference_hf_layout(bsz, seq, heads, kv_heads, dim, cos_batch):
    torch.manual_seed(0)
    pq, pk, q, k = _hf_qk(bsz, seq, heads, kv_heads, dim)
    # Arbitrary cos/sin (halves not duplicated) check the exact transpose in the backward too.
    cos, sin = (torch.randn(cos_batch, seq, dim, device=DEVICE) for _ in range(2))
    _check_against_float64(q, k, pq, pk, cos, sin, _weighted())


def test_qwen2_rotary_embedding_with_packed_positions():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    cfg = Qwen2Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    rotary = Qwen2RotaryEmbedding(cfg).to(DEVICE)
    # Packed documents restart their positions; batch 2 gives cos/sin a real batch dim.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 8, 0, 1, 2]], device=DEVICE)
    torch.manual_seed(0)
    pq, pk, q, k = _hf_qk(2, 7, 4, 2, 32)
    cos, sin = rotary(q, position_ids)
    assert cos.shape == (2, 7, 32)
    _check_against_float64(q, k, pq, pk, cos, sin, _weighted())


@pytest.mark.parametrize("loss_kind", ["sum", "aliased"])
def test_backward_with_broadcast_or_shared_grads(loss_kind):
    """Grads that must not be overwritten in place: stride-0 (from .sum()) and dq is dk (from q + k)."""
    torch.manual_seed(0)
    pq, pk, q, k = _hf_qk(2, 5, 2, 2, 32)
    cos, sin = (torch.randn(1, 5, 32, device=DEVICE) for _ in range(2))
    w = torch.randn(2, 2, 5, 32, device=DEVICE)

    def loss(qo: torch.Tensor, ko: torch.Tensor) -> torch.Tensor:
        if loss_kind == "sum":
            return qo.sum() + 2 * ko.sum()
        return ((qo + ko) * w.to(qo.dtype)).sum()

    _check_against_float64(q, k, pq, pk, cos, sin, loss)


def test_unsqueeze_dim_2_layout():
    torch.manual_seed(0)
    q = torch.randn(2, 7, 4, 32, device=DEVICE)  # [B, L, H, D]
    k = torch.randn(2, 7, 2, 32, device=DEVICE)
    cos, sin = (torch.randn(2, 7, 32, device=DEVICE) for _ in range(2))
    for got, want in zip(apply_rope(q, k, cos, sin, unsqueeze_dim=2),
                         apply_rope_reference(q, k, cos, sin, unsqueeze_dim=2)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_keeps_dtype_and_is_close():
    torch.manual_seed(0)
    _, _, q, k = _hf_qk(1, 7, 4, 2, 64, dtype=torch.bfloat16)
    cos, sin = (torch.randn(1, 7, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    qo, ko = apply_rope(q, k, cos, sin)
    assert qo.dtype == ko.dtype == torch.bfloat16
    rq, rk = apply_rope_reference(q.float(), k.float(), cos.float(), sin.float())
    assert _rel(qo, rq) < 1e-2 and _rel(ko, rk) < 1e-2  # one bf16 rounding of an fp32 result


def test_bad_shapes_are_rejected():
    q, k = torch.randn(1, 4, 5, 32, device=DEVICE), torch.randn(1, 2, 5, 32, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, torch.randn(1, 6, 32, device=DEVICE), torch.randn(1, 6, 32, device=DEVICE))
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        apply_rope(q, k, torch.randn(1, 5, 32, device=DEVICE), torch.randn(1, 5, 32, device=DEVICE), 3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patched_tiny_qwen2_matches_unpatched(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(DEVICE)
    ids = torch.randint(0, 96, (2, 9), device=DEVICE)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))], device=DEVICE)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, position_ids=position_ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run()
    calls = mock.Mock(side_effect=apply_rope)
    with mock.patch.object(modeling_qwen2, "apply_rotary_pos_emb", calls):
        loss, grads = run()
    assert calls.call_count == cfg.num_hidden_layers  # the patch really took effect
    assert modeling_qwen2.apply_rotary_pos_emb is not calls  # and is restored
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
