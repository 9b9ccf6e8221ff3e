"""QLoRA (``train.lora.quantize: 4bit``, train/quantize.py): the frozen base's projections in
NF4 through bitsandbytes (its CPU backend here), LoRA adapters in full precision on top.
The adapters alone train and are checkpointed, a killed run resumes with identical losses,
and ``hf/`` is the ORIGINAL full-precision base plus the scaled adapters, exactly. Without
bitsandbytes the stage says how to install it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_lora_train import _job, _safetensors, lora_data  # noqa: F401 (a fixture)
from test_train import _losses, _run_in_subprocess

from steelworks.core.config import ConfigError
from steelworks.core.faults import fault
from steelworks.train.driver import run_training
from steelworks.train.lora import PEFT_PREFIX, PROJECTIONS

QLORA = {"r": 4, "alpha": 8.0, "dropout": 0.1, "quantize": "4bit"}


@pytest.fixture(scope="module")
def qlora_run(lora_data, tmp_path_factory):  # noqa: F811 (the imported fixture)
    out = tmp_path_factory.mktemp("qlora_run")
    job, cfg = _job(lora_data, out, ckpt_every=4, lora=dict(QLORA))
    return out, run_training(job, cfg, use_ray=False)


def test_the_base_is_4bit_and_only_the_adapters_get_gradients(lora_data):  # noqa: F811
    from bitsandbytes.nn import Linear4bit, Params4bit
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from steelworks.train.hf_io import from_hf
    from steelworks.train.lora import LoraConfig, apply_lora
    from steelworks.train.quantize import quantize_base, quantized_params

    full = from_hf(lora_data["base"])
    model = from_hf(lora_data["base"])
    assert quantize_base(model, torch.device("cpu"), torch.float32) == 2 * len(PROJECTIONS)
    apply_lora(model, LoraConfig(r=4, alpha=8.0))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(layers) == 2 * len(PROJECTIONS)
    assert all(isinstance(m.base_layer, Linear4bit) for m in layers)
    assert len(quantized_params(model)) == 2 * len(PROJECTIONS)
    assert all(isinstance(p, Params4bit) and p.dtype == torch.uint8 and not p.requires_grad
               for p in quantized_params(model))
    # Embeddings, norms and the (tied) head stay full precision.
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, full.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(ids), model(ids)
    # NF4 keeps the model close to the base (a wrong layout or lost scales would not be)
    assert np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] > 0.95
    model(ids, labels=ids.clone()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got and got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in got)


def test_qlora_sft_trains_and_exports_the_full_precision_base_plus_adapters(lora_data, qlora_run):  # noqa: F811
    out, summary = qlora_run
    losses = _losses(out)
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    assert 0 < summary["trainable_params"] < summary["params"] / 4, summary
    hf, base = _safetensors(out / "hf"), _safetensors(lora_data["base"])
    adapter = _safetensors(out / "adapter")
    scaling = QLORA["alpha"] / QLORA["r"]
    for layer in range(2):
        for proj in PROJECTIONS:
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{part}.{proj}"
            a = adapter[f"{PEFT_PREFIX}{name}.lora_A.weight"]
            b = adapter[f"{PEFT_PREFIX}{name}.lora_B.weight"]
            want = base[f"{name}.weight"] + scaling * (b @ a)
            assert torch.allclose(hf[f"{name}.weight"], want, atol=1e-6), name
    assert torch.equal(hf["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_qlora_checkpoints_hold_the_adapters_only(qlora_run):
    import json

    out, _ = qlora_run
    meta = out / "checkpoints" / "step_00000012" / ".metadata"
    assert meta.exists()
    from torch.distributed.checkpoint import FileSystemReader

    keys = list(FileSystemReader(str(meta.parent)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys[:5]
    assert not [k for k in keys if "absmax" in k or "quant" in k or "base_layer" in k]
    assert json.loads((out / "summary.json").read_text())["final_step"] == 12


@pytest.mark.faults  # kills a process: make test-faults
def test_qlora_kill_and_resume_gives_identical_losses(lora_data, qlora_run, tmp_path):  # noqa: F811
    """Killed after step 6, resumed from step 4 in a fresh process: the base is read and
    quantized again (deterministic), the adapters and Adam state come from the checkpoint."""
    straight, _ = qlora_run
    broken = tmp_path / "broken"
    job, _ = _job(lora_data, broken, ckpt_every=4, lora=dict(QLORA))
    code = _run_in_subprocess({**job, "faults": [fault("train.step", str(tmp_path / "m"), step=6)]})
    assert code == 17 and (broken / "checkpoints" / "step_00000004").is_dir()
    assert _run_in_subprocess(job) == 0
    assert _losses(broken) == _losses(straight)


def test_without_bitsandbytes_qlora_says_how_to_install_it(lora_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    job, cfg = _job(lora_data, tmp_path / "out", lora=dict(QLORA))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*pip install -e '\.\[qlora\]'"):
        run_training(job, cfg, use_ray=False)
