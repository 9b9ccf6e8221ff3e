"""Generative scoring: the answer-extraction cascade, and predict_generative on a scripted
engine and on the real continuous-batching engine."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from steelworks.data.benchmarks import Item, Subject
from steelworks.data.exam_prompt import build_prompt
from steelworks.evals.config import EvalConfig
from steelworks.evals.extract import RULES, extract_answer
from steelworks.evals.generative import (
    BASE_STOP,
    format_unparseable,
    predict_generative,
    unparseable_summary,
)
from steelworks.evals.report import aggregate
from steelworks.inference.engine import Engine
from steelworks.inference.sampling import SamplingParams

OPTS = {"A": "3×10^8 m/s", "B": "340 m/s", "C": "1 m/s", "D": "10 m/s"}

# (reply, expected letter, expected rule), each checked by hand against the extract.py docstring.
CASES = [
    # 1. exact: the bare letter, whatever whitespace/punctuation surrounds it
    ("B", "B", "exact"),
    ("  C\n", "C", "exact"),
    ("D。", "D", "exact"),
    ("(A)", "A", "exact"),
    ("【B】", "B", "exact"),
    ("Ｃ", "C", "exact"),  # full-width letter
    ("（Ｄ）。", "D", "exact"),  # full-width brackets and letter
    ("b", "B", "exact"),  # a bare lower-case letter can only be a letter
    # 2. phrase: explicit answer phrases, the last one wins
    ("答案是B", "B", "phrase"),
    ("答案为C。", "C", "phrase"),
    ("答案：D", "D", "phrase"),
    ("答案：Ｄ", "D", "phrase"),  # full-width colon and letter
    ("答案: A", "A", "phrase"),
    ("答案选B", "B", "phrase"),
    ("正确答案是C，因为……", "C", "phrase"),
    ("答案应该是D", "D", "phrase"),
    ("答案是选项A", "A", "phrase"),
    ("答案是(B)", "B", "phrase"),
    ("分析各项后，故选C。", "C", "phrase"),
    ("应选择A", "A", "phrase"),
    ("The answer is B.", "B", "phrase"),
    ("so THE ANSWER IS (C)", "C", "phrase"),
    ("the correct answer is: D", "D", "phrase"),
    ("答案是A。不对，重新计算，答案是C。", "C", "phrase"),  # last match
    ("A是错的，B也是错的，故选D", "D", "phrase"),  # a phrase beats the leading letter
    ("选A不对，答案是B", "B", "phrase"),  # last match across different phrases
    ("不选A，选C", "C", "phrase"),  # 不选A is not a choice
    ("选项A错误，选项B错误，故选D", "D", "phrase"),  # 选项X is a mention, not a choice
    ("答案是B项", "B", "phrase"),  # a CJK character may follow the letter
    # 3. leading: a letter then punctuation, a line break, or space + CJK
    ("B. 340 m/s 是声速", "B", "leading"),
    ("C、因为速度很慢", "C", "leading"),
    ("(A) 光速", "A", "leading"),
    ("D：十米每秒", "D", "leading"),
    ("B\n解析：声速约为340米每秒", "B", "leading"),
    ("A\nBecause light is fast", "A", "leading"),
    ("C 因为", "C", "leading"),
    ("B. A是错的", "B", "leading"),  # a later mention of A does not make it two answers
    ("Ａ．光速", "A", "leading"),  # full-width letter and full stop
    # 4. option_text: exactly one option's text occurs
    ("光速约为3×10^8 m/s", "A", "option_text"),
    ("我觉得是10 m/s吧", "D", "option_text"),  # "1 m/s" is no substring of "10 m/s"
    ("声速是340 m/s", "B", "option_text"),
    # unparseable
    ("", None, "unparseable"),
    ("   ", None, "unparseable"),
    ("我不知道", None, "unparseable"),
    ("A和B都不对", None, "unparseable"),  # two letters: no choice made
    ("A、B都对", None, "unparseable"),
    ("A B", None, "unparseable"),
    ("答案是A和B", None, "unparseable"),
    ("答案是AB", None, "unparseable"),
    ("选A或B", None, "unparseable"),
    ("答案是DNA", None, "unparseable"),  # a word, not the letter D
    ("About this question", None, "unparseable"),
    ("A bit unclear", None, "unparseable"),  # the article, not option A
    ("the answer is a bit unclear", None, "unparseable"),  # lower-case "a" after a phrase
    ("E", None, "unparseable"),  # not one of the four letters
    ("不选A", None, "unparseable"),
    ("1 m/s还是10 m/s呢", None, "unparseable"),  # two options occur: ambiguous
]


@pytest.mark.parametrize(("reply", "letter", "rule"), CASES)
def test_extract_cascade(reply: str, letter: str | None, rule: str) -> None:
    assert extract_answer(reply, OPTS) == (letter, rule)


def test_option_text_longest_and_ambiguity() -> None:
    opts = {"A": "北京", "B": "北京大学", "C": "上海", "D": "南京"}
    # The longer option contains the shorter: the longest wins when nothing is left over.
    assert extract_answer("应该是北京大学", opts) == ("B", "option_text")
    # The shorter also occurs on its own: ambiguous.
    assert extract_answer("北京还是北京大学？", opts) == (None, "unparseable")
    # Two different options of the same length: ambiguous.
    assert extract_answer("上海或南京", opts) == (None, "unparseable")
    # Option texts are NFKC-normalised too (a full-width option matches a half-width reply).
    assert extract_answer("是ABC公司", {"A": "ＡＢＣ公司", "B": "x", "C": "y", "D": "z"}) == (
        "A", "option_text")
    # An empty option text never matches everything.
    assert extract_answer("随便说说", {"A": "", "B": "x", "C": "y", "D": "z"}) == (None, "unparseable")


def test_rules_are_tried_in_order() -> None:
    # exact before phrase before leading before option text; the rule named is the first hit.
    assert extract_answer("B", {"A": "B", "B": "x", "C": "y", "D": "z"}) == ("B", "exact")
    assert extract_answer("A. 答案是C", OPTS) == ("C", "phrase")
    assert extract_answer("D. 340 m/s", OPTS) == ("D", "leading")  # the letter, not the text
    assert {rule for _, _, rule in CASES} == set(RULES)


# ---- predict_generative ------------------------------------------------------------------

SUBJECTS = [
    Subject("college_physics", "College Physics", "大学物理", "STEM"),
    Subject("modern_chinese_history", "Modern Chinese History", "近代史纲要", "Humanities"),
    Subject("law", "Law", "法学", "Social Science"),
]


def _it(subject: str, id_: str, question: str, options: list[str], answer: str | None) -> Item:
    return Item(subject, id_, question, dict(zip("ABCD", options, strict=True)), answer, "",
                f"{subject}_val.csv", int(id_) + 2)


ITEMS = [
    _it("college_physics", "0", "光速约为多少？", ["3×10^8 m/s", "340 m/s", "1 m/s", "10 m/s"], "A"),
    _it("college_physics", "1", "下列哪个是矢量？", ["质量", "速度", "温度", "时间"], "B"),
    _it("college_physics", "2", "牛顿第二定律是", ["F=ma", "E=mc^2", "PV=nRT", "V=IR"], "A"),
    _it("modern_chinese_history", "0", "鸦片战争爆发于哪一年？", ["1840年", "1911年", "1949年", "1919年"], "A"),
    _it("modern_chinese_history", "1", "辛亥革命发生在哪一年？", ["1840年", "1911年", "1949年", "1919年"], "B"),
    _it("law", "0", "我国的根本大法是", ["刑法", "民法典", "宪法", "行政法"], "C"),
    _it("law", "1", "法律面前人人平等是", ["原则", "例外", "口号", "建议"], None),  # no gold
]
SHOTS = {s.name: [_it(s.name, "9", "一加一等于", ["1", "2", "3", "4"], "B")] for s in SUBJECTS}

# Scripted replies by (subject, id): one per rule, a wrong one and unparseable ones.
SCRIPT = {
    ("college_physics", "0"): "A",  # exact, correct
    ("college_physics", "1"): "答案是A，不对，答案是B。",  # phrase (last), correct
    ("college_physics", "2"): "B. E=mc^2",  # leading, wrong
    ("modern_chinese_history", "0"): "鸦片战争爆发于1840年。",  # option text, correct
    ("modern_chinese_history", "1"): "我不确定",  # unparseable -> wrong
    ("law", "0"): "A和B都不对",  # unparseable -> wrong
    ("law", "1"): "C",  # no gold answer: unscored
}


@dataclass
class _Result:
    text: str


class ScriptedEngine:
    """encode/encode_chat/generate over scripted replies. Prompt ids index a list of rendered
    prompts; a barrier in generate fails unless every item is in flight at once."""

    def __init__(self, items: Sequence[Item], max_batch_size: int) -> None:
        self.items, self.max_batch_size = list(items), max_batch_size
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []
        self.chat_calls = self.encode_calls = 0
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(len(items), timeout=30)

    def _register(self, text: str) -> list[int]:
        with self._lock:
            self.prompts.append(text)
            return [len(self.prompts) - 1]

    def encode(self, text: str) -> list[int]:
        self.encode_calls += 1
        return self._register(text)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        assert [m["role"] for m in messages] == ["user"]
        self.chat_calls += 1
        return self._register(messages[0]["content"])

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> _Result:
        with self._lock:
            self.params.append(params)
        self._barrier.wait()  # BrokenBarrierError unless all requests are concurrent
        prompt = self.prompts[prompt_ids[0]]
        # The item is the one whose question closes the prompt (shots come before it).
        item = max((i for i in self.items if i.question in prompt), key=lambda i: prompt.rfind(i.question))
        return _Result(SCRIPT[(item.subject, item.id)])


@pytest.mark.parametrize("chat", [True, False])
def test_predict_generative_scripted(chat: bool) -> None:
    engine = ScriptedEngine(ITEMS, max_batch_size=16)
    cfg = EvalConfig(chat=chat, num_shots=1)
    records = predict_generative(engine, ITEMS, SUBJECTS, cfg, shots=SHOTS, max_tokens=24)

    # Prompts are exactly the log-likelihood path's text, through the chat template or not.
    by_name = {s.name: s for s in SUBJECTS}
    assert sorted(engine.prompts) == sorted(
        build_prompt(by_name[i.subject].name_zh, i, SHOTS[i.subject]) for i in ITEMS)
    assert (engine.chat_calls, engine.encode_calls) == ((len(ITEMS), 0) if chat else (0, len(ITEMS)))
    for p in engine.params:  # greedy, bounded, and base prompts stop at the blank line
        assert (p.temperature, p.max_tokens) == (0.0, 24)
        assert p.stop == ([] if chat else BASE_STOP)

    expected = [  # (pred, rule, correct) per item, in input order
        ("A", "exact", True),
        ("B", "phrase", True),
        ("B", "leading", False),
        ("A", "option_text", True),
        (None, "unparseable", False),
        (None, "unparseable", False),
        ("C", "exact", None),
    ]
    assert [(r["pred"], r["rule"], r["correct"]) for r in records] == expected
    for item, r in zip(ITEMS, records, strict=True):
        assert set(r) == {"subject", "id", "answer", "pred", "scores", "correct", "reply", "rule", "parsed"}
        assert (r["subject"], r["id"], r["answer"]) == (item.subject, item.id, item.answer)
        assert r["reply"] == SCRIPT[(item.subject, item.id)]
        assert r["parsed"] == (r["pred"] is not None)

    # Unparseable replies stay in the denominator: 3 correct of 6 scored, not 3 of 4.
    report = aggregate(records, SUBJECTS)
    assert (report["n"], report["correct"], report["unscored"]) == (6, 3, 1)
    assert report["micro_acc"] == pytest.approx(0.5)

    summary = unparseable_summary(records)
    assert summary["n"] == 7 and summary["parsed"] == 5 and summary["unparseable"] == 2
    assert summary["unparseable_rate"] == pytest.approx(2 / 7)
    assert summary["by_rule"] == {"exact": 2, "phrase": 1, "leading": 1, "option_text": 1,
                                  "unparseable": 2}
    assert summary["by_subject"] == {"modern_chinese_history": 1, "law": 1}
    assert summary["items"] == [
        {"subject": "modern_chinese_history", "id": "1", "answer": "B", "reply": "我不确定"},
        {"subject": "law", "id": "0", "answer": "C", "reply": "A和B都不对"},
    ]
    text = format_unparseable(summary)
    assert "2 of 7 replies" in text and "A和B都不对" in text and "| law | 0 | C |" in text


def test_predict_generative_reports_the_failing_item() -> None:
    class Failing(ScriptedEngine):
        def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> _Result:
            raise ValueError("prompt too long")

    engine = Failing(ITEMS[:1], max_batch_size=1)
    with pytest.raises(RuntimeError, match=r"college_physics_val.csv:2: .*'0'.*prompt too long"):
        predict_generative(engine, ITEMS[:1], SUBJECTS, EvalConfig(chat=False))


@pytest.fixture(scope="module")
def engine(shaken_model_dir):
    eng = Engine.from_dir(shaken_model_dir, max_batch_size=8)
    yield eng
    eng.shutdown()


def test_predict_generative_engine_batched_equals_solo(engine) -> None:
    cfg = EvalConfig(chat=True)
    records = predict_generative(engine, ITEMS, SUBJECTS, cfg, max_tokens=12)
    assert engine.stats()["batch_size_peak"] > 1  # the items really were decoded together
    assert [(r["subject"], r["id"]) for r in records] == [(i.subject, i.id) for i in ITEMS]
    for r in records:
        assert r["scores"] is None and isinstance(r["reply"], str)
        assert r["rule"] in RULES and r["parsed"] == (r["pred"] is not None)
        if not r["parsed"]:
            assert r["pred"] is None
        if r["answer"] is None:
            assert r["correct"] is None
        else:
            assert r["correct"] is (r["pred"] == r["answer"])  # False when unparseable
    # The shaken model writes no trained answers: some replies are unparseable, and they
    # count in the denominator.
    summary = unparseable_summary(records)
    assert summary["unparseable"] >= 1
    assert aggregate(records, SUBJECTS)["n"] == sum(r["answer"] is not None for r in records)

    # Greedy answers do not depend on batching: each item alone gives the same record.
    solo = [predict_generative(engine, [item], SUBJECTS, cfg, max_tokens=12)[0] for item in ITEMS]
    assert solo == records
    # And the base (non-chat) path runs through the real tokenizer too.
    base = predict_generative(engine, ITEMS[:2], SUBJECTS, EvalConfig(chat=False), max_tokens=8)
    assert len(base) == 2 and all(isinstance(r["reply"], str) for r in base)
