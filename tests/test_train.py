"""The training loop on a tiny model, one process (CPU): learning, exact resume, crashes
mid-save, appended data, HF export, SFT masking and packing. The Ray Train path (2 FSDP2
workers, a killed worker) is in test_train_ray.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steelworks.core.faults import fault
from steelworks.data.shards import ShardIndex, token_dtype, write_shard
from steelworks.data.tokenizer import load_tokenizer
from steelworks.train.config import TrainConfig
from steelworks.train.data import Batch
from steelworks.train.driver import run_training

SEQ = 48


def _pretrain_shards(tok_dir: Path, texts: list[str], out: Path, shards: int = 2) -> None:
    import pandas as pd

    from steelworks.data.pack import pack_documents

    rows = np.stack(list(pack_documents(pd.DataFrame({"text": texts}), str(tok_dir), SEQ)["tokens"]))
    tok = load_tokenizer(tok_dir)
    dt = token_dtype(len(tok))
    out.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(rows, shards)
    infos = [write_shard(out / f"shard_{i:05d}.bin", p, dt) for i, p in enumerate(parts)]
    ShardIndex(SEQ, str(dt), len(tok), tok.pad_token_id, "pretrain", infos).save(out)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo world's pretraining text, a tokenizer trained on it, and two shard sets:
    ``base`` and ``more`` (disjoint documents, for appending)."""
    from steelworks.data.config import DemoCorpusConfig
    from steelworks.data.demo_corpus import generate
    from steelworks.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("train_data")
    generate(DemoCorpusConfig(num_entities=12, pretrain_renderings=4, pretrain_qa_renderings=4, filler_probability=0.0), root / "corpus")
    docs = [json.loads(line) for line in (root / "corpus" / "pretrain.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (root / "corpus" / "sft.jsonl").read_text().splitlines()]
    texts = [d["text"] for d in docs]
    train_tokenizer(texts, vocab_size=600, out_dir=root / "tokenizer", min_frequency=2)
    tok = load_tokenizer(root / "tokenizer")
    cut = int(len(texts) * 0.8)
    _pretrain_shards(root / "tokenizer", texts[:cut], root / "base")
    _pretrain_shards(root / "tokenizer", texts[cut:], root / "more", shards=1)
    return {"root": root, "tok": tok, "tokenizer": root / "tokenizer", "sft": sft}


def _job(data, out: Path, data_dir: Path | None = None, **train) -> tuple[dict, TrainConfig]:
    from steelworks.core.config import to_dict

    fields = dict(max_steps=12, micro_batch_size=4, num_workers=1, log_every=1, seed=3,
                  model={"size": "tiny"}, optim={"lr": 1e-2, "warmup_steps": 2}, tensorboard=False)
    fields.update(train)
    cfg = TrainConfig(**{k: v for k, v in fields.items() if k not in ("model", "optim")})
    from steelworks.core.config import from_dict

    cfg = from_dict(TrainConfig, {**to_dict(cfg), "model": fields["model"], "optim": fields["optim"]})
    job = {"task": "pretrain", "train": to_dict(cfg), "tokenizer_dir": str(data["tokenizer"]),
           "data_dir": str(data_dir or data["root"] / "base"), "out_dir": str(out)}
    return job, cfg


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "one row per step, in order"
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def straight_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    job, cfg = _job(demo_data, out, ckpt_every=4, tensorboard=True)
    summary = run_training(job, cfg, use_ray=False)
    return out, summary


def test_loss_falls_and_metrics_are_recorded(straight_run):
    out, summary = straight_run
    losses = _losses(out)
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["grad_norm"] > 0 and row["lr"] > 0
    assert 0.05 < row["memory_gb"] < 20
    assert summary["final_step"] == 12 and summary["params"] > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    # keep_last=2: only the two newest complete checkpoints remain
    # keep_last=2 pruned the rest; .lock is the run lock (checkpoint.run_lock)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        [".lock", "step_00000008", "step_00000012"]


def test_stop_and_resume_gives_identical_losses(demo_data, tmp_path):
    straight = tmp_path / "straight"
    job, cfg = _job(demo_data, straight, ckpt_every=4)
    run_training(job, cfg, use_ray=False)
    # Interrupted: the same run killed (hard, no cleanup) right after step 6, resumed from
    # the checkpoint at step 4.
    broken = tmp_path / "broken"
    job, cfg = _job(demo_data, broken, ckpt_every=4)
    code = _run_in_subprocess({**job, "faults": [fault("train.step", str(tmp_path / "m1"), step=6)]})
    assert code == 17 and (broken / "checkpoints" / "step_00000004").is_dir()
    run_training(job, cfg, use_ray=False)
    a, b = _losses(straight), _losses(broken)
    assert a == b, "losses after resuming must equal the uninterrupted run's bit for bit"


@pytest.mark.faults  # kills a process: make test-faults
def test_crash_mid_save_leaves_the_previous_checkpoint(demo_data, tmp_path):
    from steelworks.train.checkpoint import latest_checkpoint

    job, cfg = _job(demo_data, tmp_path, ckpt_every=4)
    code = _run_in_subprocess({**job, "faults": [fault("train.save", str(tmp_path / "m"), step=8)]})
    assert code == 17
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step_00000008.tmp").is_dir(), "the crash happened mid-save"
    assert latest_checkpoint(ckpts).name == "step_00000004"
    summary = run_training(job, cfg, use_ray=False)  # resumes from step 4 and finishes
    assert summary["final_step"] == 12
    assert not (ckpts / "step_00000008.tmp").exists() and (ckpts / "step_00000012").is_dir()


@pytest.mark.faults  # kills a process: make test-faults
def test_async_save_killed_in_flight_resumes_from_the_previous_checkpoint(demo_data, tmp_path):
    """Checkpoints written in the background (train.async_checkpoint; the default on CUDA): a
    run killed while the step-8 save is being written resumes from step 4, and its losses
    equal an uninterrupted run's."""
    from steelworks.train.checkpoint import latest_checkpoint

    straight = tmp_path / "straight"
    job, cfg = _job(demo_data, straight, ckpt_every=4, async_checkpoint=True)
    run_training(job, cfg, use_ray=False)
    broken = tmp_path / "broken"
    job, cfg = _job(demo_data, broken, ckpt_every=4, async_checkpoint=True)
    armed = [fault("train.save_inflight", str(tmp_path / "m"), step=8)]
    assert _run_in_subprocess({**job, "faults": armed}) == 17
    ckpts = broken / "checkpoints"
    assert (ckpts / "step_00000008.tmp").is_dir() and not (ckpts / "step_00000008").exists()
    assert latest_checkpoint(ckpts).name == "step_00000004"
    run_training(job, cfg, use_ray=False)
    assert _losses(broken) == _losses(straight)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000008", "step_00000012"]


def _run_in_subprocess(job: dict) -> int:
    """Run the loop as its own process (as torchrun would) so a fault kills only it."""
    path = Path(job["out_dir"]) / "job.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job))
    return subprocess.run([sys.executable, "-m", "steelworks.train.loop", str(path)],
                          capture_output=True).returncode


def test_appended_data_is_trained_on(demo_data, tmp_path):
    job, cfg = _job(demo_data, tmp_path, max_steps=4)
    run_training(job, cfg, use_ray=False)
    job, cfg = _job(demo_data, tmp_path, max_steps=8, extra_data=[str(demo_data["root"] / "more")])
    run_training(job, cfg, use_ray=False)
    meta = json.loads((tmp_path / "checkpoints" / "step_00000008" / "meta.json").read_text())
    loader = meta["loader"]
    assert loader["appends"] == [{"cursor": 16, "known": loader["appends"][0]["known"]}]
    assert any("more" in s["file"] for s in loader["shards"])
    # a copy of a shard already trained on is refused, naming both files
    dup = tmp_path / "dup"
    dup.mkdir()
    for f in (demo_data["root"] / "more").iterdir():
        (dup / f.name).write_bytes(f.read_bytes())
    job, cfg = _job(demo_data, tmp_path, max_steps=9, extra_data=[str(demo_data["root"] / "more"), str(dup)])
    with pytest.raises(ValueError, match="same content"):
        run_training(job, cfg, use_ray=False)


def test_exported_model_loads_in_transformers_and_generates(straight_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = straight_run
    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    tok = AutoTokenizer.from_pretrained(str(out / "hf"))
    ids = tok("北京", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    # the export holds the trained weights, not a fresh init
    from safetensors.torch import load_file

    weights = load_file(str(out / "hf" / "model.safetensors"))
    assert torch.equal(model.model.norm.weight, weights["model.norm.weight"])
    assert not torch.allclose(weights["model.norm.weight"], torch.ones_like(weights["model.norm.weight"]))


def test_meta_init_is_the_same_for_any_sharding(demo_data):
    """Per-parameter seeded init: the weights do not depend on how they were materialized."""
    from steelworks.train.config import ModelConfig
    from steelworks.train.model import build_decoder
    from steelworks.train.models import decoder_config
    from steelworks.train.parallelize import materialize

    tok = demo_data["tok"]
    cfg = decoder_config(ModelConfig(size="tiny"), len(tok), tok.pad_token_id, tok.eos_token_id)
    a = materialize(build_decoder(cfg, "meta"), torch.device("cpu"), seed=1)
    b = materialize(build_decoder(cfg, "meta"), torch.device("cpu"), seed=1)
    c = materialize(build_decoder(cfg, "meta"), torch.device("cpu"), seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    emb = sa["model.embed_tokens.weight"]
    assert abs(float(emb.std()) - 0.02) < 0.002 and torch.equal(sa["model.norm.weight"], torch.ones(64))
    assert a.lm_head.weight is a.model.embed_tokens.weight, "tied embeddings stay tied"
    rope = a.model.rotary_emb.inv_freq
    assert torch.isfinite(rope).all() and rope[0] == 1.0  # recomputed, not left uninitialised


# ---- SFT: masks, packing, loss averaging -------------------------------------------------


def _sft_pair(tok):
    from steelworks.data.sft import encode_conversation

    a = encode_conversation(tok, [{"role": "user", "content": "北京是哪里？"},
                                  {"role": "assistant", "content": "北京是首都。"}], 40, pad=False)
    b = encode_conversation(tok, [{"role": "user", "content": "你好"},
                                  {"role": "assistant", "content": "你好！"}], 40, pad=False)
    assert not a[2] and not b[2], "the samples fit whole"
    return a[:2], b[:2]


def _model(tok):
    from steelworks.train.config import ModelConfig
    from steelworks.train.models import build_hf_config, build_model

    hf = build_hf_config(ModelConfig(size="tiny"), len(tok), tok.pad_token_id, tok.eos_token_id)
    return build_model(hf, seed=0).eval()


def _write_sft(directory: Path, tok, samples, packed: bool, seq_len: int = 96) -> None:
    from steelworks.data.sft import pack_samples

    directory.mkdir(parents=True)
    dt = token_dtype(len(tok))
    if packed:
        tokens, mask, seg = pack_samples(samples, seq_len, tok.pad_token_id)
    else:
        tokens = np.full((len(samples), seq_len), tok.pad_token_id)
        mask = np.zeros_like(tokens)
        seg = None
        for i, (ids, m) in enumerate(samples):
            tokens[i, :len(ids)], mask[i, :len(m)] = ids, m
    info = write_shard(directory / "s.bin", tokens, dt, mask, seg)
    ShardIndex(seq_len, str(dt), len(tok), tok.pad_token_id, "sft", [info]).save(directory)


def _batch_loss(model, b: Batch, mode: str) -> tuple[float, float]:
    from steelworks.train.loop import _loss_terms, _num_samples

    logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
    tok_sum, sample_sum = _loss_terms(logits, b)
    return float(tok_sum / b.num_targets), float(sample_sum / _num_samples(b))


def test_packed_samples_do_not_attend_across_boundaries(demo_data, tmp_path):
    from steelworks.train.data import PackedLoader

    tok = demo_data["tok"]
    model = _model(tok)
    samples = list(_sft_pair(tok))
    _write_sft(tmp_path / "packed", tok, samples, packed=True)
    _write_sft(tmp_path / "rows", tok, samples, packed=False)
    packed = PackedLoader(tmp_path / "packed", 0, 1, 1, 1, 0).next_step()[0]
    rows = PackedLoader(tmp_path / "rows", 0, 1, 2, 1, 0).next_step()[0]
    assert packed.input_ids.size(0) == 1 and rows.input_ids.size(0) == 2
    with torch.no_grad():
        for mode_index in (0, 1):  # per-token and per-sample means agree packed or not
            p, r = _batch_loss(model, packed, "x")[mode_index], _batch_loss(model, rows, "x")[mode_index]
            assert p == pytest.approx(r, rel=1e-5, abs=1e-6)


def test_prompt_tokens_stay_out_of_the_loss(demo_data, tmp_path):
    """Perturbing what the model predicts at prompt positions leaves the loss unchanged, and
    those positions get no gradient."""
    from steelworks.train.data import PackedLoader
    from steelworks.train.loop import _loss_terms

    tok = demo_data["tok"]
    _write_sft(tmp_path / "packed", tok, list(_sft_pair(tok)), packed=True)
    b = PackedLoader(tmp_path / "packed", 0, 1, 1, 1, 0).next_step()[0]
    logits = _model(tok)(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits.detach()
    prompt = b.labels == -100
    assert prompt.any() and (~prompt).any()
    perturbed = logits.clone()
    perturbed[prompt] = torch.randn_like(perturbed[prompt]) * 10
    for a, c in zip(_loss_terms(logits, b), _loss_terms(perturbed, b)):
        assert torch.equal(a, c)
    leaf = logits.clone().requires_grad_(True)
    _loss_terms(leaf, b)[0].backward()
    assert leaf.grad[prompt].abs().sum() == 0 and leaf.grad[~prompt].abs().sum() > 0


def test_sample_averaging_weighs_short_answers_like_long_ones():
    from steelworks.train.loop import _loss_terms

    labels = torch.full((1, 6), -100)
    labels[0, :4] = 1  # sample 1: four target tokens
    labels[0, 5] = 1  # sample 2: one
    b = Batch(torch.zeros(1, 6, dtype=torch.long), labels, 5, sample_ids=torch.tensor([[1, 1, 1, 1, 0, 2]]))
    logits = torch.zeros(1, 6, 3)
    logits[0, :4, 1] = 5.0  # sample 1 is nearly right; sample 2 is uniform
    ce = torch.nn.functional.cross_entropy(logits[0], torch.tensor([1, 1, 1, 1, 0, 1]), reduction="none")
    tok_sum, sample_sum = _loss_terms(logits, b)
    assert float(tok_sum) == pytest.approx(float(ce[:4].sum() + ce[5]))
    assert float(sample_sum) == pytest.approx(float(ce[:4].mean() + ce[5]))


# ---- Ray Train: 2 FSDP2 workers ----------------------------------------------------------


@pytest.mark.ray
@pytest.mark.faults  # kills two workers and waits for Ray Train to restart the group: make test-faults
def test_ray_two_workers_match_one_process_and_survive_a_killed_worker(demo_data, tmp_path, ray_local):
    """One Ray Train run covers both: 2 workers (FSDP2 over gloo) must follow the loss curve
    of one process on the same global batch, and rank 1 is killed after step 6, so the
    curve also has to survive a restart of the worker group from the step-4 checkpoint."""
    one = tmp_path / "one"
    job, cfg = _job(demo_data, one, micro_batch_size=4, ckpt_every=4)
    run_training(job, cfg, use_ray=False)

    two = tmp_path / "two"
    job, cfg = _job(demo_data, two, micro_batch_size=2, num_workers=2, ckpt_every=4, max_failures=2)
    marker = tmp_path / "killed"
    # Then rank 0 dies right after renaming the step-8 checkpoint, before reporting it: the
    # restarted group resumes from it and reports it, so Ray prunes it like the others.
    orphan = tmp_path / "orphan"
    job["faults"] = [fault("train.step", str(marker), step=6, rank=1),
                    fault("train.committed", str(orphan), step=8, rank=0)]
    summary = run_training(job, cfg, use_ray=True)
    assert marker.exists() and orphan.exists(), "the workers were killed"
    assert summary["final_step"] == 12 and summary["world_size"] == 2
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-4)
    # Ray Train kept the newest keep_last=2 reported checkpoints, in place
    assert sorted(p.name for p in (two / "checkpoints").glob("step_*")) == ["step_00000008", "step_00000012"]
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(one / "hf")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(two / "hf")).state_dict()
    worst = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(worst.values()) < 1e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_lr_schedules():
    from steelworks.train.config import OptimConfig
    from steelworks.train.schedule import lr_multiplier

    def curve(**kw):
        cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, **kw)
        return [lr_multiplier(s, 100, cfg) for s in range(100)]

    cos, const, wsd = curve(schedule="cosine"), curve(schedule="constant"), curve(schedule="wsd", decay_fraction=0.2)
    for c in (cos, const, wsd):
        assert c[0] == pytest.approx(0.1) and c[9] == pytest.approx(1.0)  # linear warmup
        assert all(a < b for a, b in zip(c[:9], c[1:10]))
    assert all(a >= b for a, b in zip(cos[10:], cos[11:])) and cos[-1] == pytest.approx(0.1, abs=1e-3)
    assert set(const[10:]) == {1.0}
    assert set(wsd[10:80]) == {1.0} and wsd[-1] == pytest.approx(0.1 + 0.9 / 20)
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:]))  # the anneal: linear decay


