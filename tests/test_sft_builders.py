"""SFT builders (WanJuan exam, self-cognition, language filter), exact loss masks, packing
with segment ids, and shards with a ``.seg`` file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steelworks.data.sft_builders import exam_to_messages, filter_languages, self_cognition
from steelworks.data.shards import (
    ShardIndex,
    open_segments,
    open_shard,
    token_dtype,
    verify_shard,
    write_shard,
)


def _exam(**kw) -> dict:
    item = {"id": "q1", "q_type": "单选题", "q_main": "下列事故处理措施正确的是（ ）",
            "option_a": "油锅着火，立即盖上锅盖", "option_b": "电器着火，立即用水扑灭",
            "option_c": "高层住房着火，立即打开所有门窗", "option_d": "煤气泄漏，立即打开排气扇",
            "std_ans": "A",
            "answer_detail": "A、盖上锅盖可以隔绝空气，故A正确；B、会使人触电，故选项B错误；"
                             "C、火势更猛，故C错误；D、会引起爆炸，故D错误．故选：A．【点评】本题考查灭火。"}
    item.update(kw)
    return item


EXPLANATION = ("A、盖上锅盖可以隔绝空气，故A正确；B、会使人触电，故选项B错误；"
               "C、火势更猛，故C错误；D、会引起爆炸，故D错误．")
OPTIONS = ("A. 油锅着火，立即盖上锅盖\nB. 电器着火，立即用水扑灭\n"
           "C. 高层住房着火，立即打开所有门窗\nD. 煤气泄漏，立即打开排气扇")


def test_exam_answer_first_layout():
    user, assistant = exam_to_messages(_exam(), "answer_first")
    assert user == {"role": "user", "content": "以下是一道单选题:\n下列事故处理措施正确的是（ ）\n"
                    + OPTIONS + "\n请先给出答案再给出解释。"}
    assert assistant["role"] == "assistant"
    assert assistant["content"] == "A。" + _exam()["answer_detail"]
    # no explanation: the bare letter, and the prompt asks for just that
    user, assistant = exam_to_messages(_exam(answer_detail=None), "answer_first")
    assert assistant["content"] == "A" and user["content"].endswith("\n请直接给出答案。")
    assert exam_to_messages(_exam(answer_detail="略"), "answer_first")[1]["content"] == "A"


def test_exam_cot_replaces_the_conclusion_and_keeps_per_option_verdicts():
    user, assistant = exam_to_messages(_exam(), "cot")
    assert user["content"] == ("以下是一道单选题:\n下列事故处理措施正确的是（ ）\n" + OPTIONS
                               + "\n请先给出解释再给出答案。")
    # "故选项B错误" mid-explanation is not the conclusion (Steel-LLM's literal r"故选.*" would
    # cut there); the real conclusion and the 【点评】 after it go.
    assert assistant["content"] == EXPLANATION + "\n答案为A"


@pytest.mark.parametrize("conclusion", [
    "故选A", "故选：A", "故选:A", "故选A项", "故选A。", "故选 A．", "所以选A", "故答案为A",
    "故答案为：A．", "因此，应选A。", "故本题正确答案是A", "综上所述，选A", "故选Ａ．",
    "故选：A．【点评】本题考查金属的性质。", "故选A\n\n【解答】略",
])
def test_cot_conclusion_variants(conclusion):
    detail = "铁能与稀盐酸反应生成氢气，而铜不能，"
    out = exam_to_messages(_exam(answer_detail=detail + conclusion), "cot")[1]["content"]
    assert out == "铁能与稀盐酸反应生成氢气，而铜不能\n答案为A"


@pytest.mark.parametrize("detail", [
    "甲正确，故选项A正确；乙错误。",  # a verdict on one option, not a conclusion
    "若x>0，则选项B不成立；故A对。",
    "故选项B，C错误；A对。",
])
def test_cot_keeps_text_that_only_looks_like_a_conclusion(detail):
    out = exam_to_messages(_exam(answer_detail=detail), "cot")[1]["content"]
    assert out == detail + "\n答案为A"


@pytest.mark.parametrize("std_ans,expected", [("AB", "AB"), ("ba", "AB"), (" a , c ", "AC"),
                                              ("A、D", "AD"), ("Ｃ", "C"), ("c.", "C")])
def test_answer_normalisation_and_multiple_answers(std_ans, expected):
    item = _exam(q_type="多选题", std_ans=std_ans, answer_detail="甲对乙错，故选" + expected)
    assert exam_to_messages(item, "cot")[1]["content"] == f"甲对乙错\n答案为{expected}"
    assert exam_to_messages(item, "answer_first")[1]["content"].startswith(f"{expected}。")


def test_missing_options_are_omitted_and_letters_kept():
    user, _ = exam_to_messages(_exam(option_c=None, option_d="  "), "answer_first")
    assert "\nB. 电器着火，立即用水扑灭\n请先给出答案再给出解释。" in user["content"]
    assert "C." not in user["content"] and "D." not in user["content"]
    # A, B, D present: D keeps its letter, since std_ans names it by that letter
    user, assistant = exam_to_messages(_exam(option_c="", std_ans="D"), "answer_first")
    assert "B. 电器着火，立即用水扑灭\nD. 煤气泄漏，立即打开排气扇" in user["content"]
    assert assistant["content"].startswith("D。")
    # no q_type: a generic one
    assert exam_to_messages(_exam(q_type=None), "cot")[0]["content"].startswith("以下是一道选择题:\n")


@pytest.mark.parametrize("kw,style,reason", [
    ({"q_main": "  "}, "cot", "no question"),
    ({"q_main": None}, "answer_first", "no question"),
    ({"std_ans": ""}, "answer_first", "no answer letter"),
    ({"std_ans": "见解析"}, "answer_first", "no answer letter"),
    ({"std_ans": None}, "answer_first", "answer letters"),
    ({"std_ans": "D", "option_d": None}, "answer_first", "does not have"),
    ({"std_ans": "E"}, "answer_first", "does not have"),
    ({"option_b": "", "option_c": "", "option_d": ""}, "answer_first", "at least 2"),
    ({"answer_detail": "故选A"}, "cot", "explanation"),
    ({"answer_detail": ""}, "cot", "explanation"),
    ({}, "plain", "style"),
])
def test_bad_exam_items_raise_with_a_reason(kw, style, reason):
    with pytest.raises(ValueError, match=reason):
        exam_to_messages(_exam(**kw), style)  # type: ignore[arg-type]


def test_self_cognition_names_model_and_author_deterministically():
    a = self_cognition("钢铁侠", "炼钢团队", 60, seed=1)
    assert a == self_cognition("钢铁侠", "炼钢团队", 60, seed=1)
    assert a != self_cognition("钢铁侠", "炼钢团队", 60, seed=2)
    assert len(a) == 60 and all(r["task_type"] == "self_cognition" for r in a)
    for r in a:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert "钢铁侠" in assistant["content"] and "炼钢团队" in assistant["content"]
    has_han = [any("\u4e00" <= c <= "\u9fff" for c in r["messages"][0]["content"]) for r in a]
    assert 0 < sum(has_han) < len(a)  # both Chinese and English questions
    assert len({r["messages"][0]["content"] for r in a}) >= 10  # many templates in use
    assert self_cognition("x", "y", 0) == []
    with pytest.raises(ValueError):
        self_cognition("", "y", 3)


@pytest.mark.parametrize("lang,allowed,keep", [
    ("zh-cn", ["zh-cn"], True), ("zh-tw", ["zh-cn"], False), ("zh-tw", ["zh"], True),
    ("zh-CN", ["zh"], True), ("en", ["zh", "en"], True), ("en", ["zh"], False),
    ("zhx", ["zh"], False), ("ja", [], True), ("", ["zh"], False), ("zh_cn", ["zh-cn"], True),
])
def test_language_filter(lang, allowed, keep):
    assert filter_languages(lang, allowed) is keep


CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "北京是哪里？"},
    {"role": "assistant", "content": "北京是中国的首都。"},
    {"role": "user", "content": "上海呢？"},
    {"role": "assistant", "content": "上海是一座大城市。"},
    {"role": "user", "content": "你好，世界！"},
    {"role": "assistant", "content": "你好！我是一个语言模型。"},
]


def _expected(tok, messages):
    """Token ids and mask built piece by piece from the ChatML layout, not from offsets."""
    ids, mask = [], []
    for m in messages:
        for piece, trained in ((f"<|im_start|>{m['role']}\n", False),
                               (m["content"], m["role"] == "assistant"),
                               ("<|im_end|>", m["role"] == "assistant"), ("\n", False)):
            t = tok(piece, add_special_tokens=False)["input_ids"]
            ids += t
            mask += [int(trained)] * len(t)
    return ids, mask


@pytest.mark.parametrize("turns", [3, 5, 7])
def test_sft_mask_matches_the_template_token_by_token(tiny_tokenizer_dir, turns):
    from steelworks.data.sft import encode_conversation
    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    msgs = CONVERSATION[:turns]
    ids, mask, truncated = encode_conversation(tok, msgs, 4096, pad=False)
    exp_ids, exp_mask = _expected(tok, msgs)
    assert not truncated and list(ids) == exp_ids and list(mask) == exp_mask
    # each run of trained tokens decodes to one assistant turn followed by <|im_end|>
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assistants = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [c + "<|im_end|>" for c in assistants]
    # no header, system or user token is trained
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert not any(m for i, m in zip(ids, mask) if i == start)
    # padded form: the same prefix, then pad tokens that are never targets
    padded, pmask, _ = encode_conversation(tok, msgs, len(ids) + 5)
    assert list(padded[:len(ids)]) == exp_ids and list(padded[len(ids):]) == [tok.pad_token_id] * 5
    assert list(pmask) == exp_mask + [0] * 5
    # truncation keeps the first seq_len tokens and says so
    cut, cmask, truncated = encode_conversation(tok, msgs, 20, pad=False)
    assert truncated and list(cut) == exp_ids[:20] and list(cmask) == exp_mask[:20]


def _naive_first_fit(lengths, seq_len):
    free, rows = [], []
    for n in lengths:
        r = next((i for i, f in enumerate(free) if f >= n), len(free))
        if r == len(free):
            free.append(seq_len)
        free[r] -= n
        rows.append(r)
    return rows


def _unpack(tokens, mask, seg):
    out = []
    for row_t, row_m, row_s in zip(tokens, mask, seg):
        for sid in range(1, int(row_s.max()) + 1):
            where = np.flatnonzero(row_s == sid)
            assert len(where) and np.array_equal(where, np.arange(where[0], where[-1] + 1))
            out.append((where[0], row_t[where], row_m[where]))
    return out


def test_pack_samples_round_trip_first_fit(tiny_tokenizer_dir):
    from steelworks.data.sft import encode_conversation, pack_samples
    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    seq_len, pad = 64, tok.pad_token_id
    rng = np.random.default_rng(0)
    samples = [encode_conversation(tok, CONVERSATION[: 3 + 2 * (i % 3)], seq_len, pad=False)[:2]
               for i in range(6)]
    for n in rng.integers(1, seq_len + 1, size=60):
        samples.append((rng.integers(3, 500, size=n), rng.integers(0, 2, size=n).astype(np.uint8)))
    tokens, mask, seg = pack_samples(samples, seq_len, pad)
    assert tokens.shape == mask.shape == seg.shape and tokens.shape[1] == seq_len
    assert seg.dtype == np.uint16 and mask.dtype == np.uint8
    # the rows are exactly those of plain first-fit in input order
    rows = _naive_first_fit([len(t) for t, _ in samples], seq_len)
    assert tokens.shape[0] == max(rows) + 1
    # unpacking by segment id gives back every sample, in input order within its row
    by_row: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_row.setdefault(r, []).append(i)
    got = _unpack(tokens, mask, seg)
    expected = [i for r in sorted(by_row) for i in by_row[r]]
    assert len(got) == len(samples)
    for (_, t, m), i in zip(got, expected):
        assert np.array_equal(t, samples[i][0]) and np.array_equal(m, samples[i][1])
    # padding: segment 0, mask 0, pad token, and only after the row's samples
    assert np.all(mask[seg == 0] == 0) and np.all(tokens[seg == 0] == pad)
    for row in seg:
        used = int((row > 0).sum())
        assert np.all(row[:used] > 0) and np.all(row[used:] == 0)
        assert np.all(np.diff(row[:used].astype(int)) >= 0)
    # deterministic
    again = pack_samples(samples, seq_len, pad)
    assert all(np.array_equal(a, b) for a, b in zip(again, (tokens, mask, seg)))


def test_pack_samples_rejects_bad_samples():
    from steelworks.data.sft import pack_samples

    ok = (np.arange(4), np.ones(4, np.uint8))
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        pack_samples([ok, (np.arange(9), np.ones(9, np.uint8))], 8, 0)
    with pytest.raises(ValueError, match="sample 0 has 0 tokens"):
        pack_samples([(np.arange(0), np.ones(0, np.uint8))], 8, 0)
    with pytest.raises(ValueError, match="mask entries"):
        pack_samples([(np.arange(4), np.ones(3, np.uint8))], 8, 0)
    t, m, s = pack_samples([], 8, 0)
    assert t.shape == m.shape == s.shape == (0, 8)


def _packed_shards(tmp_path):
    from steelworks.data.sft import pack_samples

    rng = np.random.default_rng(1)
    samples = [(rng.integers(0, 70000, size=n), rng.integers(0, 2, size=n).astype(np.uint8))
               for n in rng.integers(1, 17, size=80)]
    tokens, mask, seg = pack_samples(samples, 16, 0)
    dt = token_dtype(70000)
    half = len(tokens) // 2
    infos = [write_shard(tmp_path / f"p{i}.bin", tokens[a:b], dt, mask[a:b], seg[a:b])
             for i, (a, b) in enumerate([(0, half), (half, len(tokens))])]
    ShardIndex(16, str(dt), 70000, 0, "sft", infos).save(tmp_path)
    return tokens, mask, seg


def test_shards_with_segments_round_trip_and_verify(tmp_path):
    tokens, mask, seg = _packed_shards(tmp_path)
    index = ShardIndex.load(tmp_path)
    assert all(s.seg_file and s.seg_sha256 for s in index.shards)
    parts = [(open_shard(tmp_path, index, s), open_segments(tmp_path, index, s)) for s in index.shards]
    assert np.array_equal(np.concatenate([np.asarray(p[0][0]) for p in parts]), tokens)
    assert np.array_equal(np.concatenate([np.asarray(p[0][1]) for p in parts]), mask)
    assert np.array_equal(np.concatenate([np.asarray(p[1]) for p in parts]), seg)
    assert (tmp_path / "p0.seg").stat().st_size == index.shards[0].num_sequences * 16 * 2
    for s in index.shards:
        verify_shard(tmp_path, s)
    # the existing loader reads packed shards unchanged (it ignores .seg)
    from steelworks.train.data import PackedLoader

    batch = PackedLoader(tmp_path, 0, 1, micro_batch=4, grad_accum=1, seed=0).next_step()[0]
    assert batch.num_targets > 0
    # a changed mask or segment file is refused by name
    for suffix in (".seg", ".mask"):
        path = tmp_path / f"p1{suffix}"
        original = path.read_bytes()
        path.write_bytes(b"\x07" + original[1:])
        with pytest.raises(ValueError, match=f"p1\\{suffix}"):
            verify_shard(tmp_path, index.shards[1])
        path.write_bytes(original)
    verify_shard(tmp_path, index.shards[1])


def test_write_shard_checks_segments_before_writing(tmp_path):
    tokens = np.zeros((2, 4), np.int64)
    with pytest.raises(ValueError, match="segments shape"):
        write_shard(tmp_path / "x.bin", tokens, np.dtype(np.uint16), None, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="0..65535"):
        write_shard(tmp_path / "x.bin", tokens, np.dtype(np.uint16), None, np.full((2, 4), 70000))
    assert list(tmp_path.iterdir()) == []


def test_old_index_without_segment_fields_still_loads(tmp_path):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 500, size=(6, 8))
    mask = (tokens % 2).astype(np.uint8)
    info = write_shard(tmp_path / "s0.bin", tokens, np.dtype(np.uint16), mask)
    # the index exactly as written before .seg existed: no seg_file / seg_sha256 keys
    old = {"seq_len": 8, "dtype": "uint16", "vocab_size": 500, "pad_id": 0, "kind": "sft",
           "shards": [{"file": info.file, "num_sequences": 6, "sha256": info.sha256,
                       "mask_file": info.mask_file, "mask_sha256": info.mask_sha256}]}
    (tmp_path / "index.json").write_text(json.dumps(old))
    index = ShardIndex.load(tmp_path)
    s = index.shards[0]
    assert s.seg_file is None and s.seg_sha256 is None
    assert open_segments(tmp_path, index, s) is None
    t, m = open_shard(tmp_path, index, s)
    assert np.array_equal(t, tokens) and np.array_equal(m, mask)
    verify_shard(tmp_path, s)
    # an even older pretraining entry (no mask keys either) loads too
    old["shards"][0] = {"file": info.file, "num_sequences": 6, "sha256": info.sha256}
    (tmp_path / "index.json").write_text(json.dumps(old))
    s = ShardIndex.load(tmp_path).shards[0]
    assert s.mask_file is None and s.seg_file is None
    verify_shard(tmp_path, s)
