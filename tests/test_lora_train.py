"""LoRA as a config option of the train stages (``train.lora``; train/loop.py, checkpoint.py):
an SFT run from ``init_from`` trains adapters only, its checkpoints hold only them, it
resumes exactly after a kill, and it exports ``hf/`` merged (W + (alpha/r)·B·A, opened by
transformers) and ``adapter/`` (opened by peft on the base). Config errors are clear: LoRA
without a base, bad fields. The resume guard refuses a changed rank. QLoRA: tests/test_qlora.py.
One process, no Ray, except the 2-worker FSDP2 parity test at the end (marked ``ray``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import _losses, _run_in_subprocess, _write_sft

from steelworks.core.config import ConfigError, from_dict, load, to_dict
from steelworks.core.faults import fault
from steelworks.data.tokenizer import load_tokenizer
from steelworks.train.config import LoraTrainConfig, TrainConfig
from steelworks.train.driver import run_training
from steelworks.train.lora import PEFT_PREFIX, PROJECTIONS

QUESTIONS = ["北京是哪里？", "你好", "上海是什么？", "你是谁？", "What is a fox?", "Say hello.",
             "def add?", "答案是什么？"]
ANSWERS = ["北京是中国的首都。", "你好，世界！", "上海是一座大城市。", "我是一个语言模型。",
           "The quick brown fox.", "Hello world!", "return a + b", "答案是A。"]
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1}  # dropout: resume must restore its RNG too
ADAPTERS = 2 * len(PROJECTIONS) * 2  # lora_A and lora_B x 7 projections x 2 layers


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random Qwen2 (tied head, weights shaken so that a merge error would show) saved
    as the HF directory runs start from, and SFT shards of short conversations."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from steelworks.data.sft import encode_conversation

    root = tmp_path_factory.mktemp("lora_train")
    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    samples = []
    for i in range(24):
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[(i * 3) % len(ANSWERS)]
        ids, mask, cut = encode_conversation(tok, [{"role": "user", "content": q},
                                                   {"role": "assistant", "content": a}], 64, pad=False)
        assert not cut
        samples.append((ids, mask))
    _write_sft(root / "sft", tok, samples, packed=False, seq_len=64)
    return {"root": root, "base": root / "base", "data": root / "sft", "tokenizer": tiny_tokenizer_dir}


def _job(data, out: Path, init: bool = True, **train) -> tuple[dict, TrainConfig]:
    fields = dict(max_steps=12, micro_batch_size=4, num_workers=1, log_every=1, seed=3,
                  optim={"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.0}, tensorboard=False,
                  lora=dict(LORA))
    fields.update(train)
    cfg = from_dict(TrainConfig, fields)
    job = {"task": "sft", "train": to_dict(cfg), "tokenizer_dir": str(data["tokenizer"]),
           "data_dir": str(data["data"]), "out_dir": str(out),
           "init_from": str(data["base"]) if init else None}
    return job, cfg


@pytest.fixture(scope="module")
def lora_run(lora_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    job, cfg = _job(lora_data, out, ckpt_every=4)
    return out, run_training(job, cfg, use_ray=False)


def test_lora_sft_trains_the_adapters_only_and_the_loss_falls(lora_run):
    out, summary = lora_run
    losses = _losses(out)
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    assert summary["final_step"] == 12
    # A, B per projection: r * (in + out) each; everything else is frozen
    assert 0 < summary["trainable_params"] < summary["params"] / 4, summary


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_hf_is_the_base_plus_scaled_b_a_of_the_saved_adapter(lora_data, lora_run):
    out, _ = lora_run
    base, merged = _safetensors(lora_data["base"]), _safetensors(out / "hf")
    adapter = _safetensors(out / "adapter")
    assert len(adapter) == ADAPTERS
    scaling = LORA["alpha"] / LORA["r"]
    changed = 0
    for name, w in base.items():
        module = name.removesuffix(".weight")
        a_key = f"{PEFT_PREFIX}{module}.lora_A.weight"
        if a_key in adapter:
            b = adapter[f"{PEFT_PREFIX}{module}.lora_B.weight"]
            assert b.abs().max() > 0, f"{module}: B never trained"
            expected = w + scaling * (b @ adapter[a_key])
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
            changed += 1
        else:  # embeddings, norms, biases: frozen, so bit for bit the base
            assert torch.equal(merged[name], w), name
    assert changed == 2 * len(PROJECTIONS)
    assert set(merged) == set(base)


def test_adapter_opens_with_peft_and_gives_the_logits_of_hf(lora_data, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == LORA["r"] and config["lora_alpha"] == LORA["alpha"]
    assert Path(config["base_model_name_or_path"]) == lora_data["base"].resolve()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(lora_data["base"]))
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = merged(ids).logits, peft_model(ids).logits
    assert (a - b).abs().max() < 1e-5


def test_checkpoints_hold_the_adapters_and_their_optimizer_state_only(lora_run):
    from torch.distributed.checkpoint import FileSystemReader

    out, _ = lora_run
    ckpt = out / "checkpoints" / "step_00000012"
    keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    state_keys = [k for k in keys if k.startswith("optim.state.")]
    assert len(model_keys) == ADAPTERS, model_keys
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in model_keys), model_keys
    assert state_keys and all(".lora_A.default." in k or ".lora_B.default." in k for k in state_keys)
    params = {k.removeprefix("model.") for k in model_keys}
    assert {k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in state_keys} == params
    assert not [k for k in keys if "base_layer" in k or "embed_tokens" in k or "lm_head" in k]


@pytest.mark.faults  # kills a process: make test-faults
def test_kill_and_resume_gives_identical_losses(lora_data, lora_run, tmp_path):
    """Killed (hard, no cleanup) right after step 6 and resumed from the step-4 checkpoint in
    a fresh process, as a restarted worker would: the base is read from init_from again,
    adapters, Adam state and the dropout RNG from the checkpoint; every loss equals the
    uninterrupted run's (made in this process, after other tests) bit for bit."""
    straight, _ = lora_run
    broken = tmp_path / "broken"
    job, _ = _job(lora_data, broken, ckpt_every=4)
    code = _run_in_subprocess({**job, "faults": [fault("train.step", str(tmp_path / "m"), step=6)]})
    assert code == 17 and (broken / "checkpoints" / "step_00000004").is_dir()
    assert not (broken / "checkpoints" / "step_00000008").exists()
    assert _run_in_subprocess(job) == 0
    assert _losses(broken) == _losses(straight)
    assert _safetensors(broken / "adapter").keys() == _safetensors(straight / "adapter").keys()
    for k, v in _safetensors(straight / "adapter").items():
        assert torch.equal(_safetensors(broken / "adapter")[k], v), k


