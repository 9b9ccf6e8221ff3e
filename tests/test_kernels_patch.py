"""A tiny Qwen2/Llama patched with every fused kernel computes the same loss and gradients as
the unpatched model, and the train loop runs with them (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from steelworks.kernels.patch import loss_targets, patch_model  # noqa: E402
from steelworks.kernels.runtime import can_run  # noqa: E402
from steelworks.train.config import ModelConfig  # noqa: E402
from steelworks.train.models import build_hf_config, build_model  # noqa: E402

pytestmark = pytest.mark.kernels
DEVICE = torch.device("cpu")


def _pair(arch: str):
    hf = build_hf_config(ModelConfig(arch=arch, size="tiny", hidden_size=48, num_heads=4, num_kv_heads=2,
                                     intermediate_size=100), 300, 0, 1)
    a, b = build_model(hf, seed=0), build_model(hf, seed=0)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_patched_model_matches_loss_and_gradients(arch):
    if not can_run(DEVICE)[0]:
        pytest.skip(can_run(DEVICE)[1])
    ref, fused = _pair(arch)
    applied = patch_model(fused, ["rmsnorm", "rope", "swiglu", "ce"], DEVICE)
    assert applied == ["rmsnorm", "rope", "swiglu", "ce"]
    torch.manual_seed(1)
    ids = torch.randint(2, 300, (2, 11))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]] * 2)  # packed rows: positions restart
    labels = torch.randint(0, 300, (2, 11))
    labels[0, :3] = -100
    weights = (labels != -100).float() / (labels != -100).sum()

    logits = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), labels.reshape(-1), reduction="none")
    expected = (ce * weights.reshape(-1)).sum()
    expected.backward()
    with loss_targets(fused, labels, weights):
        got = fused(input_ids=ids, position_ids=pos, use_cache=False).logits.sum()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # outside loss_targets the patched model still returns ordinary logits
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids, position_ids=pos, use_cache=False).logits,
                                   ref(input_ids=ids, position_ids=pos, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)


def test_patch_touches_only_the_patched_instance(monkeypatch):
    """Another model of the same class, in the same process, keeps HF's own RoPE (a global
    patch would put evaluation and serving models on the kernels, or the CPU interpreter)."""
    import importlib

    from steelworks.kernels import rope

    if not can_run(DEVICE)[0]:
        pytest.skip(can_run(DEVICE)[1])
    other, fused = _pair("qwen2")
    modeling = importlib.import_module(type(other).__module__)
    hf_rope = modeling.apply_rotary_pos_emb
    patch_model(fused, ["rope"], DEVICE)
    assert modeling.apply_rotary_pos_emb is hf_rope
    calls = []
    monkeypatch.setattr(rope, "apply_rope", lambda *a: calls.append(1) or rope.apply_rope_reference(*a))
    ids = torch.randint(2, 300, (1, 7))
    with torch.no_grad():
        other(input_ids=ids, use_cache=False)
        assert calls == []  # the unpatched instance never reached the kernel
        fused(input_ids=ids, use_cache=False)
    assert len(calls) == len(fused.model.layers)


def test_unknown_kernel_and_unsupported_device_are_explained(caplog, monkeypatch):
    model, _ = _pair("qwen2")
    with pytest.raises(ValueError, match="unknown kernels"):
        patch_model(model, ["flash"], DEVICE)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with caplog.at_level("WARNING"):
        assert patch_model(model, ["rmsnorm"], DEVICE) == []
    assert "need a CUDA device" in caplog.text


@pytest.mark.parametrize("loss_avg", ["token", "sample"])
def test_train_loop_with_kernels_follows_the_same_curve(tiny_tokenizer_dir, tmp_path, loss_avg):
    import json

    import numpy as np

    from steelworks.data.shards import ShardIndex, token_dtype, write_shard
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.platform.config import to_dict
    from steelworks.train.config import OptimConfig, TrainConfig
    from steelworks.train.driver import run_training

    if not can_run(DEVICE)[0]:
        pytest.skip(can_run(DEVICE)[1])
    vocab = len(load_tokenizer(tiny_tokenizer_dir))
    rows = np.random.default_rng(0).integers(0, vocab, size=(16, 33))
    mask = (np.arange(33)[None, :] % 5 != 0).astype(np.uint8).repeat(16, 0)  # some tokens masked out
    seg = np.where(np.arange(33) < 17, 1, 2)[None, :].repeat(16, 0)  # two packed samples per row
    dt = token_dtype(vocab)
    data = tmp_path / "shards"
    data.mkdir()
    ShardIndex(33, str(dt), vocab, 0, "sft", [write_shard(data / "s.bin", rows, dt, mask, seg)]).save(data)
    losses = {}
    for kernels in ([], ["rmsnorm", "rope", "swiglu", "ce"]):
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
