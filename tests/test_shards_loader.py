"""Shards round-trip, the packed loader's disjoint shares and exact resume, SFT masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from steelworks.data.shards import ShardIndex, open_shard, token_dtype, write_shard
from steelworks.train.data import PackedLoader


def _shards(tmp_path, n=40, seq_len=9, vocab=70000, mask=False):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(n, seq_len))
    dt = token_dtype(vocab)
    infos = [write_shard(tmp_path / f"s{i}.bin", tokens[i * n // 2:(i + 1) * n // 2], dt,
                         (tokens[i * n // 2:(i + 1) * n // 2] % 2) if mask else None) for i in range(2)]
    ShardIndex(seq_len, str(dt), vocab, 0, "sft" if mask else "pretrain", infos).save(tmp_path)
    return tokens


def test_shard_round_trip_uint16_and_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tokens = _shards(tmp_path, vocab=70000)
    index = ShardIndex.load(tmp_path)
    back = np.concatenate([np.asarray(open_shard(tmp_path, index, s)[0]) for s in index.shards])
    assert index.dtype == "uint32" and np.array_equal(back, tokens)


def test_ranks_get_disjoint_shares_covering_an_epoch(tmp_path):
    _shards(tmp_path, n=40)
    seen = []
    for rank in range(2):
        loader = PackedLoader(tmp_path, rank, 2, micro_batch=2, grad_accum=2, seed=3)
        for _ in range(loader.steps_per_epoch):
            for b in loader.next_step():
                seen += [tuple(r.tolist()) for r in b.input_ids]
    assert len(seen) == 40 and len(set(seen)) == 40


def test_resume_continues_with_exactly_the_next_batch(tmp_path):
    _shards(tmp_path, n=40)
    a = PackedLoader(tmp_path, 0, 1, micro_batch=3, grad_accum=1, seed=5)
    full = [a.next_step()[0].input_ids for _ in range(30)]  # crosses epoch boundaries
    b = PackedLoader(tmp_path, 0, 1, micro_batch=3, grad_accum=1, seed=5)
    for _ in range(17):
        b.next_step()
    state = b.state_dict()
    c = PackedLoader(tmp_path, 0, 1, micro_batch=3, grad_accum=1, seed=5)
    c.load_state_dict(state)
    rest = [c.next_step()[0].input_ids for _ in range(13)]
    assert all(np.array_equal(x, y) for x, y in zip(full[17:], rest))


def test_changed_shard_is_refused_by_name(tmp_path):
    _shards(tmp_path, n=40)
    a = PackedLoader(tmp_path, 0, 1, micro_batch=2, grad_accum=1, seed=0)
    state = a.state_dict()
    with open(tmp_path / "s1.bin", "r+b") as f:
        f.write(b"\xff\xff")
    with pytest.raises(ValueError, match="s1.bin"):
        PackedLoader(tmp_path, 0, 1, micro_batch=2, grad_accum=1, seed=0).load_state_dict(state)


def test_corrupt_shard_is_refused_by_name_before_training(tmp_path):
    _shards(tmp_path, n=40)
    PackedLoader(tmp_path, 0, 1, micro_batch=2, grad_accum=1, seed=0)  # intact: accepted
    with open(tmp_path / "s1.bin", "r+b") as f:
        f.seek(8)
        f.write(b"\x00\x01")  # bit rot in the middle of the file
    with pytest.raises(ValueError, match=r"s1\.bin changed: sha256"):
        PackedLoader(tmp_path, 0, 1, micro_batch=2, grad_accum=1, seed=0)
    # With two ranks the shards are split between them: exactly one of them checks s1.
    refused = 0
    for rank in (0, 1):
        try:
            PackedLoader(tmp_path, rank, 2, micro_batch=1, grad_accum=1, seed=0)
        except ValueError as e:
            assert "s1.bin" in str(e)
            refused += 1
    assert refused == 1


def test_sft_mask_labels(tmp_path):
    tokens = _shards(tmp_path, n=8, mask=True)  # mask = token % 2
    loader = PackedLoader(tmp_path, 0, 1, micro_batch=8, grad_accum=1, seed=0)
    b = loader.next_step()[0]
    for row_in, row_lab in zip(b.input_ids.numpy(), b.labels.numpy()):
        i = next(i for i in range(8) if np.array_equal(tokens[i, :-1], row_in))
        expected = np.where(tokens[i, 1:] % 2 == 1, tokens[i, 1:], -100)
        assert np.array_equal(row_lab, expected)
    assert b.num_targets == int((b.labels != -100).sum()) > 0


def test_sft_mask_covers_exactly_assistant_turns(tiny_tokenizer_dir):
    from steelworks.data.sft import encode_conversation
    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    msgs = [{"role": "system", "content": "你好"}, {"role": "user", "content": "北京是哪里？"},
            {"role": "assistant", "content": "北京是中国的首都。"}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hello world!"}]
    ids, mask, truncated = encode_conversation(tok, msgs, 128)
    assert not truncated
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "北京是中国的首都。<|im_end|>Hello world!<|im_end|>"
    # everything before the first trained token is the prompt, ending with the assistant header
    first = int(np.flatnonzero(mask)[0])
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    # the tokens are exactly what the chat template produces at inference
    n = int((ids != tok.pad_token_id).sum())
    assert list(ids[:n]) == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]


def test_pack_joins_documents_with_end_of_document(tiny_tokenizer_dir):
    from steelworks.data.pack import pack_documents
    from steelworks.data.tokenizer import document_end_id, load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    docs = ["北京是中国的首都。", "Hello world!", "def add(a, b):\n    return a + b\n"] * 5
    out = pack_documents(pd.DataFrame({"text": docs}), str(tiny_tokenizer_dir), seq_len=16)
    stream = np.concatenate(list(out["tokens"]))
    expected = [t for d in docs for t in (*tok(d, add_special_tokens=False)["input_ids"], document_end_id(tok))]
    assert list(stream) == expected[: len(stream)]
    assert int(out["docs"].sum()) == len(docs) and int(out["dropped"].sum()) == len(expected) - len(stream)


def test_worker_encoder_matches_transformers(tiny_tokenizer_dir):
    """The pack workers encode with the Rust tokenizer directly; the ids and the document end
    must be what transformers' tokenizer gives, special tokens and odd whitespace included."""
    from steelworks.data.pack import _load
    from steelworks.data.tokenizer import document_end_id, load_tokenizer

    encode, eod = _load(str(tiny_tokenizer_dir))
    tok = load_tokenizer(tiny_tokenizer_dir)
    texts = ["你好，世界！ hello  world\n\n\ttab", "a <|endoftext|> b <|im_start|>", "", "Ｆｕｌｌ ①"]
    assert encode(texts) == tok(texts, add_special_tokens=False)["input_ids"]
    assert eod == document_end_id(tok)


