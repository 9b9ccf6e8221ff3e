"""Fine-tuning an existing Hugging Face model (issue 17, point 1): ``sft.init_from`` names a
local Qwen2 or Llama directory made here with its own tokenizer; the run skips pretraining,
uses that tokenizer (and chat template), and its SFT model exports, evaluates and generates
like our own. A foreign tokenizer, a missing weight file or an unsupported architecture is an
error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from steelworks.core.config import ConfigError, load, to_dict
from steelworks.platform.settings import PipelineConfig

TINY = [  # the tiny pipeline of tests/test_pipeline.py, without a pretrain stage
    "data.demo.num_entities=12", "data.demo.pretrain_renderings=4",
    "data.demo.sft_questions_per_fact=1", "data.demo.sft_exam_per_fact=1",
    "data.demo.self_cognition_samples=8", "data.demo.dev_per_subject=1",
    "pack.seq_len=64", "pack.sft_seq_len=128", "sft.max_steps=10", "sft.micro_batch_size=4",
    "sft.num_workers=1", "sft.log_every=1", "sft.optim.warmup_steps=1", "sft.optim.lr=3e-3",
    "eval.max_items=6", "stages=[data,tokenizer,sft,eval]",
]


# The dpo stage after SFT (issue 17, point 3): the demo corpus's preference pairs, the
# reference's log-probs on 2 Ray Data replicas, 1 Ray Train worker; eval then scores dpo/hf.
DPO = ["stages=[data,tokenizer,sft,dpo,eval]", "dpo.max_steps=6", "dpo.micro_batch_size=4",
       "dpo.num_workers=1", "dpo.log_every=1", "dpo.optim.lr=1e-3", "dpo.optim.warmup_steps=1",
       "dpo.max_length=96", "dpo.reference_replicas=2", "dpo.reference_batch_size=4",
       "data.demo.preference_per_fact=1"]


def _base_model(arch: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random HF checkpoint of ``arch`` saved with its own tokenizer, the way a
    downloaded base model directory looks."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
              tie_word_embeddings=arch == "qwen2", pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(tmp_path: Path, base: Path, *extra: str) -> PipelineConfig:
    return load(PipelineConfig, None, [*TINY, f"runs_dir={tmp_path / 'runs'}", "run=ft",
                                       f"sft.init_from={base}", *extra])


@pytest.mark.ray
def test_sft_from_hf_base_models(tmp_path, tiny_tokenizer_dir, ray_local, monkeypatch):
    """Qwen2 through the whole pipeline (no pretrain stage); then a Llama base with the same
    tokenizer trained in one process on the shards that run built (the loop is the same).

    The base is named by a path relative to the working directory, as users write it: Ray
    Train's workers run elsewhere, so the stage must hand them an absolute path."""
    from transformers import AutoModelForCausalLM

    from steelworks.inference.engine import Engine
    from steelworks.inference.sampling import SamplingParams
    from steelworks.platform.pipeline import run_pipeline, run_sft
    from steelworks.train.driver import run_training

    base = _base_model("qwen2", tiny_tokenizer_dir, tmp_path / "base-qwen2")
    monkeypatch.chdir(tmp_path)
    results = run_pipeline(_cfg(tmp_path, Path("base-qwen2"), *DPO))
    assert list(results) == ["data", "tokenizer", "sft", "dpo", "eval"]  # no pretrain stage
    root = tmp_path / "runs" / "ft"
    _check_dpo(root, results)
    # The run's tokenizer is the base model's (same vocabulary file, same chat template).
    tok_dir = root / "tokenizer" / "tokenizer"
    assert (tok_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert set(json.loads((root / "sft" / "manifest.json").read_text())["inputs"]) == {"tokenizer"}
    _check_run(root / "sft", "qwen2", base)
    # Eval scored it, and the serving engine generates from it.
    report = json.loads((root / "eval" / "report.json").read_text())
    assert report["summary"]["n"] > 0 and report["summary"]["unscored"] == 0
    engine = Engine.from_dir(root / "sft" / "hf")
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "你是谁？"}],
                                                add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    out = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0.0))
    assert out.completion_tokens >= 1 and out.prompt_tokens == len(ids)
    assert AutoModelForCausalLM.from_pretrained(root / "sft" / "hf").config.model_type == "qwen2"

    llama = _base_model("llama", tiny_tokenizer_dir, tmp_path / "base-llama")
    cfg = _cfg(tmp_path, llama).sft
    cfg.tensorboard = False
    job = {"task": "sft", "train": to_dict(cfg), "tokenizer_dir": str(tok_dir),
           "data_dir": str(root / "tokenizer" / "shards" / "sft"), "out_dir": str(tmp_path / "llama"),
           "init_from": str(llama)}
    run_training(job, cfg, use_ray=False)
    _check_run(tmp_path / "llama", "llama", llama)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "llama" / "hf").config.model_type == "llama"

    # A broken base stops the SFT stage before any worker starts, naming the file.
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{broken}: no model.safetensors"):
        run_sft(_cfg(tmp_path, broken, "run=ft"), restart=True)
    assert (root / "sft" / "hf" / "config.json").exists()  # the finished stage is untouched


