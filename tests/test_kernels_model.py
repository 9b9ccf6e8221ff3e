"""Our decoder with every fused kernel switched on computes the same loss and gradients as with
none, in fp32 and under bf16 autocast with fp32 parameters (one rank, no FSDP: the case that
crashed with "residual must match x"), and the train loop runs with them (Triton's
interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from steelworks.kernels.runtime import can_run  # noqa: E402
from steelworks.train.config import ModelConfig  # noqa: E402
from steelworks.train.model import build_decoder  # noqa: E402
from steelworks.train.models import decoder_config  # noqa: E402

pytestmark = pytest.mark.kernels
DEVICE = torch.device(os.environ.get("STEELWORKS_TEST_DEVICE", "cpu"))  # make gpu-check: cuda
ALL = ["rmsnorm", "rope", "swiglu", "ce"]


def _pair(arch: str):
    cfg = decoder_config(ModelConfig(arch=arch, size="tiny", hidden_size=48, num_heads=4, num_kv_heads=2,
                                     intermediate_size=100), 300, 0, 1)
    torch.manual_seed(0)
    a = build_decoder(cfg)
    with torch.no_grad():  # biases and norms away from their init, so that they matter
        for p in a.parameters():
            if p.ndim == 1:
                p.normal_(0.5 if p.shape[0] == cfg.hidden_size else 0.0, 0.1)
    b = build_decoder(cfg)
    b.load_state_dict(a.state_dict())
    return a.to(DEVICE), b.to(DEVICE)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 300, (2, 11), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]] * 2)  # packed rows: positions restart
    labels = torch.randint(0, 300, (2, 11), generator=g)
    labels[0, :3] = -100
    weights = (labels != -100).float() / (labels != -100).sum()
    return ids.to(DEVICE), pos.to(DEVICE), labels.to(DEVICE), weights.to(DEVICE)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_kernels_match_loss_and_gradients(arch):
    if not can_run(DEVICE)[0]:
        pytest.skip(can_run(DEVICE)[1])
    ref, fused = _pair(arch)
    assert fused.use_kernels(ALL, DEVICE) == ALL
    ids, pos, labels, weights = _batch()
    expected = ref(ids, position_ids=pos, labels=labels, loss_weights=weights)
    expected.backward()
    got = fused(ids, position_ids=pos, labels=labels, loss_weights=weights)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # without labels the fused model returns ordinary logits
        torch.testing.assert_close(fused(ids, position_ids=pos), ref(ids, position_ids=pos),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_kernels_under_bf16_autocast_with_fp32_parameters(arch):
    """One process, no FSDP: parameters stay fp32 while autocast runs the linears in bf16, so
    the post-attention residual (fp32) meets a bf16 o_proj output. The fused residual-add
    RMSNorm must add them as eager PyTorch does, not raise."""
    if not can_run(DEVICE)[0]:
        pytest.skip(can_run(DEVICE)[1])
    ref, fused = _pair(arch)
    fused.use_kernels(ALL, DEVICE)
    ids, pos, labels, weights = _batch()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        expected = ref(ids, position_ids=pos, labels=labels, loss_weights=weights)
        got = fused(ids, position_ids=pos, labels=labels, loss_weights=weights)
    expected.backward()
    got.backward()
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        scale = grads[name].grad.abs().max().clamp(min=1e-3)
        assert (p.grad - grads[name].grad).abs().max() / scale < 0.1, name


def test_kernels_are_per_instance_and_explained(caplog, monkeypatch):
    """Kernels are flags of one model instance: another model in the process (evaluation,
    serving) keeps PyTorch's ops."""
    from steelworks.kernels import rope

    other, fused = _pair("qwen2")
    with pytest.raises(ValueError, match="unknown kernels"):
        fused.use_kernels(["flash"], DEVICE)
    if can_run(DEVICE)[0]:
        fused.use_kernels(["rope"], DEVICE)
        calls = []
        monkeypatch.setattr(rope, "apply_rope", lambda *a: calls.append(1) or rope.apply_rope_reference(*a))
        ids = torch.randint(2, 300, (1, 7), device=DEVICE)
        with torch.no_grad():
            other(ids)
            assert calls == []
            fused(ids)
        assert len(calls) == len(fused.model.layers)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with caplog.at_level("WARNING"):
        assert other.use_kernels(["rmsnorm"], DEVICE) == []
    assert "need a CUDA device" in caplog.text


@pytest.mark.parametrize("loss_avg", ["token", "sample"])
def test_train_loop_with_kernels_follows_the_same_curve(tiny_tokenizer_dir, tmp_path, loss_avg):
    import json

    import numpy as np

    from steelworks.core.config import to_dict
    from steelworks.data.shards import ShardIndex, token_dtype, write_shard
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.config import OptimConfig, TrainConfig
    from steelworks.train.driver import run_training

    if not can_run(DEVICE)[0] or DEVICE.type != "cpu":  # the loop's device comes from its config
        pytest.skip(can_run(DEVICE)[1] or "a CPU run of the loop")
    vocab = len(load_tokenizer(tiny_tokenizer_dir))
    rows = np.random.default_rng(0).integers(0, vocab, size=(16, 33))
    mask = (np.arange(33)[None, :] % 5 != 0).astype(np.uint8).repeat(16, 0)  # some tokens masked out
    seg = np.where(np.arange(33) < 17, 1, 2)[None, :].repeat(16, 0)  # two packed samples per row
    dt = token_dtype(vocab)
    data = tmp_path / "shards"
    data.mkdir()
    ShardIndex(33, str(dt), vocab, 0, "sft", [write_shard(data / "s.bin", rows, dt, mask, seg)]).save(data)
    losses = {}
    for kernels in ([], ALL):
        cfg = TrainConfig(model=ModelConfig(size="tiny"), optim=OptimConfig(lr=1e-2, warmup_steps=1),
                          max_steps=2, micro_batch_size=2, num_workers=1, log_every=1, loss_avg=loss_avg,
                          kernels=kernels, tensorboard=False)
        out = tmp_path / ("on" if kernels else "off")
        job = {"task": "sft", "train": to_dict(cfg), "tokenizer_dir": str(tiny_tokenizer_dir),
               "data_dir": str(data), "out_dir": str(out)}
        summary = run_training(job, cfg, use_ray=False)
        assert summary["kernels"] == kernels
        losses[bool(kernels)] = [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="flash-attn runs on CUDA only (make gpu-check)")
def test_flash_attention_matches_sdpa_on_cuda(monkeypatch):
    """On the lent GPU: with flash-attn 2 installed, attention over packed rows goes through its
    varlen kernel; the loss and gradients match the SDPA path within bf16 noise."""
    from steelworks.train import model as model_mod

    if model_mod.flash_varlen() is None:
        pytest.skip("flash-attn is not installed on this machine")
    flash, sdpa = _pair("qwen2")
    ids, pos, labels, w = _batch()
    results = []
    for model, use_flash in ((flash, True), (sdpa, False)):
        if not use_flash:
            monkeypatch.setattr(model_mod, "flash_varlen", lambda: None)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, position_ids=pos, labels=labels, loss_weights=w)
        loss.backward()
        results.append((float(loss), model.model.layers[0].self_attn.q_proj.weight.grad))
    (a, ga), (b, gb) = results
    assert abs(a - b) < 2e-2 * abs(b)
    assert (ga - gb).abs().max() <= 5e-2 * gb.abs().max()
