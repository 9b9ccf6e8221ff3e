"""The DPO stage's data path and training (issue 17, point 3): preference JSONL -> tokenized
pairs with answer masks (data/preference.py) -> the frozen reference's log-probs, computed
once (train/reference.py, on Ray Data or in this process) -> the train loop with
``task: dpo`` (train/pairs.py, dpo.dpo_forward_backward). The loss formula itself, and its
parity with TRL, is tests/test_dpo.py's; the dpo stage in a pipeline on Ray (sft -> dpo ->
eval, reference on 2 Ray Data replicas) is part of tests/test_init_from.py's run.

The synthetic preference set prefers one answer style over another ("答案是N。" over
"N lol"), which a tiny random model can learn in a few dozen steps, and generalise to pairs
it never trained on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import _losses, _run_in_subprocess

from steelworks.core.config import ConfigError, from_dict, load, to_dict
from steelworks.core.faults import fault
from steelworks.data.preference import PreferenceError, encode_answer, read_preferences
from steelworks.data.tokenizer import load_tokenizer
from steelworks.platform.settings import PipelineConfig
from steelworks.train.config import DpoConfig
from steelworks.train.driver import run_training
from steelworks.train.pairs import PairLoader, read_pairs
from steelworks.train.reference import reference_logps, write_pairs


def _pair(rng: random.Random) -> dict[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"{a}+{b}=?", "chosen": f"答案是{a + b}。", "rejected": f"{a + b} lol"}


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """48 training pairs (with reference log-probs of the tiny model) and 16 held out."""
    root = tmp_path_factory.mktemp("dpo")
    rng = random.Random(0)
    train, held = [_pair(rng) for _ in range(48)], [_pair(rng) for _ in range(16)]
    for name, records in (("train.jsonl", train), ("held.jsonl", held)):
        (root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tok = load_tokenizer(tiny_tokenizer_dir)
    pairs, _, _ = read_preferences([root / "train.jsonl"], tok, 64)
    chosen, rejected = reference_logps(tiny_model_dir, pairs, tok.pad_token_id, use_ray=False)
    write_pairs(root / "pairs", pairs, chosen, rejected)
    return {"root": root, "pairs": root / "pairs", "base": tiny_model_dir, "tokenizer": tiny_tokenizer_dir}


def _job(data, out: Path, **train) -> tuple[dict, DpoConfig]:
    fields = dict(max_steps=24, micro_batch_size=8, num_workers=1, log_every=1, seed=1, beta=0.1,
                  optim={"lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.0, "schedule": "constant"},
                  tensorboard=False)
    fields.update(train)
    cfg = from_dict(DpoConfig, fields)
    job = {"task": "dpo", "train": to_dict(cfg), "tokenizer_dir": str(data["tokenizer"]),
           "data_dir": str(data["pairs"]), "out_dir": str(out), "init_from": str(data["base"])}
    return job, cfg


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo_run(dpo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_run")
    job, cfg = _job(dpo_data, out, ckpt_every=8, tensorboard=True)
    return out, run_training(job, cfg, use_ray=False)


# ---- data: tokenized pairs ---------------------------------------------------------------


def test_the_mask_covers_the_answer_and_not_the_prompt(tiny_tokenizer_dir):
    """Earlier assistant turns of a multi-turn prompt are prompt, not answer; the chosen and
    rejected sequences share the prompt's tokens; the mask is the answer and its end token."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    prompt = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
              {"role": "user", "content": "1+1=?"}]
    ids_c, mask_c, cut = encode_answer(tok, prompt, [{"role": "assistant", "content": "答案是2。"}], 256)
    ids_r, mask_r, _ = encode_answer(tok, prompt, [{"role": "assistant", "content": "2 lol"}], 256)
    assert not cut
    start = int(np.argmax(mask_c))
    assert start == int(np.argmax(mask_r)) and np.array_equal(ids_c[:start], ids_r[:start])
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids_c[:start].tolist()) == prompt_text
    assert tok.decode(ids_c[mask_c.astype(bool)].tolist()) == "答案是2。<|im_end|>"
    assert mask_c[start:].tolist() == [1] * (int(mask_c.sum())) + [0] * (len(mask_c) - start - int(mask_c.sum()))