def _set(directory, start, n, seq_len=9, vocab=1000, segments=None, mask=None):
    """A one-shard set whose rows are distinguishable by their first token (start + i)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = np.tile(np.arange(start, start + n)[:, None], (1, seq_len))
    dt = token_dtype(vocab)
    info = write_shard(directory / "s0.bin", tokens, dt, mask, segments)
    ShardIndex(seq_len, str(dt), vocab, 0, "sft" if mask is not None else "pretrain", [info]).save(directory)


def _firsts(loader, steps):
    return [int(r[0]) for _ in range(steps) for b in loader.next_step() for r in b.input_ids]


def test_appended_shards_are_seen_once_and_nothing_old_repeats(tmp_path):
    _set(tmp_path / "a", 0, 24)
    old = PackedLoader(tmp_path / "a", 0, 1, micro_batch=2, grad_accum=1, seed=7)
    seen = _firsts(old, 5)  # 10 of 24 old sequences trained
    state = old.state_dict()
    _set(tmp_path / "b", 100, 12)  # 12 new sequences arrive
    resumed = PackedLoader([tmp_path / "a", tmp_path / "b"], 0, 1, micro_batch=2, grad_accum=1, seed=7)
    resumed.load_state_dict(state)
    assert resumed.appended == [str(tmp_path / "b" / "s0.bin")]
    rest = _firsts(resumed, (24 + 12 - 10) // 2)  # the rest of the epoch
    assert sorted(seen + rest) == list(range(24)) + list(range(100, 112))
    new_positions = [i for i, x in enumerate(rest) if x >= 100]
    assert new_positions[0] < 10 and new_positions[-1] > len(rest) - 10, "new data is mixed in, not tacked on"
    # the append is part of the state: a second resume (no new shards) continues exactly
    mid = PackedLoader([tmp_path / "a", tmp_path / "b"], 0, 1, micro_batch=2, grad_accum=1, seed=7)
    mid.load_state_dict(state)
    head = _firsts(mid, 4)
    again = PackedLoader([tmp_path / "a", tmp_path / "b"], 0, 1, micro_batch=2, grad_accum=1, seed=7)
    again.load_state_dict(mid.state_dict())
    assert again.appended == [] and head + _firsts(again, len(rest) // 2 - 4) == rest
    # the next epoch is a fresh permutation of everything
    assert sorted(_firsts(again, 18)) == list(range(24)) + list(range(100, 112))


def test_shard_with_known_content_is_refused(tmp_path):
    _set(tmp_path / "a", 0, 8)
    _set(tmp_path / "copy", 0, 8)
    with pytest.raises(ValueError, match="same content"):
        PackedLoader([tmp_path / "a", tmp_path / "copy"], 0, 1, micro_batch=2, grad_accum=1, seed=0)


def test_missing_shard_is_named_on_resume(tmp_path):
    _set(tmp_path / "a", 0, 8)
    _set(tmp_path / "b", 50, 8)
    state = PackedLoader([tmp_path / "a", tmp_path / "b"], 0, 1, micro_batch=2, grad_accum=1, seed=0).state_dict()
    with pytest.raises(ValueError, match="b/s0.bin"):
        PackedLoader(tmp_path / "a", 0, 1, micro_batch=2, grad_accum=1, seed=0).load_state_dict(state)


def test_packed_rows_restart_positions_and_hide_boundaries(tmp_path):
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0]], dtype=np.uint16)
    mask = np.array([[0, 1, 1, 0, 1, 0, 1, 1, 0]], dtype=np.uint8)
    _set(tmp_path, 10, 1, segments=seg, mask=mask)
    b = PackedLoader(tmp_path, 0, 1, micro_batch=1, grad_accum=1, seed=0).next_step()[0]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2][: b.input_ids.size(1)]]
    # labels: mask shifted by one, minus the boundary targets (token 3 -> first of sample 2)
    assert (b.labels != -100).long().tolist() == [[1, 1, 0, 1, 0, 1, 1]]
    assert b.sample_ids.tolist() == [[1, 1, 0, 2, 0, 3, 3]]


def test_feistel_order_is_a_keyed_bijection_at_any_size():
    from steelworks.train.permutation import FeistelPermutation

    for n in (1, 2, 3, 7, 64, 1000, 4097):
        assert sorted(FeistelPermutation(n, [5, 0])[0:n].tolist()) == list(range(n))
    a, b = FeistelPermutation(1000, [5, 0])[0:1000], FeistelPermutation(1000, [5, 1])[0:1000]
    assert not np.array_equal(a, b) and np.array_equal(a, FeistelPermutation(1000, [5, 0])[0:1000])
    big = FeistelPermutation(10**12, [1, 2])  # a trillion sequences: still a few keys
    x = big[np.arange(0, 10**12, 10**7)]
    assert len(np.unique(x)) == len(x) and x.min() >= 0 and x.max() < 10**12


def test_epoch_order_with_appends_matches_the_array_rule():
    """EpochOrder computes, per position, what the loader used to build as an array: keep
    the order before each append's cursor, permute the rest together with the new ids."""
    from steelworks.train.data import EpochOrder
    from steelworks.train.permutation import FeistelPermutation

    appends = [{"cursor": 30, "known": 100}, {"cursor": 70, "known": 130}]
    total = 175
    order = FeistelPermutation(100, [9, 2])[0:100]
    for k, (a, end) in enumerate(zip(appends, [130, total]), start=1):
        rest = np.concatenate([order[a["cursor"]:], np.arange(a["known"], end)])
        order = np.concatenate([order[:a["cursor"]],
                                rest[FeistelPermutation(len(rest), [9, 2, k])[0:len(rest)]]])
    got = EpochOrder(9, 2, appends, total)
    assert np.array_equal(got[0:total], order) and np.array_equal(got[40:90], order[40:90])
    assert sorted(order.tolist()) == list(range(total))
