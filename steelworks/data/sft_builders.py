"""SFT sample builders: WanJuan exam items -> chat turns, self-cognition turns, a language filter.

WanJuan exam records are ``{"id", "q_type", "q_main", "option_a".."option_d", "std_ans",
"answer_detail"}``. Steel-LLM fine-tuned on them in two layouts (its blog calls them cot and
非cot), both built here by ``exam_to_messages``:

- ``answer_first`` (非cot): ``"{答案}。{answer_detail}"`` -- the letter first, then the
  explanation when there is one (Steel-LLM's commented-out line in the notebook below).
- ``cot``: the explanation first, its own conclusion cut off, then ``答案为{答案}``.

Source of the cot rule: zhanshijinwat/Steel-LLM, ``finetune/process_wanjuanexam_data.ipynb``
(commit 20c8a65), ``format_example``::

    answer = re.sub(r"故选.*", "", answer_detail, flags=re.DOTALL) + f"答案为{std_ans}"

i.e. everything from the first "故选" to the end of the explanation is dropped (which also
drops the 【点评】 notes WanJuan appends after the conclusion) and ``答案为X`` is appended.
We keep that "cut from the conclusion to the end" semantics with two deliberate changes,
each fixing a way the literal rule damages real items:

1. The conclusion marker must be a conclusion: 故/所以/因此/综上/即 followed by
   选/选择/答案为/答案是/正确答案为/正确选项是..., then (after an optional colon) the answer
   letters, then the end of a clause. The literal ``故选.*`` also fires inside
   "故选项B错误；C、..." (a per-option verdict, common in WanJuan explanations) and would
   cut away the analysis of the remaining options. It also misses "故答案为A" and "所以选A".
2. Whitespace and a dangling "，"/"；" before the cut are trimmed and ``答案为X`` goes on its
   own line (Steel-LLM concatenated directly, so the join depended on whether the
   explanation happened to end in a newline).

Steel-LLM also dropped cot items whose explanation was shorter than 10 characters or
contained "略" (omitted); here an explanation that is empty (or just "略") after the cut is
a ``ValueError`` for ``cot`` -- the caller may fall back to ``answer_first``.
"""

from __future__ import annotations

import random
import re
import unicodedata
from typing import Any, Literal

LETTERS = "ABCD"
OPTION_KEYS = {letter: f"option_{letter.lower()}" for letter in LETTERS}

# Instructions tell the model which layout to produce, so both layouts can share one model
# (Steel-LLM's cot prompt: "以下是一道{q_type}:\n{question}请先给出解释再给出答案。").
_INSTRUCTION = {"cot": "请先给出解释再给出答案。", "answer_first": "请先给出答案再给出解释。"}
_INSTRUCTION_BARE = "请直接给出答案。"  # answer_first without an explanation: just the letter

# Separators seen in std_ans ("A,B", "A、B", "A B", "A．"); removed before validating letters.
_ANSWER_SEPARATORS = re.compile(r"[\s,，、;；.．。/和及与]+")
_CONCLUSION = re.compile(
    r"(?:故|所以|因此|综上所述|综上|即)[,，]?\s*(?:本题)?\s*"
    r"(?:应该?)?(?:选择|选|(?:正确)?答案(?:应)?(?:为|是|选)?|正确(?:的)?选项(?:为|是)?)"
    r"\s*[:：]?\s*(?:选项|项)?\s*"
    r"[A-DＡ-Ｄ](?:\s*[、,，和与及]?\s*[A-DＡ-Ｄ])*"  # the letters: A / AB / A、C / A和B
    r"(?!\s*[、,，和与及]?\s*[A-DＡ-Ｄ])"  # ... all of them (no backtracking to a prefix)
    r"\s*(?:项|选项)?"
    # ... and then the clause must end: "故选项B错误；C、..." (followed by 错) is a verdict
    # on one option, not the conclusion, and must not cut the analysis of the others.
    r"(?=$|[\s。．.；;！!）)】【,，])"
)
_OMITTED = {"略", "略。", "解：略", "解:略", "见解析", "详见解析"}


def normalize_answer(std_ans: Any) -> str:
    """"a", " A ", "A,B", "BA", "Ａ" -> "A", "A", "AB", "AB", "A"; ValueError if not letters."""
    if not isinstance(std_ans, str):
        raise ValueError(f"std_ans must be a string of answer letters, got {std_ans!r}")
    letters = _ANSWER_SEPARATORS.sub("", unicodedata.normalize("NFKC", std_ans)).upper()
    if not letters or not re.fullmatch(r"[A-Z]+", letters):
        raise ValueError(f"std_ans {std_ans!r} has no answer letter (expected e.g. 'A' or 'AB')")
    return "".join(sorted(set(letters)))


def strip_conclusion(detail: str) -> str:
    """The explanation with its trailing "故选A ..." conclusion (and anything after it) removed."""
    m = _CONCLUSION.search(detail)
    # "D对，故选D" leaves "D对，": drop the dangling clause separator with the whitespace.
    return (detail[: m.start()] if m else detail).rstrip().rstrip("，,；;：:、").rstrip()


def _options(item: dict[str, Any]) -> dict[str, str]:
    # Missing, None or blank options are omitted; present ones keep their own letter (an item
    # with A, B, D keeps D as D, since std_ans refers to it by that letter).
    out = {}
    for letter, key in OPTION_KEYS.items():
        value = item.get(key)
        if isinstance(value, str) and value.strip():
            out[letter] = value.strip()
    return out