def test_a_long_answer_is_cut_and_a_long_prompt_refused(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    prompt = [{"role": "user", "content": "hi"}]
    n = len(tok.encode(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False))
    full, _, _ = encode_answer(tok, prompt, [{"role": "assistant", "content": "hello " * 20}], 512)
    ids, mask, cut = encode_answer(tok, prompt, [{"role": "assistant", "content": "hello " * 20}], n + 3)
    assert cut and len(ids) == n + 3 and np.array_equal(ids, full[: n + 3]) and mask.sum() == 3
    with pytest.raises(PreferenceError, match=f"the prompt is {n} tokens and leaves no room for the "
                                              f"answer within dpo.max_length={n}"):
        encode_answer(tok, prompt, [{"role": "assistant", "content": "hello"}], n)


def test_bad_records_are_quarantined_with_their_location(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    lines = [json.dumps({"prompt": "1+1=?", "chosen": "答案是2。", "rejected": "2 lol"}),
             "{not json",
             json.dumps({"prompt": "1+1=?", "chosen": "same", "rejected": "same"}),
             "",
             json.dumps({"question": "1+1=?", "answer": "2"}),
             json.dumps({"prompt": "x " * 200, "chosen": "a", "rejected": "b"}),
             json.dumps({"prompt": "2+2=?", "chosen": [{"role": "user", "content": "2+2=?"},
                                                       {"role": "assistant", "content": "答案是4。"}],
                         "rejected": [{"role": "user", "content": "2+2=?"},
                                      {"role": "assistant", "content": "4 lol"}]})]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, quarantined, counts = read_preferences([path], tok, 64)
    assert counts == {"read": 6, "pairs": 2, "quarantined": 4, "truncated": 0}
    assert [p["source"] for p in pairs] == [f"{path}:1", f"{path}:7"]
    assert [p["pair_id"] for p in pairs] == [0, 1]
    reasons = {q["where"].rsplit(":", 1)[1]: q["error"] for q in quarantined}
    assert "not valid JSON" in reasons["2"] and "identical" in reasons["3"]
    assert "unrecognised preference layout" in reasons["5"] and "no room for the answer" in reasons["6"]
    assert all(q["error"].startswith(f"{path}:") and q["line"] for q in quarantined)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        read_preferences([tmp_path / "missing.jsonl"], tok, 64)


# ---- the reference pass ------------------------------------------------------------------


def test_reference_logps_equal_transformers_and_do_not_depend_on_batching(dpo_data):
    """The stored numbers are log pi_ref(answer | prompt) as transformers computes it for each
    sequence alone, whatever the batch (and its padding) they were computed in."""
    from transformers import AutoModelForCausalLM

    cols = read_pairs(dpo_data["pairs"])
    tok = load_tokenizer(dpo_data["tokenizer"])
    pairs = [{"pair_id": i, **{k: cols[k][i] for k in ("chosen_ids", "chosen_mask", "rejected_ids",
                                                      "rejected_mask")}} for i in range(8)]
    one_by_one = reference_logps(dpo_data["base"], pairs, tok.pad_token_id, batch_size=1, use_ray=False)
    np.testing.assert_allclose(one_by_one[0], cols["ref_chosen"][:8], atol=1e-4)
    np.testing.assert_allclose(one_by_one[1], cols["ref_rejected"][:8], atol=1e-4)
    hf = AutoModelForCausalLM.from_pretrained(dpo_data["base"]).float().eval()
    for i in range(8):
        for side in ("chosen", "rejected"):
            ids = torch.as_tensor(cols[f"{side}_ids"][i].astype(np.int64))[None]
            mask = torch.as_tensor(cols[f"{side}_mask"][i].astype(bool))
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
            by_hand = logp.gather(-1, ids[0, 1:, None])[:, 0][mask[1:]].sum().item()
            assert abs(by_hand - cols[f"ref_{side}"][i]) < 1e-3, (i, side)


# ---- training ----------------------------------------------------------------------------


def test_dpo_raises_reward_accuracy_above_90_percent(dpo_data, dpo_run):
    """Step 1's forward is the reference itself (rewards 0, accuracy 0); training raises the
    reward accuracy above 90 %, on the training pairs and on 16 pairs it never saw."""
    from steelworks.train.dpo import pair_logps
    from steelworks.train.hf_io import from_hf
    from steelworks.train.pairs import collate

    out, summary = dpo_run
    rows = _rows(out)
    assert summary["final_step"] == 24 and [r["step"] for r in rows] == list(range(1, 25))
    first, last = rows[0], rows[-1]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["rewards/accuracies"] == 0.0 and abs(first["loss"] - np.log(2)) < 1e-4
    assert last["rewards/accuracies"] > 0.9 and last["rewards/margins"] > 0 and last["loss"] < 0.5
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"} <= set(last)
    # Held-out pairs: the exported policy against the reference.
    tok = load_tokenizer(dpo_data["tokenizer"])
    pairs, _, _ = read_preferences([dpo_data["root"] / "held.jsonl"], tok, 64)
    batch = collate(*([p[k] for p in pairs] for k in ("chosen_ids", "chosen_mask", "rejected_ids",
                                                       "rejected_mask")), tok.pad_token_id)
    cpu = torch.device("cpu")
    with torch.no_grad():
        pc, pr = pair_logps(from_hf(out / "hf"), batch, cpu)
        rc, rr = pair_logps(from_hf(dpo_data["base"]), batch, cpu)
    accuracy = ((pc - rc) > (pr - rr)).float().mean().item()
    assert accuracy > 0.9, accuracy


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the event files (TFRecord framing: u64 length, u32 crc,
    the Event proto, u32 crc), read with tensorboardX's protos: no TensorFlow needed."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos: pos + 8])
            event = Event.FromString(data[pos + 12: pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_dpo_metrics_reach_tensorboard(dpo_run):
    out, _ = dpo_run
    scalars = _scalars(out / "tensorboard")
    assert {"train/rewards/accuracies", "train/rewards/margins", "train/rewards/chosen",
            "train/rewards/rejected", "train/loss"} <= set(scalars)
    rows = _rows(out)
    assert scalars["train/rewards/accuracies"] == [(r["step"], pytest.approx(r["rewards/accuracies"]))
                                                   for r in rows]


@pytest.mark.faults  # kills a process: make test-faults
def test_dpo_kill_and_resume_gives_identical_losses(dpo_data, dpo_run, tmp_path):
    """Killed after step 11, resumed in a fresh process from the step-8 checkpoint: the pair
    loader's cursor and the optimizer come back, and every logged row equals the
    uninterrupted run's."""
    straight, _ = dpo_run
    broken = tmp_path / "broken"
    job, _ = _job(dpo_data, broken, ckpt_every=8)
    code = _run_in_subprocess({**job, "faults": [fault("train.step", str(tmp_path / "m"), step=11)]})
    assert code == 17 and (broken / "checkpoints" / "step_00000008").is_dir()
    assert _run_in_subprocess(job) == 0
    assert _losses(broken) == _losses(straight)
    keys = ("rewards/accuracies", "rewards/margins")
    assert [{k: r[k] for k in keys} for r in _rows(broken)] == [{k: r[k] for k in keys} for r in _rows(straight)]


def test_dpo_with_lora_trains_the_adapters_only(dpo_data, tmp_path):
    out = tmp_path / "lora"
    job, cfg = _job(dpo_data, out, max_steps=12, optim={"lr": 1e-2, "warmup_steps": 1},
                    lora={"r": 4, "alpha": 8.0})
    summary = run_training(job, cfg, use_ray=False)
    assert 0 < summary["trainable_params"] < summary["params"] / 4
    assert _rows(out)[-1]["rewards/accuracies"] > 0.9
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "hf" / "config.json").exists()


def test_ipo_and_label_smoothing_options_train(dpo_data, tmp_path):
    for name, extra in (("ipo", {"loss_type": "ipo", "beta": 0.5}), ("cdpo", {"label_smoothing": 0.1})):
        job, cfg = _job(dpo_data, tmp_path / name, max_steps=4, **extra)
        run_training(job, cfg, use_ray=False)
        rows = _rows(tmp_path / name)
        assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"], (name, rows)


# ---- loader and config -------------------------------------------------------------------


def test_pair_loader_splits_ranks_disjointly_and_resumes_exactly(dpo_data):
    def ids(loader: PairLoader) -> list[list[int]]:
        return [b.input_ids[: b.num_pairs].tolist() for b in loader.next_step()]

    one = PairLoader(dpo_data["pairs"], 0, 1, 4, 1, 7, 0, 64)
    ranks = [PairLoader(dpo_data["pairs"], r, 2, 2, 1, 7, 0, 64) for r in range(2)]
    for _ in range(15):  # 48 pairs / 4 per step: crosses into the second epoch
        whole = [row for batch in ids(one) for row in batch]
        split = [row for r in ranks for batch in ids(r) for row in batch]
        strip = [[t for t in row if t != 0] for row in whole]
        assert strip == [[t for t in row if t != 0] for row in split]
    assert one.epoch == 1
    state = one.state_dict()
    again = PairLoader(dpo_data["pairs"], 0, 1, 4, 1, 7, 0, 64)
    again.load_state_dict(state)
    assert ids(again) == ids(one)


def test_dpo_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="dpo.beta must be > 0"):
        load(PipelineConfig, None, ["dpo.beta=0"])
    with pytest.raises(ConfigError, match="label_smoothing applies to loss_type 'sigmoid' only"):
        load(PipelineConfig, None, ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        load(PipelineConfig, None, ["dpo.loss_type=kto"])
    cfg = load(PipelineConfig, None, ["stages=[data,tokenizer,sft,dpo,eval]", "dpo.beta=0.3",
                                      "dpo.lora.r=4", "data.source=files",
                                      "data.sources=[{name: web, path: web.jsonl}]"])
    assert cfg.dpo.beta == 0.3 and cfg.dpo.lora.r == 4 and "dpo" not in PipelineConfig().stages
    from steelworks.platform.pipeline import preference_files

    with pytest.raises(ConfigError, match="dpo.data is empty"):
        preference_files(cfg)



def test_the_stage_computes_the_pairs_once_and_rebuilds_them_when_their_key_changes(
        dpo_data, tmp_path, monkeypatch):
    """``pipeline._dpo_pairs``: the reference pass runs once; a resumed or re-run stage with
    the same files, tokenizer, max_length and reference reuses its output; a changed key, or
    a crash after the pairs were written but before their key was, rebuilds them."""
    from types import SimpleNamespace

    import steelworks.train.reference as reference
    from steelworks.platform.pipeline import _dpo_pairs

    calls = []

    def fake(model_dir, pairs, pad_id, **kw):
        calls.append(len(pairs))
        return np.zeros(len(pairs)), np.zeros(len(pairs))

    monkeypatch.setattr(reference, "reference_logps", fake)
    stage = SimpleNamespace(dir=tmp_path / "dpo", input_hashes={"sft": "abc"}, remote=None)
    files = [str(dpo_data["root"] / "train.jsonl")]
    cfg = from_dict(DpoConfig, {"max_length": 64})
    tok = str(dpo_data["tokenizer"])
    counts = _dpo_pairs(stage, cfg, files, "ref", tok)
    assert counts["pairs"] == 48 and calls == [48]
    assert _dpo_pairs(stage, cfg, files, "ref", tok) == counts and calls == [48]
    _dpo_pairs(stage, from_dict(DpoConfig, {"max_length": 48}), files, "ref", tok)
    assert calls == [48, 48]
    (stage.dir / "pairs" / "key.json").unlink()  # as if killed between the two writes
    _dpo_pairs(stage, from_dict(DpoConfig, {"max_length": 48}), files, "ref", tok)
    assert calls == [48, 48, 48]
    assert (stage.dir / "pairs" / "quarantine.jsonl").read_text() == ""


def test_dpo_loss_plot_has_a_rewards_panel(dpo_run):
    """loss.png gets a second panel (reward accuracy and margin) for DPO runs."""
    from PIL import Image

    out, _ = dpo_run
    width, height = Image.open(out / "loss.png").size
    assert width > 1.5 * height, (width, height)  # two panels side by side