def test_hf_is_a_plain_transformers_model(lora_run):
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())


def test_lora_without_a_base_model_is_a_clear_error(lora_data, tmp_path):
    job, cfg = _job(lora_data, tmp_path, init=False, model={"size": "tiny"})
    with pytest.raises(ConfigError, match="starts from scratch \\(no init_from\\)"):
        run_training(job, cfg, use_ray=False)


@pytest.mark.parametrize("lora, message", [
    ({"r": 0}, "lora.r must be an integer >= 1"),
    ({"r": 2.5}, "lora.r: expected int"),
    ({"alpha": -1}, "lora.alpha must be a number > 0"),
    ({"dropout": 1.5}, "lora.dropout must be a number in"),
    ({"target_modules": ["lm_head"]}, "'lm_head' matches no linear layer"),
    ({"target_modules": "q_proj"}, "lora.target_modules: expected a list"),
    ({"rank": 8}, "unknown key lora.rank; valid keys under lora: alpha, dropout, quantize, r, "
                  "save_adapter, target_modules"),
    ({"quantize": "8bit"}, "lora.quantize must be '4bit' (QLoRA) or null, got '8bit'"),
])
def test_bad_lora_fields_are_errors_naming_them(lora, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(TrainConfig, {"lora": lora})


def test_lora_from_yaml_and_set_overrides(tmp_path):
    from steelworks.platform.settings import PipelineConfig

    assert load(PipelineConfig).sft.lora is None  # full fine-tuning by default
    cfg = load(PipelineConfig, None, ["sft.lora.r=8"])  # enables it: the other fields default
    assert cfg.sft.lora == LoraTrainConfig(r=8) and cfg.pretrain.lora is None
    cfg = load(PipelineConfig, None, ["sft.lora={r: 16, alpha: 32, dropout: 0.05}",
                                      "sft.lora.target_modules=[q_proj, v_proj]"])
    assert (cfg.sft.lora.r, cfg.sft.lora.alpha, cfg.sft.lora.dropout) == (16, 32.0, 0.05)
    assert cfg.sft.lora.target_modules == ["q_proj", "v_proj"] and cfg.sft.lora.save_adapter
    path = tmp_path / "run.yaml"
    path.write_text("sft:\n  lora: {r: 16, alpha: 32, dropout: 0.05, save_adapter: false}\n")
    assert load(PipelineConfig, path).sft.lora.save_adapter is False
    assert load(PipelineConfig, path, ["sft.lora=null"]).sft.lora is None
    with pytest.raises(ConfigError, match="lora: lora.r must be an integer >= 1"):
        load(PipelineConfig, None, ["sft.lora.r=0"])


def test_pipeline_refuses_lora_on_pretraining(tmp_path):
    from steelworks.platform.pipeline import run_pretrain
    from steelworks.platform.settings import PipelineConfig

    cfg = load(PipelineConfig, None, [f"runs_dir={tmp_path}", "pretrain.lora.r=8"])
    with pytest.raises(ConfigError, match="pretrain.lora is set, but pretraining starts from scratch"):
        run_pretrain(cfg)
    assert not (tmp_path / "demo" / "pretrain").exists(), "refused before the stage was opened"


def test_changed_rank_is_refused_by_the_resume_guard(tmp_path):
    """The resume key holds every lora field (train/resume.py): a new rank has different
    adapter shapes, and other fields change the maths; the checkpoints stay."""
    from steelworks.core.rundir import Stage
    from steelworks.platform.pipeline import _settle_resume
    from steelworks.train.resume import ResumeConflict, conflicts, make_key

    def key(**lora):
        return make_key(to_dict(from_dict(TrainConfig, {"lora": {**LORA, **lora}})), {}, "0")

    assert conflicts(key(), key()) == []
    assert [c.field for c in conflicts(key(), key(r=8))] == ["lora.r"]
    assert [str(c) for c in conflicts(key(), key(alpha=4.0))] == ["lora.alpha: 8.0 -> 4.0"]
    full = make_key(to_dict(TrainConfig()), {}, "0")  # full fine-tuning -> LoRA: refused too
    assert "lora.r" in [c.field for c in conflicts(full, key())]

    def settle(**lora):
        tcfg = from_dict(TrainConfig, {"lora": {**LORA, **lora}})
        stage = Stage.open(tmp_path / "runs", "r", "sft", to_dict(tcfg))
        _settle_resume(stage, "sft", tcfg, restart=False)
        return stage

    stage = settle()  # no checkpoints yet: writes the key
    ckpt = stage.dir / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 4}))
    settle()  # same config: resumes
    with pytest.raises(ResumeConflict, match=r"lora\.r: 4 -> 8"):
        settle(r=8)
    assert ckpt.is_dir(), "nothing deleted"


# ---- Ray Train: 2 FSDP2 workers ----------------------------------------------------------


@pytest.mark.ray
def test_ray_two_workers_with_lora_match_one_process(lora_data, tmp_path, ray_local):
    """2 Ray Train workers (FSDP2 over gloo, adapters sharded with the frozen base) follow the
    loss curve of one process on the same global batch (no dropout: its random draws differ
    with the split), and export the same merged model and adapter."""
    one = tmp_path / "one"
    # 6 steps, one mid-run checkpoint: enough to compare curves; Ray's start is most of the cost.
    job, cfg = _job(lora_data, one, max_steps=6, micro_batch_size=4, ckpt_every=3,
                    lora={**LORA, "dropout": 0.0})
    run_training(job, cfg, use_ray=False)
    two = tmp_path / "two"
    job, cfg = _job(lora_data, two, max_steps=6, micro_batch_size=2, num_workers=2, ckpt_every=3,
                    lora={**LORA, "dropout": 0.0})
    summary = run_training(job, cfg, use_ray=True)
    assert summary["final_step"] == 6 and summary["world_size"] == 2
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-4)
    for sub in ("hf", "adapter"):
        a, b = _safetensors(one / sub), _safetensors(two / sub)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-3, (sub, worst)
