"""LoRA on our decoder (train/lora.py), on tiny Qwen2 and Llama models made here, in fp32:
only adapters train and a fresh adapter changes nothing; the merged weights are
W + (alpha/r)·B·A and run as the adapted model does (our loader, to_hf + transformers); the
saved adapter opens with peft's PeftModel on the transformers model and with load_adapter;
bad configs are errors naming the field; FSDP2 shards a model with adapters."""

from __future__ import annotations

import socket

import pytest
import torch

from steelworks.train.hf_io import from_hf, to_hf
from steelworks.train.lora import (
    PEFT_PREFIX,
    PROJECTIONS,
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    is_adapter_param,
    load_adapter,
    merged_state_dict,
    save_adapter,
)
from steelworks.train.model import build_decoder

VOCAB = 64
ARCHS = ["qwen2", "llama"]


def _hf_dir(arch: str, tmp_path):
    """A tiny random HF model saved as a standard directory (biases made non-zero, so a
    bias lost under ``base_layer`` would show)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    extra = {} if arch == "qwen2" else {"attention_bias": True, "tie_word_embeddings": False}
    cfg = cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    out = tmp_path / f"hf-{arch}"
    model.save_pretrained(out)
    return out


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _train(model, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on the adapters, so B is no longer zero."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = _ids(10 + step)
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def _adapted(arch: str, tmp_path, cfg: LoraConfig | None = None):
    base_dir = _hf_dir(arch, tmp_path)
    cfg = cfg or LoraConfig(r=4, alpha=8.0)
    torch.manual_seed(1)
    model = apply_lora(from_hf(base_dir), cfg)
    _train(model)
    return base_dir, model.eval(), cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapters_get_gradients_and_a_fresh_adapter_changes_nothing(arch, tmp_path):
    base_dir = _hf_dir(arch, tmp_path)
    ids = _ids()
    with torch.no_grad():
        ref = from_hf(base_dir).eval()(ids)
    model = apply_lora(from_hf(base_dir), LoraConfig())
    names = [n for n, _ in model.named_parameters()]
    assert sum(is_adapter_param(n) for n in names) == 2 * len(PROJECTIONS) * 2  # A, B x 7 x layers
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in names  # peft's renaming
    out = model(ids)
    assert torch.equal(out, ref)  # B starts at zero: exactly the base model
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_weights_are_base_plus_scaled_BA_and_run_as_the_adapted_model(arch, tmp_path):
    base_dir, model, cfg = _adapted(arch, tmp_path)
    base = from_hf(base_dir)
    merged = merged_state_dict(model)
    assert set(merged) == set(base.state_dict())  # plain HF names, nothing of peft's left
    params = dict(model.named_parameters())
    for name, w in base.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight" and module.rsplit(".", 1)[-1] in cfg.target_modules:
            a, b = params[f"{module}.lora_A.default.weight"], params[f"{module}.lora_B.default.weight"]
            assert b.abs().max() > 0, module  # trained: the check below is not vacuous
            expected = w + (cfg.alpha / cfg.r) * (b @ a)
            assert (merged[name] - expected).abs().max() < 1e-6, name
        else:
            assert torch.equal(merged[name], w), name  # biases, norms, embeddings untouched
    plain = build_decoder(base.config)
    plain.load_state_dict(merged)
    plain.tie_weights()
    ids = _ids()
    with torch.no_grad():
        assert (plain.eval()(ids) - model(ids)).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_to_hf_of_merged_weights_opens_in_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    _, model, _ = _adapted(arch, tmp_path)
    out = to_hf(merged_state_dict(model), model.config, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
        assert (hf(ids).logits - ours).abs().max() < 1e-5
        assert (from_hf(out).eval()(ids) - ours).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_adapter_opens_with_peft_and_load_adapter(arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, model, cfg = _adapted(arch, tmp_path)
    state = adapter_state_dict(model)
    assert len(state) == 2 * len(cfg.target_modules) * 2
    assert all(k.startswith(PEFT_PREFIX) and ".default." not in k for k in state)
    out = save_adapter(model, cfg, tmp_path / "adapter", base_dir)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    save_adapter(model, cfg, out, base_dir)  # an earlier adapter is replaced
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
        assert (peft_model(input_ids=ids).logits - ours).abs().max() < 1e-5
        loaded, loaded_cfg = load_adapter(from_hf(base_dir), out)
        assert loaded_cfg == cfg
        assert torch.equal(loaded.eval()(ids), ours)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_save_adapter_refuses_a_directory_it_did_not_write(tmp_path):
    base_dir, model, cfg = _adapted("qwen2", tmp_path)
    with pytest.raises(ValueError, match="not an adapter directory"):
        save_adapter(model, cfg, base_dir, base_dir)
    assert (base_dir / "model.safetensors").exists()


@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "lora.r"), ({"r": -2}, "lora.r"), ({"r": 2.5}, "lora.r"),
    ({"alpha": 0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
    ({"target_modules": []}, "lora.target_modules"),
    ({"target_modules": "q_proj"}, "lora.target_modules"),
    ({"target_modules": ["q_proj", "qproj"]}, "'qproj'"),
    ({"target_modules": ["lm_head"]}, "'lm_head'"),
    ({"target_modules": ["q_proj", "q_proj"]}, "twice"),
])
def test_bad_config_is_an_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)


def test_target_that_matches_no_module_of_the_model_is_named(tmp_path):
    class Tiny(torch.nn.Module):  # a model without an MLP: down_proj etc. match nothing
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="'k_proj'.*matches no linear layer"):
        apply_lora(Tiny(), LoraConfig())
    model = apply_lora(from_hf(_hf_dir("qwen2", tmp_path)), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_shards_a_model_with_adapters_and_trains_only_them(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model = apply_lora(from_hf(_hf_dir("qwen2", tmp_path)), LoraConfig(r=4, alpha=8.0))
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # mixed requires_grad in one FSDP2 group: frozen W, trainable A, B
        before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
        _train(model, steps=2)  # two: A's first gradient is zero (B starts at zero)
        for name, p in model.named_parameters():
            changed = not torch.equal(before[name], p.detach().full_tensor())
            assert changed == is_adapter_param(name), name
        merged = merged_state_dict(model)  # gathers the DTensor shards
        assert not any(".base_layer." in k or is_adapter_param(k) for k in merged)
        assert len(adapter_state_dict(model)) == 2 * len(PROJECTIONS) * 2
    finally:
        dist.destroy_process_group()
