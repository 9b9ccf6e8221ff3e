"""DPO core (train/dpo.py) and preference records (data/preference.py).

The loss is checked three ways: against its formula in plain float math, against TRL 1.16's
DPOTrainer on the same log-probabilities (and, end to end, on the same tiny Qwen2 model and
tokens), and by training: a tiny decoder trained with it learns a synthetic preference.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch

from steelworks.data.preference import PreferenceError, normalize_preference
from steelworks.train.dpo import dpo_loss, dpo_metrics, sequence_logps

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected): margins h of both signs, a tie,
# and one large enough (beta*h = 8) that a naive log(sigmoid) would lose precision.
PAIRS = [(-12.5, -15.0, -13.0, -14.0), (-30.0, -22.0, -28.0, -25.5), (-7.0, -9.0, -7.0, -9.0),
         (-5.0, -90.0, -20.0, -25.0), (-41.25, -40.0, -39.5, -44.0)]


def _tensors(pairs=PAIRS) -> list[torch.Tensor]:
    return [torch.tensor(col, dtype=torch.float32) for col in zip(*pairs)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _hand(pc: float, pr: float, rc: float, rr: float, beta: float, loss_type: str, eps: float = 0.0,
          lengths: tuple[int, int] = (1, 1)) -> tuple[float, float, float]:
    if loss_type == "sigmoid":
        h = (pc - pr) - (rc - rr)
        loss = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    else:
        h = (pc - rc) / lengths[0] - (pr - rr) / lengths[1]
        loss = (h - 1 / (2 * beta)) ** 2
    return loss, beta * (pc - rc), beta * (pr - rr)


# --------------------------------------------------------------------------- formula


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0),
                                                ("sigmoid", 0.1, 0.2), ("sigmoid", 0.3, 0.45),
                                                ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0)])
def test_loss_and_rewards_match_formula(loss_type, beta, eps):
    losses, chosen_r, rejected_r = dpo_loss(*_tensors(), beta=beta, loss_type=loss_type,
                                            label_smoothing=eps)
    for i, pair in enumerate(PAIRS):
        loss, cr, rr = _hand(*pair, beta, loss_type, eps)
        assert losses[i].item() == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert chosen_r[i].item() == pytest.approx(cr, rel=1e-6, abs=1e-6)
        assert rejected_r[i].item() == pytest.approx(rr, rel=1e-6, abs=1e-6)


def test_ipo_length_normalisation_matches_formula():
    lengths = [(3, 5), (1, 7), (4, 4), (10, 2), (6, 1)]
    losses, _, _ = dpo_loss(*_tensors(), beta=0.2, loss_type="ipo",
                            chosen_lengths=torch.tensor([a for a, _ in lengths]),
                            rejected_lengths=torch.tensor([b for _, b in lengths]))
    for i, (pair, n) in enumerate(zip(PAIRS, lengths)):
        assert losses[i].item() == pytest.approx(_hand(*pair, 0.2, "ipo", lengths=n)[0], rel=1e-5)


def test_gradient_flows_to_policy_only_and_rewards_are_detached():
    pc, pr, rc, rr = (t.requires_grad_() for t in _tensors())
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1)
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    losses.sum().backward()
    # d/d pc of -log sigma(beta h) = -beta * sigma(-beta h); rejected gets the opposite sign.
    for i, pair in enumerate(PAIRS):
        h = (pair[0] - pair[1]) - (pair[2] - pair[3])
        expected = -0.1 / (1 + math.exp(0.1 * h))
        assert pc.grad[i].item() == pytest.approx(expected, rel=1e-5)
        assert pr.grad[i].item() == pytest.approx(-expected, rel=1e-5)


def test_metrics_use_trl_names_and_strict_accuracy():
    chosen = torch.tensor([0.5, -0.2, 0.0, 1.0])
    rejected = torch.tensor([0.1, 0.3, 0.0, -1.0])
    m = dpo_metrics(chosen, rejected)
    assert m == pytest.approx({"rewards/chosen": 0.325, "rewards/rejected": -0.15,
                               "rewards/margins": 0.475, "rewards/accuracies": 0.5})
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="hinge"), "unknown DPO loss_type 'hinge'; valid: sigmoid, ipo"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing applies to loss_type 'sigmoid' only"),
    (dict(chosen_lengths=torch.ones(5), rejected_lengths=torch.ones(5)), "apply to loss_type 'ipo' only"),
    (dict(loss_type="ipo", chosen_lengths=torch.ones(5)), "pass both"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*_tensors(), **kwargs)


def test_mismatched_shapes_are_rejected():
    pc, pr, rc, rr = _tensors()
    with pytest.raises(ValueError, match="four \\[B\\] tensors"):
        dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="logits \\[B, T, V\\]"):
        sequence_logps(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))


# --------------------------------------------------------------------------- sequence_logps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_matches_a_hand_loop(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.randint(0, 2, (3, 7), generator=g)
    mask[2] = 0  # an empty completion sums to 0
    labels[mask == 0] = -100  # masked labels are never read, so -100 is fine there
    got = sequence_logps(logits, labels, mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    rows = logits.float().tolist()  # the bf16 values, scored exactly in double precision
    for b in range(3):
        total = 0.0
        for t in range(7):
            if mask[b, t]:
                z = rows[b][t]
                total += z[labels[b, t]] - math.log(sum(math.exp(v) for v in z))
        assert got[b].item() == pytest.approx(total, rel=1e-5, abs=1e-5)


# --------------------------------------------------------------------------- TRL parity

VOCAB = 64


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """A real TRL DPOTrainer on a tiny Qwen2 (policy and a differently initialised reference)
    with a word-level tokenizer built in memory: no hub access."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import DPOConfig, DPOTrainer

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>")
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=48)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(cfg)
    torch.manual_seed(1)
    ref = Qwen2ForCausalLM(cfg)
    data = Dataset.from_list([
        {"prompt": "w3 w4 w5", "chosen": " w6 w7", "rejected": " w8"},
        {"prompt": "w9", "chosen": " w10 w11 w12", "rejected": " w13 w14"}])
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", use_cpu=True,
                     bf16=False, per_device_train_batch_size=2, max_length=None, save_strategy="no")
    return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data,
                      processing_class=hf_tok)