def _check_dpo(root: Path, results: dict) -> None:
    """The dpo stage started from sft/hf, stored reference log-probs equal to this process's
    computation of them, and the eval stage scored dpo/hf."""
    import numpy as np

    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.pairs import read_pairs
    from steelworks.train.reference import reference_logps

    metrics = results["dpo"]["metrics"]
    assert metrics["final_step"] == 6 and metrics["pairs"]["quarantined"] == 0
    assert metrics["pairs"]["pairs"] == 48  # 12 entities' facts, one pair each
    assert "rewards/accuracies" in metrics and "rewards/margins" in metrics
    assert set(json.loads((root / "dpo" / "manifest.json").read_text())["inputs"]) == {"tokenizer", "sft", "data"}
    assert set(json.loads((root / "eval" / "manifest.json").read_text())["inputs"]) == {"data", "dpo"}
    assert "dpo/hf" in json.loads((root / "eval" / "report.json").read_text())["summary"]["meta"]["model_dir"]
    cols = read_pairs(root / "dpo" / "pairs")
    pairs = [{"pair_id": i, **{k: cols[k][i] for k in ("chosen_ids", "chosen_mask", "rejected_ids",
                                                        "rejected_mask")}} for i in range(len(cols["pair_id"]))]
    pad = load_tokenizer(root / "tokenizer" / "tokenizer").pad_token_id
    chosen, rejected = reference_logps(root / "sft" / "hf", pairs, pad, use_ray=False)
    np.testing.assert_allclose(cols["ref_chosen"], chosen, atol=1e-4)
    np.testing.assert_allclose(cols["ref_rejected"], rejected, atol=1e-4)


def _check_run(out: Path, arch: str, base: Path) -> None:
    """The loss fell, and hf/ is the base's architecture and vocabulary."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.5, (arch, losses)
    exported = json.loads((out / "hf" / "config.json").read_text())
    original = json.loads((base / "config.json").read_text())
    assert exported["model_type"] == arch
    assert {k: exported[k] for k in ("hidden_size", "vocab_size", "num_hidden_layers")} == {
        k: original[k] for k in ("hidden_size", "vocab_size", "num_hidden_layers")}


def test_a_foreign_tokenizer_is_refused(tmp_path, tiny_tokenizer_dir):
    from steelworks.platform.pipeline import tokenizer_source

    base = _base_model("qwen2", tiny_tokenizer_dir, tmp_path / "base")
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_tokenizer_dir, other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["zzz-extra"] = len(vocab["model"]["vocab"]) + 1000
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    assert tokenizer_source(_cfg(tmp_path, base)) == str(base)
    # the same tokenizer files in another place agree
    assert tokenizer_source(_cfg(tmp_path, base, f"tokenizer.pretrained_dir={tiny_tokenizer_dir}"))
    with pytest.raises(ConfigError, match=r"different tokenizers.*tokenizer.pretrained_dir=.*other-tokenizer"
                                          r".*sft.init_from="):
        tokenizer_source(_cfg(tmp_path, base, f"tokenizer.pretrained_dir={other}"))


def test_base_model_errors_name_the_file(tmp_path, tiny_tokenizer_dir):
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.hf_io import check_base_model

    base = _base_model("llama", tiny_tokenizer_dir, tmp_path / "base")
    vocab = len(load_tokenizer(tiny_tokenizer_dir))
    assert check_base_model(base, vocab).arch == "llama"
    # a tokenizer with more ids than the model's embedding: not this model's tokenizer
    with pytest.raises(ValueError, match=rf"{base / 'config.json'}: vocab_size {vocab} is smaller "
                                         rf"than the tokenizer's {vocab + 100}"):
        check_base_model(base, vocab + 100)
    (base / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"{base}: no model.safetensors"):
        check_base_model(base, vocab)
    (tmp_path / "moved.safetensors").rename(base / "model.safetensors")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=rf"{base / 'config.json'}: model_type 'gpt2' is not supported"):
        check_base_model(base, vocab)
    (base / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{base / 'config.json'} is missing"):
        check_base_model(base, vocab)