def test_activation_checkpointing_changes_memory_not_results(demo_data, tmp_path):
    job, cfg = _job(demo_data, tmp_path / "plain", max_steps=3)
    run_training(job, cfg, use_ray=False)
    job, cfg = _job(demo_data, tmp_path / "ac", max_steps=3, activation_checkpointing=True)
    run_training(job, cfg, use_ray=False)
    np.testing.assert_allclose(_losses(tmp_path / "ac"), _losses(tmp_path / "plain"), rtol=1e-6)


@pytest.mark.faults  # kills a process: make test-faults
def test_torchrun_two_ranks_resume_a_one_process_checkpoint(demo_data, tmp_path):
    """The loop under torchrun (no Ray): 2 gloo ranks pick up a checkpoint written by one
    process (DCP reshards it) and continue the same loss curve."""
    straight = tmp_path / "straight"
    job, cfg = _job(demo_data, straight, micro_batch_size=4, ckpt_every=4, max_steps=8)
    run_training(job, cfg, use_ray=False)
    mixed = tmp_path / "mixed"
    job, cfg = _job(demo_data, mixed, micro_batch_size=4, ckpt_every=4, max_steps=8)
    assert _run_in_subprocess({**job, "faults": [fault("train.step", str(tmp_path / "m"), step=5)]}) == 17
    job["train"]["micro_batch_size"] = 2  # same global batch over 2 ranks
    job["train"]["async_checkpoint"] = True  # the background writer on its own gloo group
    path = mixed / "job2.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "steelworks.train.loop", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((mixed / "summary.json").read_text())["world_size"] == 2
    np.testing.assert_allclose(_losses(mixed), _losses(straight), rtol=2e-4)