class _FixedLogps(torch.nn.Module):
    """Stands in for TRL's fused-LM-head forward: returns the given per-token log-probs."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        super().__init__()
        self.log_probs = log_probs

    def forward(self, **_: object):
        from trl.trainer.utils import FusedCausalLMOutput

        zeros = torch.zeros_like(self.log_probs)
        return FusedCausalLMOutput(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros,
                                   is_top1=zeros.bool())


def _trl_loss(trainer, pairs, lengths, *, loss_type, beta, eps=0.0) -> tuple[float, dict[str, float]]:
    """TRL's loss (batch mean) and logged reward metrics for the given summed log-probs.

    The policy log-probs come from ``_FixedLogps`` (each sequence's whole sum on its first
    completion token, zeros elsewhere, as TRL's fused head writes zeros under -100 labels), the
    reference ones from the batch (TRL's ``precompute_ref_log_probs`` path); the completion
    mask gives each sequence its token count, which TRL's IPO divides by.
    """
    b, width = len(pairs), max(max(n) for n in lengths) + 2
    completion_mask = torch.zeros(2 * b, width, dtype=torch.long)
    log_probs = torch.zeros(2 * b, width - 1)
    for i, ((pc, pr, _, _), (nc, nr)) in enumerate(zip(pairs, lengths)):
        completion_mask[i, 1:1 + nc], completion_mask[b + i, 1:1 + nr] = 1, 1
        log_probs[i, 0], log_probs[b + i, 0] = pc, pr
    inputs = {"input_ids": torch.zeros(2 * b, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * b, width, dtype=torch.long),
              "completion_mask": completion_mask,
              "ref_chosen_logps": torch.tensor([p[2] for p in pairs]),
              "ref_rejected_logps": torch.tensor([p[3] for p in pairs])}
    trainer.precompute_ref_logps, trainer.loss_types, trainer.loss_weights = True, [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, eps
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    with torch.no_grad():
        loss = trainer._compute_loss(_FixedLogps(log_probs), inputs, return_outputs=False)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return loss.item(), logged


LENGTHS = [(3, 5), (1, 7), (4, 4), (10, 2), (6, 1)]


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1),
                                            ("ipo", 0.4)])
def test_loss_matches_trl_on_the_same_logps(trl_trainer, loss_type, beta):
    """Per pair (a batch of one each) and for the whole batch, loss and reward metrics."""
    lengths = dict(chosen_lengths=torch.tensor([a for a, _ in LENGTHS]),
                   rejected_lengths=torch.tensor([b for _, b in LENGTHS])) if loss_type == "ipo" else {}
    losses, chosen_r, rejected_r = dpo_loss(*_tensors(), beta=beta, loss_type=loss_type, **lengths)
    for i, (pair, n) in enumerate(zip(PAIRS, LENGTHS)):
        trl_loss, trl_metrics = _trl_loss(trl_trainer, [pair], [n], loss_type=loss_type, beta=beta)
        assert losses[i].item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-6)
        assert chosen_r[i].item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
        assert rejected_r[i].item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
    trl_loss, trl_metrics = _trl_loss(trl_trainer, PAIRS, LENGTHS, loss_type=loss_type, beta=beta)
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-6)
    assert dpo_metrics(chosen_r, rejected_r) == pytest.approx(trl_metrics, abs=1e-5)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothed_sigmoid_matches_trl_cdpo_formula(trl_trainer, eps):
    """TRL 1.16's "sigmoid" ignores label_smoothing; its cDPO expression
    -(1-eps) logsig(beta h) - eps logsig(-beta h) lives in "aot", which sorts the batch's
    margins first -- a no-op on a batch of one pair, where it is exactly cDPO."""
    losses, _, _ = dpo_loss(*_tensors(), beta=0.2, label_smoothing=eps)
    for i, (pair, n) in enumerate(zip(PAIRS, LENGTHS)):
        trl_loss, _ = _trl_loss(trl_trainer, [pair], [n], loss_type="aot", beta=0.2, eps=eps)
        assert losses[i].item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-6)


def test_sequence_logps_and_loss_match_trl_end_to_end(trl_trainer):
    """TRL tokenizes, pads and scores the 2-example dataset with its fused LM head; our
    sequence_logps on the same tokens and the same model's logits gives the same sums, and
    dpo_loss on them gives TRL's loss and reward metrics."""
    tr = trl_trainer
    batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        ours = []
        for model in (tr.model, tr.ref_model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Causal LM: logits at t score token t+1, so align once here.
            ours.append(sequence_logps(logits[:, :-1], batch["input_ids"][:, 1:],
                                       batch["completion_mask"][:, 1:]).chunk(2))
        trl_policy = tr.compute_ref_log_probs(tr.model, batch)
        trl_ref = tr.compute_ref_log_probs(tr.ref_model, batch)
    for got, want in zip(ours[0] + ours[1], trl_policy + trl_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    (pc, pr), (rc, rr) = ours
    tr.precompute_ref_logps, tr.loss_types, tr.loss_weights = False, ["sigmoid"], [1.0]
    tr.beta, tr.label_smoothing = 0.1, 0.0
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    with torch.no_grad():
        trl_loss = tr.compute_loss(tr.model, batch).item()
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)
    logged = {k: v[-1] for k, v in tr._metrics["train"].items() if k.startswith("rewards/")}
    assert dpo_metrics(chosen_r, rejected_r) == pytest.approx(logged, abs=1e-5)


# --------------------------------------------------------------------------- preference data

WHERE = "prefs.jsonl:12"


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_prompt_string_layout():
    out = normalize_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5", "id": 7}, WHERE)
    assert out == {"prompt_messages": [_user("2+2?")], "chosen": [_bot("4")], "rejected": [_bot("5")]}


@pytest.mark.parametrize("chosen,rejected", [("4", "5"), (_bot("4"), _bot("5")),
                                             ([_bot("4")], [_bot("5")])])
def test_messages_layout(chosen, rejected):
    prompt = [{"role": "system", "content": "Be brief."}, _user("1+1?"), _bot("2"), _user("2+2?")]
    out = normalize_preference({"messages": prompt, "chosen": chosen, "rejected": rejected}, WHERE)
    assert out == {"prompt_messages": prompt, "chosen": [_bot("4")], "rejected": [_bot("5")]}


def test_ultrafeedback_binarized_layout():
    chosen = [_user("Name a prime."), _bot("7")]
    rejected = [_user("Name a prime."), _bot("8")]
    record = {"prompt": "Name a prime.", "prompt_id": "ab12", "chosen": chosen, "rejected": rejected,
              "messages": chosen, "score_chosen": 9.0, "score_rejected": 2.0}
    out = normalize_preference(record, WHERE)
    assert out == {"prompt_messages": [_user("Name a prime.")], "chosen": [_bot("7")],
                   "rejected": [_bot("8")]}
    out["prompt_messages"][0]["content"] = "changed"
    assert chosen[0]["content"] == "Name a prime."  # the source record is not aliased


def test_ultrafeedback_multi_turn_shared_prefix():
    prefix = [_user("hi"), _bot("hello"), _user("2+2?")]
    out = normalize_preference({"prompt": "2+2?", "chosen": prefix + [_bot("4")],
                                "rejected": prefix + [_bot("22")]}, WHERE)
    assert out["prompt_messages"] == prefix and out["chosen"] == [_bot("4")]


@pytest.mark.parametrize("record,match", [
    (["not", "a", "dict"], "must be an object, got list"),
    ({"question": "q", "chosen": "a", "rejected": "b"}, "unrecognised preference layout with keys"),
    ({"prompt": "q", "chosen": "a"}, "unrecognised preference layout"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt message 0 \\(user\\) is empty"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen message 0 \\(assistant\\) is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "identical"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string, a message"),
    ({"prompt": "q", "chosen": [], "rejected": "b"}, "\\(empty\\)"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
    ({"messages": [], "chosen": "a", "rejected": "b"}, "'messages' must be a non-empty list"),
    ({"messages": [_user("q"), _bot("a")], "chosen": "a", "rejected": "b"},
     "prompt must end with a user turn, not 'assistant'"),
    ({"messages": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"},
     "prompt \\+ chosen: message 0 must be"),
    ({"messages": [_user("q")], "chosen": {"role": "assistant"}, "rejected": "b"},
     "prompt \\+ chosen: message 1 must be"),
    ({"prompt": "q", "chosen": [_bot("a"), {"role": "tool", "content": "x"}], "rejected": "b"},
     "'chosen' message 1 must have role 'assistant', got 'tool'"),
    ({"prompt": "q", "chosen": [_user("q"), _bot("a")], "rejected": [_user("r"), _bot("b")]},
     "differ before their last turn"),
    ({"prompt": "other", "chosen": [_user("q"), _bot("a")], "rejected": [_user("q"), _bot("b")]},
     "'prompt' does not match"),
    ({"prompt": "q", "chosen": [_user("q"), _user("a")], "rejected": [_user("q"), _bot("b")]},
     "'chosen' message 0 must have role 'assistant', got 'user'"),
    ({"prompt": "q", "chosen": [_user("q")], "rejected": [_user("q"), _bot("b")]},
     "must both be conversations"),
])
def test_bad_records_name_where_and_what(record, match):
    with pytest.raises(PreferenceError, match=match) as info:
        normalize_preference(record, WHERE)
    assert str(info.value).startswith(f"{WHERE}: ")
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- training


def _preference_batch(g: torch.Generator, n: int, vocab: int) -> torch.Tensor:
    """[2n, 8]: n chosen rows then n rejected rows, each a random 4-token prompt then a
    4-token answer; chosen answers use the lower half of the vocabulary, rejected the upper."""
    half = vocab // 2
    prompts = torch.randint(2, vocab, (n, 4), generator=g)
    chosen = torch.randint(2, half, (n, 4), generator=g)
    rejected = torch.randint(half, vocab, (n, 4), generator=g)
    return torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])


def _pair_logps(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(ids)
    mask = torch.zeros_like(ids[:, 1:])
    mask[:, 3:] = 1  # labels ids[:, 4:]: the answer tokens only
    chosen, rejected = sequence_logps(logits[:, :-1], ids[:, 1:], mask).chunk(2)
    return chosen, rejected


def test_tiny_decoder_learns_a_synthetic_preference():
    from steelworks.train.config import ModelConfig
    from steelworks.train.model import build_decoder
    from steelworks.train.models import decoder_config

    vocab = 32
    torch.manual_seed(0)
    policy = build_decoder(decoder_config(ModelConfig(size="tiny"), vocab))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    held_out = _preference_batch(g, 128, vocab)

    def held_out_metrics() -> dict[str, float]:
        with torch.no_grad():
            pc, pr = _pair_logps(policy, held_out)
            rc, rr = _pair_logps(ref, held_out)
            _, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
        return dpo_metrics(chosen_r, rejected_r)

    # One intra-op thread: these matmuls are tiny, and on a busy 2-core machine a second
    # thread made each step ~30x slower (spinning), not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert held_out_metrics()["rewards/accuracies"] == 0.0  # policy == reference: all ties
        opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
        first = None
        for _ in range(100):
            ids = _preference_batch(g, 16, vocab)
            pc, pr = _pair_logps(policy, ids)
            with torch.no_grad():
                rc, rr = _pair_logps(ref, ids)
            loss = dpo_loss(pc, pr, rc, rr, beta=0.1)[0].mean()
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        metrics = held_out_metrics()
    finally:
        torch.set_num_threads(threads)
    assert first == pytest.approx(math.log(2), abs=1e-4)  # -log sigmoid(0) at step 0
    assert loss.item() < 0.5 * first
    assert metrics["rewards/accuracies"] > 0.9, metrics
    assert metrics["rewards/margins"] > 0 and metrics["rewards/chosen"] > metrics["rewards/rejected"]
