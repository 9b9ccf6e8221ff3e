"""Our decoder (train/model.py) against transformers on the same weights, in fp32: logits and
loss within 1e-5, gradients within 1e-4, packed rows with restarting positions, and the
HF -> ours -> HF round trip bit for bit (train/hf_io.py)."""

from __future__ import annotations

import json

import pytest
import torch

from steelworks.train.hf_io import from_hf, to_hf

VOCAB = 97


def _hf_model(arch: str, tmp_path, tie: bool = True, **extra):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
              rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, pad_token_id=0,
              eos_token_id=1, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    with torch.no_grad():  # biases start at zero in HF: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    out = tmp_path / f"hf-{arch}-{tie}"
    model.save_pretrained(out)
    return model.eval(), out


CASES = [("qwen2", True, {}), ("qwen2", False, {}), ("llama", False, {}),
         ("llama", True, {"attention_bias": True, "mlp_bias": True})]


@pytest.mark.parametrize("arch, tie, extra", CASES)
def test_logits_loss_and_grads_match_transformers(arch, tie, extra, tmp_path):
    hf, path = _hf_model(arch, tmp_path, tie, **extra)
    ours = from_hf(path).eval()
    ids = torch.randint(2, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-5
    # loss: HF shifts its labels inside; ours takes them shifted (input t predicts label t)
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[0, :3] = -100
    hf_labels = ids.masked_fill(torch.cat([torch.zeros(2, 1, dtype=torch.bool), labels == -100], 1), -100)
    hf_loss = hf(ids, labels=hf_labels).loss
    our_sum = ours(inputs, labels=labels)
    ours_loss = our_sum / (labels != -100).sum()
    assert abs(float(ours_loss) - float(hf_loss)) < 1e-5
    ours_loss.backward()
    hf_loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params[name].grad
        assert (p.grad - ref).abs().max() < 1e-4, name


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_rows_attend_only_within_their_document(arch, tmp_path):
    hf, path = _hf_model(arch, tmp_path)
    ours = from_hf(path).eval()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(2, VOCAB, (1, 7), generator=g), torch.randint(2, VOCAB, (1, 11), generator=g)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None]
    got = ours(packed, position_ids=pos)
    # ground truth without any mask logic: each document on its own
    alone = torch.cat([ours(a), ours(b)], 1)
    assert (got - alone).abs().max() < 1e-5
    # transformers derives the same block-diagonal mask from position ids (without a KV cache)
    assert (got - hf(packed, position_ids=pos, use_cache=False).logits).abs().max() < 1e-5


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """flash_attn_varlen_func's contract, written with SDPA one document at a time: tokens
    [T, H, D], k/v with fewer (GQA) heads, documents at the cu_seqlens offsets."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max(lengths) == max_q
    groups = q.size(1) // k.size(1)
    out = []
    for qq, kk, vv in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
        kk, vv = kk.repeat_interleave(groups, dim=1), vv.repeat_interleave(groups, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(
            qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), is_causal=True)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def test_flash_varlen_path_matches_sdpa(tmp_path, monkeypatch):
    """The flash-attn path (CUDA, half precision, flash-attn installed) cannot run here, so it
    runs with a reference varlen function in fp32 on CPU: our side of it (boundaries from
    position ids, token layout, GQA heads, dtype) must give the SDPA path's logits."""
    from steelworks.train import model as model_mod

    _, path = _hf_model("qwen2", tmp_path)
    ours = from_hf(path).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (2, 20), generator=g)
    pos = torch.stack([torch.cat([torch.arange(7), torch.arange(13)]),
                       torch.cat([torch.arange(5), torch.arange(4), torch.arange(11)])])
    sdpa = ours(ids, position_ids=pos)
    bounds, longest = model_mod.cu_seqlens(pos)
    assert bounds.tolist() == [0, 7, 20, 25, 29, 40] and longest == 13
    calls = []

    def fake(*args, **kwargs):
        calls.append(args[0].shape)
        return _reference_varlen(*args, **kwargs)

    monkeypatch.setattr(model_mod, "_flash_dtype", lambda x: torch.float32)
    monkeypatch.setattr(model_mod, "flash_varlen", lambda: fake)
    flash = ours(ids, position_ids=pos)
    assert len(calls) == 2 and calls[0] == (40, 4, 16)  # one call per layer, [B*L, H, D]
    assert (flash - sdpa).abs().max() < 1e-5


@pytest.mark.parametrize("arch, tie, extra", CASES)
def test_hf_round_trip_is_bit_identical_and_opens_in_transformers(arch, tie, extra, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf, path = _hf_model(arch, tmp_path, tie, **extra)
    ours = from_hf(path)
    out = to_hf(ours, ours.config, tmp_path / "out")
    original, back = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(back)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    reopened = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(reopened).__name__ == type(hf).__name__
    ids = torch.randint(2, VOCAB, (1, 9))
    assert torch.equal(reopened(ids).logits, hf(ids).logits)


def test_unsupported_and_incomplete_directories_are_named(tmp_path):
    _, path = _hf_model("qwen2", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"gpt2/config.json: model_type 'gpt2' is not supported"):
        from_hf(bad)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_hf(empty)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path / "nowhere")
    wrong = tmp_path / "wrong-vocab"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({**cfg, "vocab_size": VOCAB + 1}))
    (wrong / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="embed_tokens.weight has shape"):
        from_hf(wrong)