def exam_to_messages(item: dict[str, Any], style: Literal["answer_first", "cot"]) -> list[dict[str, str]]:
    """One WanJuan exam record -> ``[user, assistant]`` turns in the given layout.

    Raises ValueError naming the item and the reason for items that cannot be trained on.
    """
    if style not in _INSTRUCTION:
        raise ValueError(f"style must be 'answer_first' or 'cot', got {style!r}")
    ident = item.get("id", "?")
    question = item.get("q_main")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"exam item {ident}: no question (q_main is empty)")
    options = _options(item)
    if len(options) < 2:
        raise ValueError(f"exam item {ident}: {len(options)} option(s); a choice needs at least 2")
    try:
        answer = normalize_answer(item.get("std_ans"))
    except ValueError as e:
        raise ValueError(f"exam item {ident}: {e}") from None
    absent = [letter for letter in answer if letter not in options]
    if absent:
        raise ValueError(f"exam item {ident}: answer {answer} names option(s) {''.join(absent)} "
                         f"the item does not have (options: {''.join(options)})")
    detail = item.get("answer_detail")
    detail = detail.strip() if isinstance(detail, str) else ""
    if detail in _OMITTED:
        detail = ""

    if style == "cot":
        explanation = strip_conclusion(detail)
        if explanation in _OMITTED or not explanation:
            raise ValueError(f"exam item {ident}: cot needs an explanation, and answer_detail has "
                             "none besides its conclusion")
        reply, instruction = f"{explanation}\n答案为{answer}", _INSTRUCTION["cot"]
    elif detail:
        reply, instruction = f"{answer}。{detail}", _INSTRUCTION["answer_first"]
    else:
        reply, instruction = answer, _INSTRUCTION_BARE

    q_type = item.get("q_type")
    q_type = q_type.strip() if isinstance(q_type, str) and q_type.strip() else "选择题"
    lines = [f"以下是一道{q_type}:", question.strip()]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append(instruction)
    return [{"role": "user", "content": "\n".join(lines)},
            {"role": "assistant", "content": reply}]


# Self-cognition: who the model is and who made it, Chinese-first. Every answer names both the
# model and its author, so any sample teaches both facts.
_SELF_Q_ZH = [
    "你是谁？", "你叫什么名字？", "介绍一下你自己", "请介绍一下你自己。", "你是什么模型？",
    "能告诉我你的名字吗？", "你是哪个AI？", "你好，你是谁呀？", "谁开发了你？", "你是由谁训练的？",
    "你的开发者是谁？", "是谁创造了你？", "你是ChatGPT吗？", "你和其他大模型有什么不同？",
    "我该怎么称呼你？", "你是哪家公司的产品？",
]
_SELF_Q_EN = [
    "Who are you?", "What is your name?", "Please introduce yourself.", "What model are you?",
    "Tell me about yourself.", "Who made you?", "Who developed you?", "Who trained you?",
    "Are you ChatGPT?", "What should I call you?", "Which company built you?", "hi, who am I talking to?",
]
_SELF_A_ZH = [
    "我是{name}，一个由{author}从零开始训练的语言模型。",
    "我叫{name}，是{author}开发的人工智能助手，很高兴为你服务。",
    "你好！我是{name}，由{author}训练。有什么可以帮你的吗？",
    "我是{author}开发的语言模型，名字叫{name}。",
    "我的名字是{name}。我由{author}开发和训练，可以回答问题、写作和聊天。",
    "{author}创造了我，我是{name}，一个中文优先的语言模型。",
]
_SELF_A_EN = [
    "I am {name}, a language model trained from scratch by {author}.",
    "My name is {name}. I was developed by {author}.",
    "Hello! I'm {name}, an AI assistant built by {author}. How can I help you?",
    "I'm {name}, created and trained by {author}.",
    "{author} developed me. I am {name}, a Chinese-first bilingual language model.",
]


def self_cognition(name: str, author: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` self-cognition samples ``{"messages", "task_type": "self_cognition"}``.

    Deterministic per ``seed`` (a str seed is hashed by random.seed: stable across processes).
    Every third sample is English, the rest Chinese, so any n >= 3 has both languages.
    """
    if not (isinstance(name, str) and name.strip() and isinstance(author, str) and author.strip()):
        raise ValueError(f"name and author must be non-empty strings, got {name!r}, {author!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"steelworks-self-cognition:{seed}")
    out = []
    for i in range(n):
        qs, ans = (_SELF_Q_EN, _SELF_A_EN) if i % 3 == 2 else (_SELF_Q_ZH, _SELF_A_ZH)
        out.append({"messages": [
            {"role": "user", "content": rng.choice(qs)},
            {"role": "assistant", "content": rng.choice(ans).format(name=name, author=author)},
        ], "task_type": "self_cognition"})
    return out


def filter_languages(lang: str, allowed: list[str]) -> bool:
    """Keep a record whose ``langdetect`` tag is allowed (Infinity-Instruct's field).

    An allowed entry matches exactly or as a prefix up to a "-": "zh" keeps "zh-cn" and
    "zh-tw" but not "zhx"; case and "_" vs "-" are ignored. No entries keeps everything.
    """
    if not allowed:
        return True
    if not isinstance(lang, str) or not lang.strip():
        return False
    tag = lang.strip().lower().replace("_", "-")
    for entry in allowed:
        want = entry.strip().lower().replace("_", "-")
        if want and (tag == want or tag.startswith(want + "-")):
            return True
    return False