@pytest.mark.parametrize("mode", ["token", "sample"])
def test_token_weights_reproduce_the_loss_terms(mode):
    """The fused cross-entropy path weighs each token so that sum(w * CE) is exactly the
    per-token or per-sample loss the logits path computes."""
    from steelworks.train.loop import _loss_terms, _token_weights

    torch.manual_seed(0)
    labels = torch.randint(0, 7, (2, 9))
    labels[0, :3] = -100
    labels[1, 5] = -100
    sample_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 2, 3, 3]])
    b = Batch(torch.zeros(2, 9, dtype=torch.long), labels, int((labels != -100).sum()), sample_ids=sample_ids)
    logits = torch.randn(2, 9, 7)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100,
                                           reduction="none").view(2, 9)
    expected = _loss_terms(logits, b)[0 if mode == "token" else 1]
    assert float((ce * _token_weights(b, mode)).sum()) == pytest.approx(float(expected), rel=1e-6)


def test_run_lock_makes_a_second_run_wait_for_the_first_to_die(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from steelworks.train.checkpoint import run_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom steelworks.train.checkpoint import run_lock\n"
         f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"locked by another training process \(pid {holder.pid}\)"):
            with run_lock(tmp_path, timeout_s=1):
                pass
        holder.send_signal(signal.SIGKILL)  # dies without cleanup: the kernel drops the lock
        holder.wait(10)
        with run_lock(tmp_path, timeout_s=10):
            assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait(10)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_extended_schedule_continues_without_a_jump(kind):
    from steelworks.train.config import OptimConfig
    from steelworks.train.schedule import Schedule, lr_multiplier

    cfg = OptimConfig(schedule=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    sched = Schedule(700, cfg)
    planned = [sched(s) for s in range(701)]
    assert planned == [lr_multiplier(s, 700, cfg) for s in range(701)]
    assert sched.extend(700, 900)  # a finished run taken from 700 to 900 steps
    ext = [sched(s) for s in range(701)]
    assert ext == planned, "the steps already trained keep their LR"
    tail = [sched(s) for s in range(700, 901)]
    assert max(tail) <= planned[700] + 1e-12 and tail[-1] == pytest.approx(0.1)
    # the recomputed plan jumped here: about 30% of peak for cosine, the peak for WSD
    assert lr_multiplier(701, 900, cfg) > 0.2 and sched(701) < 0.11
    # mid-decay, then extended again: continuous at both joins, and the chain is saved
    mid = Schedule(700, cfg)
    at = mid(650)
    mid.extend(650, 800)
    assert mid(650) == pytest.approx(at) and mid(651) <= at + 1e-12
    mid.extend(760, 1000)
    assert abs(mid(761) - mid(760)) < 0.01 and mid(1000) == pytest.approx(0.1)
    again = Schedule.from_state(mid.state(), cfg, total=123)
    assert [again(s) for s in range(1001)] == [mid(s) for s in range(1001)]
    if kind == "wsd":  # still stable: the decay just moves later, as if planned that way
        stable = Schedule(700, cfg)
        stable.extend(300, 900)
        assert [stable(s) for s in range(901)] == [lr_multiplier(s, 900, cfg) for s in range(901)]


def test_extending_a_finished_run_has_no_lr_jump(demo_data, tmp_path):
    job, cfg = _job(demo_data, tmp_path, max_steps=6, optim={"lr": 1e-2, "warmup_steps": 1})
    run_training(job, cfg, use_ray=False)
    job, cfg = _job(demo_data, tmp_path, max_steps=10, optim={"lr": 1e-2, "warmup_steps": 1})
    run_training(job, cfg, use_ray=False)
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 10
    floor = 1e-2 * cfg.optim.min_lr_ratio
    assert lrs[5] == pytest.approx(floor)  # the 6-step run ended at its floor
    assert all(lr == pytest.approx(floor) for lr in lrs[5:]), lrs  # and stays there: no jump


def test_grad_accum_equals_a_larger_micro_batch(demo_data, tmp_path):
    """grad_accum k over micro-batches of m sequences is one step over k*m sequences: one
    process, and 2 FSDP2 ranks under torchrun, where the gradients are reduce-scattered once
    per step (set_requires_gradient_sync), not once per micro-batch."""
    big = tmp_path / "big"
    job, cfg = _job(demo_data, big, micro_batch_size=4, max_steps=6)
    run_training(job, cfg, use_ray=False)
    accum = tmp_path / "accum"
    job, cfg = _job(demo_data, accum, micro_batch_size=1, grad_accum=4, max_steps=6)
    run_training(job, cfg, use_ray=False)
    np.testing.assert_allclose(_losses(accum), _losses(big), rtol=1e-5)
    ranks = tmp_path / "ranks"
    job, _ = _job(demo_data, ranks, micro_batch_size=1, grad_accum=2, max_steps=6)
    path = ranks / "job.json"
    ranks.mkdir()
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "steelworks.train.loop", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(_losses(ranks), _losses(big), rtol=2e-4)


def test_rng_state_round_trip():
    from steelworks.train.checkpoint import restore_rng_state, rng_state

    torch.manual_seed(5)
    state = rng_state()
    a = torch.rand(3)
    torch.rand(7)
    restore_rng_state(json.loads(json.dumps(state)))
    assert torch.equal(torch.rand(3), a)
    assert ("cuda" in state) == (torch.cuda.is_available() and torch.cuda.is_initialized())
